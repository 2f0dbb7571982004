"""Attention kernels behind two call sites: packed variable-length sequences and a per-sequence KV cache.

Backends, chosen per call from the tensors (`backend`), the choice printed once:
  flash-attn    on CUDA in bfloat16/float16 when the flash-attn package is installed
  torch-varlen  on CUDA otherwise, when torch ships FlashAttention as torch.nn.attention.varlen.varlen_attn
                (torch >= 2.10): packed training with backward, and cache decoding through its paged mode, the
                cache being one page per row (seqused_k, block_table; num_splits=1 for batch invariance)
  sdpa          everywhere else: pure-PyTorch versions of both call sites with flash-attn's exact signatures
                (SDPA inside), and a stand-in for varlen_attn with its exact signature
So every CPU test of the model exercises the very calls a GPU makes, and only the kernel behind differs.

Layouts (flash-attn's): q/k/v are [tokens, heads, head_dim] for varlen and [batch, seq, heads, head_dim]
for the cache; a cache is [cache_batch, max_seq, kv_heads, head_dim]. Causal masks are aligned to the
bottom-right corner: query i of n attends key j of m iff j <= i + (m - n).
"""
from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F

try:  # optional GPU dependency
    from flash_attn import flash_attn_varlen_func as _flash_varlen
    from flash_attn import flash_attn_with_kvcache as _flash_kvcache
except ImportError:  # pragma: no cover - depends on the machine
    _flash_varlen = _flash_kvcache = None
try:  # torch's own FlashAttention (2.10+); its GQA, window and paged-cache arguments came in later releases.
    if not torch.cuda.is_available():   # a CUDA kernel: without a GPU, skip its import (1.5 s: it loads dynamo)
        raise ImportError
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen
    _params = set(inspect.signature(_torch_varlen).parameters)
    if not {"window_size", "enable_gqa"} <= _params:   # pragma: no cover - an early release: not used
        _torch_varlen = None
    TORCH_VARLEN_PAGED = _torch_varlen is not None and {"seqused_k", "block_table", "num_splits"} <= _params
except ImportError:  # pragma: no cover - older torch, or no GPU
    _torch_varlen, TORCH_VARLEN_PAGED = None, False
PAGE = 256   # FlashAttention's paged KV cache wants pages of a multiple of 256 tokens: rows are padded to it


# The kernels' own ops (what an autograd trace of the call sites sees): selective checkpointing keeps their
# outputs (attention output and logsumexp, which their backward needs) instead of running them twice.
KERNEL_OPS = [getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name)]
if _flash_varlen is not None and hasattr(torch.ops, "flash_attn") and \
        hasattr(torch.ops.flash_attn, "_flash_attn_varlen_forward"):  # pragma: no cover - GPU machines
    KERNEL_OPS.append(torch.ops.flash_attn._flash_attn_varlen_forward.default)
if _torch_varlen is not None and hasattr(torch.ops, "torch_attn") and hasattr(torch.ops.torch_attn, "_varlen_attn"):
    KERNEL_OPS.append(torch.ops.torch_attn._varlen_attn.default)

_announced: set[str] = set()


def backend(t: torch.Tensor) -> str:
    """Which kernels run for tensors like t: flash-attn | torch-varlen | sdpa (printed the first time)."""
    name = "sdpa"
    if t.is_cuda and t.dtype in (torch.float16, torch.bfloat16):
        name = "flash-attn" if _flash_varlen is not None else "torch-varlen" if _torch_varlen is not None else "sdpa"
    if t.is_cuda and name not in _announced:
        _announced.add(name)
        print(f"minitir: attention on {t.device} in {t.dtype}: {name}" + (
            " (cache decoding through SDPA: this torch's varlen_attn has no paged cache)"
            if name == "torch-varlen" and not TORCH_VARLEN_PAGED else ""), file=sys.stderr)
    return name


def flash_available(t: torch.Tensor) -> bool:
    """A FlashAttention kernel decodes from the cache without host syncs (CUDA graphs can capture it)."""
    b = backend(t)
    return b == "flash-attn" or (b == "torch-varlen" and TORCH_VARLEN_PAGED)


def cache_length(max_len: int, t: torch.Tensor) -> int:
    """Tokens per cache row: max_len, padded to whole pages when torch's paged kernel reads the cache."""
    return -(-max_len // PAGE) * PAGE if backend(t) == "torch-varlen" and TORCH_VARLEN_PAGED else max_len


def varlen_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False):
    """`flash_attn_varlen_func` in PyTorch: q [Nq, H, D], k/v [Nk, Hkv, D] -> [Nq, H, D]."""
    assert dropout_p == 0.0, "dropout is not supported"
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    i, S = 0, len(bq) - 1
    while i < S:
        # a run of consecutive sequences with the same lengths is one batched SDPA call (the CPU kernels
        # parallelise over batch x heads, so one call per sequence leaves threads idle)
        n, m = bq[i + 1] - bq[i], bk[i + 1] - bk[i]
        j = i + 1
        while j < S and bq[j + 1] - bq[j] == n and bk[j + 1] - bk[j] == m:
            j += 1
        q0, q1, k0, k1 = bq[i], bq[j], bk[i], bk[j]
        i = j
        if n == 0:
            continue
        b = (q1 - q0) // n
        qi = q[q0:q1].view(b, n, *q.shape[1:]).transpose(1, 2)          # [b, H, n, D]
        ki = k[k0:k1].view(b, m, *k.shape[1:]).transpose(1, 2)          # [b, Hkv, m, D]
        vi = v[k0:k1].view(b, m, *v.shape[1:]).transpose(1, 2)
        mask, is_causal = None, False
        if causal and n == m:
            is_causal = True  # lets SDPA use its fused causal kernel
        elif causal:
            mask = _bottom_right_mask(n, m, q.device)
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=is_causal,
                                           scale=softmax_scale, enable_gqa=gqa)
        if q0 == 0 and q1 == q.shape[0]:  # one run covers everything: no copy
            return o.transpose(1, 2).reshape(q.shape)
        out[q0:q1] = o.transpose(1, 2).reshape(q1 - q0, *q.shape[1:])
    return out


def kvcache_attention_torch(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """`flash_attn_with_kvcache` in PyTorch.

    q [B, Tq, H, D]; k/v [B, Tn, Hkv, D] are written into the cache in place at positions
    cache_seqlens[b] .. cache_seqlens[b] + Tn of row cache_batch_idx[b]; attention then covers keys
    0 .. cache_seqlens[b] + Tn - 1 of that row. Unsupported options raise instead of being ignored.
    """
    if rotary_cos is not None or cache_leftpad is not None or block_table is not None or \
            alibi_slopes is not None or softcap != 0.0 or tuple(window_size) != (-1, -1) or return_softmax_lse:
        raise NotImplementedError("kvcache_attention_torch supports q/k/v, cache_seqlens, cache_batch_idx, "
                                  "softmax_scale and causal only")
    B, Tq = q.shape[:2]
    Tn = k.shape[1] if k is not None else 0
    p = _plan(cache_seqlens, cache_batch_idx, B, Tq, Tn, causal, q.device)
    if Tn and p.uniform:
        k_cache[p.first:p.first + B, p.lens[0]:p.S] = k
        v_cache[p.first:p.first + B, p.lens[0]:p.S] = v
    elif Tn:
        k_cache[p.rows[:, None], p.cols] = k
        v_cache[p.rows[:, None], p.cols] = v
    gqa = q.shape[2] != k_cache.shape[2]
    out = None if len(p.parts) == 1 else q.new_empty(q.shape)
    for part in p.parts:   # rows of similar lengths attend together: a batch's keys are padded to its longest
        b0, b1, first, S = part.b0, part.b1, part.first, part.S
        if part.rows is None:   # consecutive cache rows: a view, no copy
            keys, vals = k_cache[first:first + b1 - b0, :S], v_cache[first:first + b1 - b0, :S]
        else:
            keys, vals = k_cache[part.rows, :S], v_cache[part.rows, :S]
        o = F.scaled_dot_product_attention(q[b0:b1].transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                           attn_mask=part.mask, is_causal=part.is_causal, scale=softmax_scale,
                                           enable_gqa=gqa).transpose(1, 2)                 # [b, Tq, H, D]
        if out is None:
            return o
        out[b0:b1] = o
    return out


# A batch splits where keeping rows together would pad them with more than this many (row, key) pairs: on
# a 2-core CPU a further SDPA call costs about what reading ~256 padded keys of one row costs. (Decoding
# 8 GRPO groups of prompts of 176-562 tokens: attention 1.2-1.9x faster than one padded call.)
SPLIT_PADDING = 256


class _Part:
    """Batch entries b0:b1 attending in one SDPA call: their cache rows (None: first, first+1, ...), the
    keys to read S, and the mask (None when every row has S keys)."""

    def __init__(self, b0, b1, rows, lens, Tq, Tn, causal, device):
        self.b0, self.b1 = b0, b1
        lens = lens[b0:b1]
        self.S = max(lens) + Tn
        contiguous = rows[b0:b1] == list(range(rows[b0], rows[b0] + b1 - b0))
        self.first, self.rows = rows[b0], None if contiguous else torch.tensor(rows[b0:b1], device=device)
        self.is_causal, self.mask = False, None
        if lens.count(lens[0]) == len(lens):   # one mask for all rows, or SDPA's own causal kernel for a first chunk
            self.is_causal = causal and Tq > 1 and self.S == Tq
            if causal and Tq > 1 and not self.is_causal:
                self.mask = _bottom_right_mask(Tq, self.S, device)
            return
        total = torch.tensor(lens, device=device) + Tn                                   # keys per row [b]
        j = torch.arange(self.S, device=device)
        mask = j[None, None, :] < total[:, None, None]                                  # [b, 1, S]
        if causal and Tq > 1:  # with one query, "before the end" is already the causal limit
            i = torch.arange(Tq, device=device)
            mask = mask & (j[None, None, :] <= (total - Tq)[:, None, None] + i[None, :, None])  # [b, Tq, S]
        self.mask = mask.unsqueeze(1)


def _split(lens: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of batch entries, each ended where adding the next row would pad the run's rows to a
    common length with more than SPLIT_PADDING (row, key) pairs in all."""
    runs, b0, hi, total = [], 0, lens[0], lens[0]
    for b in range(1, len(lens)):
        n, top = b - b0 + 1, max(hi, lens[b])
        if n * top - (total + lens[b]) > SPLIT_PADDING:
            runs.append((b0, b))
            b0, hi, total = b, lens[b], lens[b]
        else:
            hi, total = top, total + lens[b]
    return runs + [(b0, len(lens))]


class _Plan:
    """What kvcache_attention_torch derives from the rows and their lengths: the same for every layer of a
    forward pass, so it is computed once (the last plan is kept, with the tensors it was made from)."""

    def __init__(self, cache_seqlens, cache_batch_idx, B, Tq, Tn, causal, device):
        row_list = cache_batch_idx.tolist() if cache_batch_idx is not None else list(range(B))
        if cache_seqlens is None or isinstance(cache_seqlens, int):
            self.lens = [cache_seqlens or 0] * B
        else:
            self.lens = cache_seqlens.tolist()
        self.first, self.S = row_list[0], max(self.lens) + Tn
        self.uniform = row_list == list(range(self.first, self.first + B)) and self.lens.count(self.lens[0]) == B
        if not self.uniform:   # where each row's new keys go
            self.rows = torch.tensor(row_list, device=device)
            self.cols = torch.tensor(self.lens, device=device)[:, None] + torch.arange(Tn, device=device)  # [B, Tn]
        self.parts = [_Part(b0, b1, row_list, self.lens, Tq, Tn, causal, device) for b0, b1 in _split(self.lens)]


_last_plan: list = [None, None]   # [key (holding the tensors it names), plan]


def _plan(cache_seqlens, cache_batch_idx, B, Tq, Tn, causal, device) -> _Plan:
    version = lambda t: t._version if isinstance(t, torch.Tensor) else t
    key = (cache_seqlens, version(cache_seqlens), cache_batch_idx, version(cache_batch_idx), B, Tq, Tn, causal)
    same = lambda a, b: a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else a == b
    old = _last_plan[0]
    if old is None or not all(same(a, b) for a, b in zip(old, key)):
        _last_plan[:] = [key, _Plan(cache_seqlens, cache_batch_idx, B, Tq, Tn, causal, device)]
    return _last_plan[1]


def _bottom_right_mask(n: int, m: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return j <= i + (m - n)


def varlen_attn_torch(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """`torch.nn.attention.varlen.varlen_attn` in PyTorch (its signature and conventions): sequence b's
    queries are query[cu_seq_q[b]:cu_seq_q[b+1]]; its keys key[cu_seq_k[b]:cu_seq_k[b+1]], or with
    block_table the pages key[block_table[b]] ([pages, page_size, Hkv, D]) laid end to end; seqused_k[b]
    keeps only the first seqused_k[b] keys. window_size (-1, 0) is causal, bottom-right aligned."""
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


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, cu_seqlens_k=None, max_seqlen_k=None):
    """Attention over packed sequences, the training/scoring call site: sequence b's queries are
    q[cu_seqlens[b]:cu_seqlens[b+1]], its keys k[cu_seqlens_k[b]:cu_seqlens_k[b+1]] (default: the same
    tokens); with more keys than queries the queries are the last ones (bottom-right causal)."""
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    max_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
    name = backend(q) if q.dtype == k.dtype == v.dtype else "sdpa"
    if name == "flash-attn":
        return _flash_varlen(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, causal=causal)
    if name == "torch-varlen":
        return _torch_varlen(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k,
                             window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k.shape[1])
    return varlen_attention_torch(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, causal=causal)


def cache_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """The KV cache's dtype for a model computing in `dtype`: its own, except bfloat16/float16 on a CPU,
    where the cache is float32. torch's CPU attention kernel in bfloat16 takes ~4-8x its float32 time at
    decoding's one-query shapes (16 rows x 9 heads on 600 cached keys: 8.0 ms vs 1.7 ms; the same products
    written out take 2.2 ms, reading the strided cache); casting each step's new keys is cheap."""
    low = dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu"
    return torch.float32 if low else dtype


def kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx):
    """Append k/v to the cache rows and attend causally, the decoding/chunked-prefill call site."""
    k, v = k.to(k_cache.dtype), v.to(k_cache.dtype)
    if q.dtype != k_cache.dtype and not q.is_cuda:   # a float32 cache under a bfloat16 model (cache_dtype)
        return kvcache_attention_torch(q.to(k_cache.dtype), k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                       cache_batch_idx=cache_batch_idx, causal=True).to(q.dtype)
    name = backend(q) if q.dtype == k_cache.dtype else "sdpa"
    if name == "flash-attn":
        return _flash_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                              cache_batch_idx=cache_batch_idx, causal=True)
    if name == "torch-varlen" and TORCH_VARLEN_PAGED:
        return kvcache_attention_paged(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, _torch_varlen)
    return kvcache_attention_torch(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                   cache_batch_idx=cache_batch_idx, causal=True)


def kvcache_attention_paged(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, varlen_fn):
    """The cache call site on a varlen kernel's paged mode, each cache row one page: write the new keys and
    values at each row's length, then attend with seqused_k = length + T, bottom-right causal. All on the
    device, no host sync: CUDA graphs can capture it. q, k, v [B, T, *, D] -> [B, T, H, D]."""
    B, T, H, D = q.shape
    rows = cache_batch_idx.long()
    pos = cache_seqlens.long()[:, None] + torch.arange(T, device=q.device)           # [B, T]
    k_cache[rows[:, None], pos] = k
    v_cache[rows[:, None], pos] = v
    L = k_cache.shape[1]
    steps = torch.arange(B + 1, device=q.device, dtype=torch.int32)
    out = varlen_fn(q.reshape(B * T, H, D), k_cache, v_cache, steps * T, steps * L, T, L, window_size=(-1, 0),
                    enable_gqa=H != k_cache.shape[2], seqused_k=(cache_seqlens + T).to(torch.int32),
                    block_table=cache_batch_idx.to(torch.int32).view(B, 1), num_splits=1)
    return out.view(B, T, H, D)
