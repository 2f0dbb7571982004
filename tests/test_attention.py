"""The attention kernels behind the two call sites match a naive attention loop, including bottom-right causal
alignment and in-place cache updates: the batch-invariant block kernel (every CPU path), the PyTorch stand-ins
with flash-attn's and torch varlen_attn's exact signatures, and on a machine with CUDA (and flash-attn) the
same checks on the GPU kernels (bfloat16, looser tolerance)."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from minitir import attention
from minitir.attention import (CachePlan, PackedPlan, _bottom_right_mask, kvcache_attention_blocks,
                               kvcache_attention_paged, varlen_attention_blocks, varlen_attention_torch)

pytestmark = pytest.mark.quick   # the inner loop: pytest -m quick

# parameter names of flash-attn 2.x's Python API, in order (flash_attn/flash_attn_interface.py)
FLASH_VARLEN_PARAMS = ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                       "softmax_scale", "causal"]
FLASH_KVCACHE_PARAMS = ["q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens",
                        "cache_batch_idx", "cache_leftpad", "block_table", "softmax_scale", "causal", "window_size",
                        "softcap", "rotary_interleaved", "alibi_slopes", "num_splits", "return_softmax_lse"]


FLASH = attention._flash_kvcache is not None and torch.cuda.is_available()
TORCH_VARLEN = attention._torch_varlen is not None and attention.TORCH_VARLEN_PAGED and torch.cuda.is_available()
IMPLS = ["blocks", "torch", "paged",
         pytest.param("flash", marks=pytest.mark.skipif(not FLASH, reason="needs CUDA and flash-attn")),
         pytest.param("torch-varlen", marks=pytest.mark.skipif(not TORCH_VARLEN, reason="needs CUDA and torch's "
                                                                 "varlen_attn with seqused_k/block_table"))]


def varlen_attn_torch(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """`torch.nn.attention.varlen.varlen_attn` in PyTorch (its signature and conventions), so a CPU runs the
    call sites a GPU runs through it: sequence b's queries are query[cu_seq_q[b]:cu_seq_q[b+1]]; its keys
    key[cu_seq_k[b]:cu_seq_k[b+1]], or with block_table the pages key[block_table[b]] ([pages, page_size, Hkv,
    D]) laid end to end; seqused_k[b] keeps only the first seqused_k[b] keys. window_size (-1, 0) is causal,
    bottom-right aligned."""
    if return_aux is not None or tuple(window_size) not in ((-1, -1), (-1, 0)):
        raise NotImplementedError("varlen_attn_torch supports full and causal attention without aux outputs")
    out = torch.empty_like(query)
    bq = cu_seq_q.tolist()
    used = seqused_k.tolist() if seqused_k is not None else None
    for b in range(len(bq) - 1):
        if block_table is not None:
            kb = key[block_table[b].long()].flatten(0, 1)                        # [pages * page_size, Hkv, D]
            vb = value[block_table[b].long()].flatten(0, 1)
        else:
            k0, k1 = int(cu_seq_k[b]), int(cu_seq_k[b + 1])
            kb, vb = key[k0:k1], value[k0:k1]
        if used is not None:
            kb, vb = kb[:used[b]], vb[:used[b]]
        qb = query[bq[b]:bq[b + 1]].transpose(0, 1)                                # [H, n, D]
        n, m = qb.shape[1], kb.shape[0]
        mask = _bottom_right_mask(n, m, query.device) if tuple(window_size) == (-1, 0) else None
        o = F.scaled_dot_product_attention(qb, kb.transpose(0, 1), vb.transpose(0, 1), attn_mask=mask, scale=scale,
                                           enable_gqa=enable_gqa)
        out[bq[b]:bq[b + 1]] = o.transpose(0, 1)
    return out


def through_varlen(fn):
    """The two call sites written on a varlen_attn-style kernel, as attention.py calls torch's: packed
    sequences with window_size, the cache through the paged mode (one page per cache row)."""
    def varlen(q, k, v, cq, ck, mq, mk, causal):
        return fn(q, k, v, cq, ck, mq, mk, window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k.shape[1])

    def kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, causal):
        assert causal
        return kvcache_attention_paged(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, fn)
    return varlen, kvcache


def blocks_varlen(q, k, v, cq, ck, mq, mk, causal):
    """The batch-invariant kernel is causal only: the non-causal case goes to SDPA, as varlen_attention does."""
    if causal:
        return varlen_attention_blocks(q, k, v, PackedPlan(cq.tolist(), ck.tolist(), q.device))
    return varlen_attention_torch(q, k, v, cq, ck, mq, mk, causal=False)


def blocks_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, causal):
    """flash_attn_with_kvcache's call as the block kernel serves it."""
    assert causal
    return kvcache_attention_blocks(q, k_cache, v_cache, k, v, CachePlan(cache_seqlens, cache_batch_idx, q.shape[1]))


def impl_of(name):
    """-> (varlen kernel, kvcache kernel, device, dtype, tolerance against the float32 naive loop)."""
    if name == "blocks":
        return blocks_varlen, blocks_kvcache, "cpu", torch.float32, 1e-5
    if name == "torch":
        return varlen_attention_torch, blocks_kvcache, "cpu", torch.float32, 1e-5
    if name == "paged":   # the stand-in of torch's varlen_attn behind the torch-varlen call sites
        return (*through_varlen(varlen_attn_torch), "cpu", torch.float32, 1e-5)
    if name == "torch-varlen":
        return (*through_varlen(attention._torch_varlen), "cuda", torch.bfloat16, 2e-2)
    return attention._flash_varlen, attention._flash_kvcache, "cuda", torch.bfloat16, 2e-2


def naive(q, k, v, causal):
    """q [n, H, D], k/v [m, Hkv, D], bottom-right causal, by explicit loops over heads."""
    n, H, D = q.shape
    m, Hkv = k.shape[:2]
    out = torch.zeros_like(q)
    for h in range(H):
        kh, vh = k[:, h // (H // Hkv)], v[:, h // (H // Hkv)]
        s = q[:, h] @ kh.T / math.sqrt(D)
        if causal:
            i = torch.arange(n)[:, None]
            j = torch.arange(m)[None, :]
            s = s.masked_fill(j > i + (m - n), float("-inf"))
        out[:, h] = torch.softmax(s, -1) @ vh
    return out


def test_signatures_match_flash_attn_and_torch():
    assert list(inspect.signature(varlen_attention_torch).parameters) == FLASH_VARLEN_PARAMS
    try:   # torch's varlen_attn, whose conventions the stand-in follows (minitir imports it only with a GPU)
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:   # pragma: no cover - older torch
        return
    theirs = inspect.signature(varlen_attn).parameters
    if {"window_size", "enable_gqa"} <= set(theirs):   # an early release minitir does not use
        ours = inspect.signature(varlen_attn_torch).parameters
        assert list(ours) == list(theirs) and all(ours[n].kind == theirs[n].kind for n in ours)


@pytest.mark.parametrize("lq,lk", [
    ([3, 1, 5], [3, 4, 9]),                     # fewer queries than keys (bottom-right alignment)
    ([4, 4, 4, 2, 2, 6, 0, 3], [4, 4, 6, 2, 2, 6, 0, 3]),  # runs of equal lengths share one batched call
    ([5, 5, 5], [5, 5, 5]),                     # one run covering the whole pack
])
@pytest.mark.parametrize("impl", IMPLS)
def test_varlen_matches_naive(lq, lk, impl):
    fn, _, dev, dt, tol = impl_of(impl)
    g = torch.Generator().manual_seed(0)
    # rounded to the kernel's dtype first, so the float32 reference sees the kernel's inputs
    q, k, v = (torch.randn(n, h, 8, generator=g).to(dt).float()
               for n, h in ((sum(lq), 4), (sum(lk), 2), (sum(lk), 2)))
    cq = torch.tensor([0] + lq, dtype=torch.int32).cumsum(0).to(torch.int32)
    ck = torch.tensor([0] + lk, dtype=torch.int32).cumsum(0).to(torch.int32)
    for causal in (True, False):
        out = fn(*(x.to(dev, dt) for x in (q, k, v)), cq.to(dev), ck.to(dev), max(lq), max(lk), causal=causal)
        assert out.shape == q.shape
        out = out.float().cpu()
        for i in range(len(lq)):
            if lq[i] == 0:
                continue
            ref = naive(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], causal)
            assert (out[cq[i]:cq[i + 1]] - ref).abs().max() < tol


# (rows, lengths, new tokens): scattered rows of different lengths take the masked path; contiguous rows of
# one length take the slice path, with and without earlier tokens, for a chunk and for a single query
@pytest.mark.parametrize("rows,lens,T", [([2, 0], [5, 0], 3), ([1, 2], [4, 4], 3), ([1, 2], [0, 0], 3),
                                          ([3], [7], 1), ([0, 1, 2], [3, 6, 1], 1)])
@pytest.mark.parametrize("impl", IMPLS)
def test_kvcache_updates_in_place_and_matches_naive(rows, lens, T, impl):
    _, fn, dev, dt, tol = impl_of(impl)
    g = torch.Generator().manual_seed(1)
    B = len(rows)
    L = attention.PAGE if impl == "torch-varlen" else 12   # torch's paged kernel reads whole pages
    k_cache, v_cache = (torch.randn(4, L, 2, 8, generator=g).to(dev, dt) for _ in range(2))
    before_k = k_cache.clone()
    q = torch.randn(B, T, 4, 8, generator=g).to(dev, dt)
    k, v = (torch.randn(B, T, 2, 8, generator=g).to(dev, dt) for _ in range(2))
    seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    idx = torch.tensor(rows, dtype=torch.int32, device=dev)
    out = fn(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens, cache_batch_idx=idx, causal=True)
    for b in range(B):
        r, s = rows[b], lens[b]
        assert torch.equal(k_cache[r, s:s + T], k[b]) and torch.equal(v_cache[r, s:s + T], v[b])
        assert torch.equal(k_cache[r, :s], before_k[r, :s])          # earlier entries untouched
        assert torch.equal(k_cache[r, s + T:], before_k[r, s + T:])  # and later ones
        ref = naive(*(x.float().cpu() for x in (q[b], k_cache[r, :s + T], v_cache[r, :s + T])), causal=True)
        assert (out[b].float().cpu() - ref).abs().max() < tol
    others = [r for r in range(4) if r not in rows]
    assert torch.equal(k_cache[others], before_k[others])             # other rows untouched


def test_split_pads_at_most_split_padding(monkeypatch):
    """Hand-computed: a run ends where padding its rows to a common length would cost more than SPLIT_PADDING
    (row, key) pairs (256 here)."""
    monkeypatch.setattr(attention, "SPLIT_PADDING", 256)
    assert attention.split_rows([10, 10, 10, 10]) == [(0, 4)]
    assert attention.split_rows([0] * 8 + [63] * 8) == [(0, 8), (8, 16)]        # 8 x 63 = 504 padded keys: split
    assert attention.split_rows([0] * 4 + [63] * 4) == [(0, 8)]                 # 4 x 63 = 252: one call
    assert attention.split_rows([100, 300, 100]) == [(0, 2), (2, 3)]            # 200 padded, then 400


@pytest.mark.parametrize("split", [0, 10 ** 9])   # every length change splits / one padded call
@pytest.mark.parametrize("T", [1, 2])
def test_kvcache_split_into_calls_matches_naive(monkeypatch, split, T):
    """Rows of unequal lengths, some consecutive in the cache and some not, attend in one masked call or in
    runs of rows (a view for consecutive rows, a gather otherwise): the same outputs and cache either way."""
    monkeypatch.setattr(attention, "SPLIT_PADDING", split)
    g = torch.Generator().manual_seed(3)
    rows, lens = [4, 5, 0, 1, 2, 6], [3, 3, 6, 1, 1, 9]
    k_cache, v_cache = (torch.randn(7, 16, 2, 8, generator=g) for _ in range(2))
    q = torch.randn(len(rows), T, 4, 8, generator=g)
    k, v = (torch.randn(len(rows), T, 2, 8, generator=g) for _ in range(2))
    plan = CachePlan(torch.tensor(lens, dtype=torch.int32), torch.tensor(rows, dtype=torch.int32), T)
    assert len(plan.runs()[2]) == (1 if split else 4)
    out = kvcache_attention_blocks(q, k_cache, v_cache, k, v, plan)
    for b, (r, s) in enumerate(zip(rows, lens)):
        assert torch.equal(k_cache[r, s:s + T], k[b]) and torch.equal(v_cache[r, s:s + T], v[b])
        ref = naive(q[b], k_cache[r, :s + T], v_cache[r, :s + T], causal=True)
        assert (out[b] - ref).abs().max() < 1e-5


def test_block_kernels_gradient_is_the_attention_gradient():
    """The trainer's batch-invariant forward carries the textbook gradient: as SDPA's to float rounding, for
    packed sequences with more keys than queries (a continued prompt), one-query sequences and GQA."""
    g = torch.Generator().manual_seed(0)
    lq = [40, 1, 33, 200, 7]
    lk = [n + 17 * (i % 2) for i, n in enumerate(lq)]
    cq, ck = ([0] + torch.tensor(x).cumsum(0).tolist() for x in (lq, lk))
    leaves = [torch.randn(sum(n), h, 16, generator=g).requires_grad_() for n, h in ((lq, 4), (lk, 2), (lk, 2))]
    grad = torch.randn(sum(lq), 4, 16, generator=g)
    got, want = [], []
    for out, run in ((got, lambda q, k, v: varlen_attention_blocks(q, k, v, PackedPlan(cq, ck, q.device))),
                     (want, lambda q, k, v: varlen_attention_torch(q, k, v, torch.tensor(cq, dtype=torch.int32),
                                                                   torch.tensor(ck, dtype=torch.int32), max(lq),
                                                                   max(lk), causal=True))):
        for t in leaves:
            t.grad = None
        run(*leaves).backward(grad)
        out += [t.grad.clone() for t in leaves]
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-5


def test_call_sites_dispatch_to_flash_functions(monkeypatch):
    """Force the flash path with the stand-ins plugged in as the 'flash' kernels: the call sites must pass
    arguments flash-attn accepts (keyword names, int32 metadata), and the results must not change."""
    from tests.conftest import make_hf_model
    from minitir.checkpoint import load_model
    import tempfile
    calls = {"varlen": 0, "kv": 0}

    def fake_varlen(*a, **kw):
        calls["varlen"] += 1
        assert a[3].dtype == torch.int32 and a[4].dtype == torch.int32
        return varlen_attention_torch(*a, **kw)

    def fake_kv(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, causal):
        calls["kv"] += 1
        assert cache_seqlens.dtype == torch.int32 and cache_batch_idx.dtype == torch.int32
        return blocks_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, causal)

    with tempfile.TemporaryDirectory() as d:
        make_hf_model("qwen2-gqa-untied").save_pretrained(d)
        m = load_model(d)
    ids = torch.randint(0, 97, (9,))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    cache = attention_cache = __import__("minitir").KVCache(m.config, rows=2, max_len=16)
    ref_h = m.hidden_packed(ids, cu)
    ref_l = m.forward_cached(ids[None, :4], cache, torch.tensor([1]))
    monkeypatch.setattr(attention, "_flash_varlen", fake_varlen)
    monkeypatch.setattr(attention, "_flash_kvcache", fake_kv)
    monkeypatch.setattr(attention, "backend", lambda t: "flash-attn")
    cache2 = type(attention_cache)(m.config, rows=2, max_len=16)
    assert torch.allclose(m.hidden_packed(ids, cu), ref_h)
    assert torch.allclose(m.forward_cached(ids[None, :4], cache2, torch.tensor([1])), ref_l)
    assert calls["varlen"] == 2 and calls["kv"] == 2


def test_call_sites_dispatch_to_torch_varlen(monkeypatch):
    """Force the torch-varlen path with the stand-in plugged in as torch's kernel: the call sites must pass
    what varlen_attn accepts (int32 metadata, a [B, 1] block table, num_splits=1), training and decoding
    results must not change, and generation gives the same tokens and log-probs."""
    from tests.conftest import make_hf_model
    from minitir.checkpoint import load_model
    from minitir.generate import generate
    from minitir.model import KVCache
    import tempfile
    calls = {"packed": 0, "paged": 0}

    def fake(q, k, v, cq, ck, mq, mk, **kw):
        assert cq.dtype == torch.int32 and ck.dtype == torch.int32 and isinstance(mq, int) and isinstance(mk, int)
        if kw.get("block_table") is not None:
            calls["paged"] += 1
            assert kw["block_table"].dtype == torch.int32 and kw["block_table"].shape[1] == 1
            assert kw["seqused_k"].dtype == torch.int32 and kw["num_splits"] == 1 and kw["window_size"] == (-1, 0)
        else:
            calls["packed"] += 1
        return varlen_attn_torch(q, k, v, cq, ck, mq, mk, **kw)

    with tempfile.TemporaryDirectory() as d:
        make_hf_model("qwen2-gqa-untied").save_pretrained(d)
        m = load_model(d)
    ids = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    ref_h = m.hidden_packed(ids, cu)
    ref_s = m.hidden_packed(ids, cu, [-1, 0])   # the second sequence continues the first (a shared prompt)
    ref_l = m.forward_cached(ids[None, :4], KVCache(m.config, rows=2, max_len=16), torch.tensor([1]))
    from types import SimpleNamespace
    tok = SimpleNamespace(eos_token_id=None, decode=lambda ids: "")
    ref_g = generate(m, tok, [[5, 17, 33], [70, 3, 1, 2, 8]], max_new_tokens=6, temperature=1.0, seed=2)
    monkeypatch.setattr(attention, "_torch_varlen", fake)
    monkeypatch.setattr(attention, "TORCH_VARLEN_PAGED", True)
    monkeypatch.setattr(attention, "backend", lambda t: "torch-varlen")
    assert torch.allclose(m.hidden_packed(ids, cu), ref_h, atol=1e-5)
    assert torch.allclose(m.hidden_packed(ids, cu, [-1, 0]), ref_s, atol=1e-5)
    assert torch.allclose(m.forward_cached(ids[None, :4], KVCache(m.config, rows=2, max_len=16), torch.tensor([1])),
                          ref_l, atol=1e-5)
    assert calls["packed"] == 4 and calls["paged"] == 2
    got = generate(m, tok, [[5, 17, 33], [70, 3, 1, 2, 8]], max_new_tokens=6, temperature=1.0, seed=2)
    for a, b in zip(got, ref_g):
        assert a.tokens == b.tokens and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
