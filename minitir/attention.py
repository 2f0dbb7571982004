"""Attention kernels behind two call sites: packed variable-length sequences and a per-sequence KV cache.

Backends, chosen per call from the tensors (`backend`), on a GPU the choice printed once:
  flash-attn    on CUDA in bfloat16/float16 when the flash-attn package is installed
  torch-varlen  on CUDA otherwise, when torch ships FlashAttention as torch.nn.attention.varlen.varlen_attn
                (torch >= 2.10): packed training with backward, and cache decoding through its paged mode, the
                cache being one page per row (seqused_k, block_table; num_splits=1 for batch invariance)
  sdpa          everywhere else: SDPA behind flash-attn's varlen signature (the packed call site); the tests
                run the paged call site on CPUs through a stand-in with varlen_attn's exact signature
The KV cache is read by `block_attention` on CPUs (always) and wherever the model is batch invariant, and the
trainer's packed forward uses it too then (`PackedPlan`): one kernel, the same bits on every path.

Layouts (flash-attn's): q/k/v are [tokens, heads, head_dim] for varlen and [batch, seq, heads, head_dim]
for the cache; a cache is [cache_batch, max_seq, kv_heads, head_dim]. Causal masks are aligned to the
bottom-right corner: query i of n attends key j of m iff j <= i + (m - n).
"""
from __future__ import annotations

import inspect
import sys
from contextlib import suppress

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
    """Which kernels run for tensors like t: flash-attn | torch-varlen | sdpa (on a GPU printed the first time)."""
    name = "sdpa"
    if t.is_cuda and t.dtype in (torch.float16, torch.bfloat16):
        name = "flash-attn" if _flash_varlen is not None else "torch-varlen" if _torch_varlen is not None else "sdpa"
    if t.is_cuda and name not in _announced:
        _announced.add(name)
        print(f"minitir: attention on {t.device} in {t.dtype}: {name}" + (
            " (cache decoding through the block kernel: this torch's varlen_attn has no paged cache)"
            if name == "torch-varlen" and not TORCH_VARLEN_PAGED else ""), file=sys.stderr)
    return name


def flash_available(t: torch.Tensor) -> bool:
    """A FlashAttention kernel decodes from the cache without host syncs (CUDA graphs can capture it)."""
    b = backend(t)
    return b == "flash-attn" or (b == "torch-varlen" and TORCH_VARLEN_PAGED)


def cache_length(max_len: int, t: torch.Tensor) -> int:
    """Tokens per cache row: max_len, padded to whole pages when torch's paged kernel reads the cache, else to
    whole key blocks (block_attention reads the cache's rows as they are)."""
    paged = backend(t) == "torch-varlen" and TORCH_VARLEN_PAGED
    return -(-max_len // PAGE) * PAGE if paged else -(-max_len // KEY_BLOCK) * KEY_BLOCK


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


# --- the batch-invariant kernel ------------------------------------------------------------------
KEY_BLOCK = 64    # keys per block: every path sums a query's softmax block by block, in key order
QUERY_TILE = 4    # rows per product: the CPU's matrix kernels pick another algorithm below 4 rows
QUERY_CHUNK = 128  # queries per call at most: the scores' memory stays bounded, causally later keys skipped


def block_attention(q, k, v, last, scale=None):
    """q [b, T, H, D], k/v [b, S, Hkv, D] (S a multiple of KEY_BLOCK), last [b, T] long: query (b, t) attends
    keys 0..last[b, t] -> [b, T, H, D] in q's dtype, computed in float32.

    Batch invariant (Thinking Machines, "Defeating Nondeterminism in LLM Inference", 2025): a query's output
    depends on its own keys alone, not on how many queries or rows share the call, nor on how many keys
    beyond its own are present. The products always have a whole number of QUERY_TILE query rows and
    reduce over a fixed length (D for scores, KEY_BLOCK for values), masked keys weigh exactly 0, and
    the blocks' sums are added in key order (cumsum: sequential), so trailing blocks add exact zeros. The
    same query computes the same bits in prefill, in decoding from the cache and in the trainer's packed
    forward: that is what lets the trainer's log-probs equal the generator's."""
    T = q.shape[1]
    if T <= QUERY_CHUNK:
        with torch.autocast(q.device.type, enabled=False):   # float32 throughout, under the trainer's autocast too
            return _block_attention(q, k, v, last, scale)
    out = torch.empty_like(q)   # chunks of queries: the scores' memory stays bounded, later keys are skipped
    for t0 in range(0, T, QUERY_CHUNK):
        t1 = min(t0 + QUERY_CHUNK, T)
        S = min(_blocks(int(last[:, t0:t1].max()) + 1), k.shape[1])
        out[:, t0:t1] = block_attention(q[:, t0:t1], k[:, :S], v[:, :S], last[:, t0:t1], scale)
    return out


def _block_attention(q, k, v, last, scale):
    b, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    g, M = H // Hkv, T * H // Hkv
    Mp = -(-M // QUERY_TILE) * QUERY_TILE
    qf = q.float().view(b, T, Hkv, g, D).transpose(1, 2).reshape(b * Hkv, M, D)             # [G, M, D]
    last = last.to(q.device)[:, None, :, None].expand(b, Hkv, T, g).reshape(b * Hkv, M, 1)   # [G, M, 1]
    if Mp != M:   # padded queries see every key: no row of -inf
        qf, last = F.pad(qf, (0, 0, 0, Mp - M)), F.pad(last, (0, 0, 0, Mp - M), value=S - 1)
    keys, vals = (_heads(t, torch.float32) for t in (k, v))                                 # [G, S, D]
    s = torch.bmm(qf, keys.transpose(1, 2)).mul_(scale or D ** -0.5)                        # [G, Mp, S]
    s.masked_fill_(torch.arange(S, device=q.device) > last, float("-inf"))
    p = s.sub_(s.amax(-1, keepdim=True)).exp_()                                             # masked keys: 0
    total = p.view(-1, Mp, S // KEY_BLOCK, KEY_BLOCK).sum(-1).cumsum(-1)[..., -1:]          # [G, Mp, 1]
    nb = S // KEY_BLOCK
    pb = p.view(-1, Mp, nb, KEY_BLOCK).transpose(1, 2).reshape(-1, Mp, KEY_BLOCK)            # [G * nb, Mp, KB]
    o = torch.bmm(pb, vals.reshape(-1, KEY_BLOCK, D)).view(-1, nb, Mp, D)                    # [G, nb, Mp, D]
    o = o.cumsum(1)[:, -1, :M].div_(total[:, :M])                                            # blocks in key order
    return o.view(b, Hkv, T, g, D).transpose(1, 2).reshape(b, T, H, D).to(q.dtype)


def _heads(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[b, S, Hkv, D] -> [b * Hkv, S, D] in dtype (default: t's): a view where the memory allows (the CPU
    cache keeps each head's keys together), else one copy that also casts."""
    b, S, Hkv, D = t.shape
    dtype, t = dtype or t.dtype, t.transpose(1, 2)
    if dtype == t.dtype:
        with suppress(RuntimeError):
            return t.view(b * Hkv, S, D)
    return torch.empty(b, Hkv, S, D, dtype=dtype, device=t.device).copy_(t).view(b * Hkv, S, D)


def _whole_blocks(t: torch.Tensor, S: int) -> torch.Tensor:
    """t [b, n, ...] cut or zero-padded to S entries along dim 1."""
    n = t.shape[1]
    return t[:, :S] if n >= S else F.pad(t, (0, 0) * (t.dim() - 2) + (0, S - n))


def _blocks(n: int) -> int:
    return -(-n // KEY_BLOCK) * KEY_BLOCK


# --- the cache call site ------------------------------------------------------------------------------
# Rows attending in one call are padded to their longest; a batch splits where that would add more than
# this many (row, key) pairs: one more call of the block kernel (~20 small ops) costs about what reading
# ~2,000 padded keys of one row costs on a 2-core CPU (SmolLM2 decoding 16 rows of 200-600 cached tokens:
# 256 -> 131 ms per step, 2,048 -> 112 ms, 8,192 -> 112 ms).
SPLIT_PADDING = 2048


def split_rows(lens: list[int]) -> list[tuple[int, int]]:
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


class CachePlan:
    """What every layer of one `forward_cached` call shares: the rows [B] and their cached lengths [B] (device
    tensors, all the FlashAttention kernels need), and for the PyTorch kernel, computed on first use, where
    each row's T new keys go and which rows attend together."""

    def __init__(self, seqlens: torch.Tensor, rows: torch.Tensor, T: int):
        self.seqlens, self.rows, self.T, self._runs = seqlens, rows, T, None

    def runs(self):
        """-> (rows as a list, lengths as a list, [(b0, b1, keys S, last [b, T])])."""
        if self._runs is None:
            rows, lens, dev = self.rows.tolist(), self.seqlens.tolist(), self.rows.device
            steps = torch.arange(self.T, device=dev)
            self._runs = rows, lens, [(b0, b1, _blocks(max(lens[b0:b1]) + self.T),
                                       torch.tensor(lens[b0:b1], device=dev)[:, None] + steps)
                                      for b0, b1 in split_rows(lens)]
        return self._runs


def kvcache_attention_blocks(q, k_cache, v_cache, k, v, plan: CachePlan):
    """The cache call site on block_attention: k/v [B, T, Hkv, D] are written at each row's length, then
    runs of rows attend (consecutive cache rows read as a view, others gathered). q [B, T, H, D]."""
    rows, lens, runs = plan.runs()
    B, T = q.shape[:2]
    first = rows[0]
    if rows == list(range(first, first + B)) and lens.count(lens[0]) == B:
        k_cache[first:first + B, lens[0]:lens[0] + T] = k
        v_cache[first:first + B, lens[0]:lens[0] + T] = v
    else:
        cols = plan.seqlens.long()[:, None] + torch.arange(T, device=q.device)                # [B, T]
        k_cache[plan.rows.long()[:, None], cols] = k
        v_cache[plan.rows.long()[:, None], cols] = v
    out = q.new_empty(q.shape) if len(runs) > 1 else None
    for b0, b1, S, last in runs:
        if rows[b0:b1] == list(range(rows[b0], rows[b1 - 1] + 1)):
            keys, vals = k_cache[rows[b0]:rows[b1 - 1] + 1], v_cache[rows[b0]:rows[b1 - 1] + 1]
        else:
            idx = plan.rows[b0:b1].long()
            keys, vals = k_cache[idx, :S], v_cache[idx, :S]
        o = block_attention(q[b0:b1], _whole_blocks(keys, S), _whole_blocks(vals, S), last)
        if out is None:
            return o
        out[b0:b1] = o
    return out


# --- the packed call site, batch invariant ----------------------------------------------------------------
class PackedPlan:
    """What every layer of one packed forward shares for the block kernel: the sequences (flash-attn's varlen
    layout) batched by key count, as the cache's rows attend together, and per batch the gather indices of
    queries [b, T] and keys [b, S] (padding points at a zero row past the end) and each query's last key."""

    def __init__(self, cu_q: list[int], cu_k: list[int], device):
        self.nq, self.nk, self.runs = cu_q[-1], cu_k[-1], []
        n = [cu_q[s + 1] - cu_q[s] for s in range(len(cu_q) - 1)]
        m = [cu_k[s + 1] - cu_k[s] for s in range(len(cu_k) - 1)]
        order = sorted((s for s in range(len(n)) if n[s]), key=lambda s: m[s])
        for run in _packed_runs(order, n, m):
            T, S = max(n[s] for s in run), _blocks(max(m[s] for s in run))
            at = lambda starts, counts, width, pad: torch.tensor(
                [[starts[s] + i if i < counts[s] else pad for i in range(width)] for s in run], device=device)
            iq = at(cu_q, n, T, self.nq)
            real = iq.flatten() < self.nq
            self.runs.append((iq, at(cu_k, m, S, self.nk), at([y - x for x, y in zip(n, m)], n, T, S - 1), real,
                              iq.flatten()[real]))


PACKED_PADDING = 1 << 18   # (query, key) pairs of padding a packed batch may add before it splits: a packed
# call works on many queries per row, so its fixed cost is worth far more padding than a decoding call's


def _packed_runs(order: list[int], n: list[int], m: list[int]) -> list[list[int]]:
    """The sequences `order` (by key count) cut into batches, each ended where padding its sequences to the
    batch's most queries and keys would add more than PACKED_PADDING (query, key) pairs."""
    runs, cur, T, S, real = [], [], 0, 0, 0
    for s in order:
        t, k = max(T, n[s]), max(S, m[s])
        if cur and (len(cur) + 1) * t * k - (real + n[s] * m[s]) > PACKED_PADDING:
            runs.append(cur)
            cur, t, k, real = [], n[s], m[s], 0
        cur.append(s)
        T, S, real = t, k, real + n[s] * m[s]
    return runs + ([cur] if cur else [])


def varlen_attention_blocks(q, k, v, plan: PackedPlan) -> torch.Tensor:
    """Packed sequences (q [Nq, H, D], k/v [Nk, Hkv, D], bottom-right causal) through block_attention, the
    same bits per query as decoding, batch by batch of plan; gathered by index (their gradients: index_adds)."""
    q_, k_, v_ = (F.pad(t, (0, 0, 0, 0, 0, 1)) for t in (q, k, v))   # a zero row (the last) pads the batches
    out = torch.empty_like(q)
    for iq, ik, last, real, rows in plan.runs:
        gather = lambda t, idx: t.index_select(0, idx.flatten()).view(*idx.shape, *t.shape[1:])
        o = _BlockAttention.apply(gather(q_, iq), gather(k_, ik), gather(v_, ik), last)          # [b, T, H, D]
        out.index_copy_(0, rows, o.flatten(0, 1)[real])
    return out


class _BlockAttention(torch.autograd.Function):
    """block_attention with a gradient, for the trainer's packed forward. Backward recomputes the softmax
    and takes the textbook gradient (no bits to match there), chunk by chunk of queries."""

    @staticmethod
    def forward(ctx, q, k, v, last):
        out = block_attention(q, k, v, last)
        ctx.save_for_backward(q, k, v, last, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, last, out = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _block_attention_grad(q, k, v, last, out, grad)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _block_attention_grad(q, k, v, last, out, grad):
    """Gradients of block_attention's output w.r.t. q, k, v: with P = softmax(q k^T * scale), masked, and
    O = P v: dv = P^T dO, dS = P (dO v^T - rowsum(dO O)), dq = dS k * scale, dk = dS^T q * scale. The scores
    and softmax in float32; the four gradient products in the inputs' dtype (bfloat16 under autocast, as a
    FlashAttention backward runs them), accumulated in float32."""
    b, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    g, scale, dt = H // Hkv, D ** -0.5, q.dtype
    fold = lambda t: t.view(b, t.shape[1], Hkv, g, D).transpose(1, 2).reshape(b * Hkv, -1, D)
    keys, vals = _heads(k), _heads(v)                                                          # [G, S, D]
    keys32 = keys if keys.dtype == torch.float32 else _heads(k, torch.float32)
    dq = torch.empty(b * Hkv, T * g, D, device=q.device)
    dk, dv = torch.zeros(keys.shape, device=q.device), torch.zeros(vals.shape, device=q.device)
    for t0 in range(0, T, QUERY_CHUNK):
        t1 = min(t0 + QUERY_CHUNK, T)
        qc, gc = fold(q[:, t0:t1]), fold(grad[:, t0:t1].to(dt))                                # [G, Mc, D]
        lc = last[:, None, t0:t1, None].expand(b, Hkv, t1 - t0, g).reshape(b * Hkv, -1, 1)
        s = torch.bmm(qc.float(), keys32.transpose(1, 2)).mul_(scale)                          # [G, Mc, S]
        p = s.masked_fill_(torch.arange(S, device=q.device) > lc, float("-inf")).softmax(-1)
        delta = (gc.float() * fold(out[:, t0:t1]).float()).sum(-1, keepdim=True)               # [G, Mc, 1]
        pd = p.to(dt)
        dv.add_(torch.bmm(pd.transpose(1, 2), gc))
        ds = p.mul_(torch.bmm(gc, vals.transpose(1, 2)).float().sub_(delta)).mul_(scale).to(dt)
        dq[:, t0 * g:t1 * g] = torch.bmm(ds, keys)
        dk.add_(torch.bmm(ds.transpose(1, 2), qc))
    unfold = lambda t, n, heads: t.view(b, Hkv, n, heads, D).transpose(1, 2).reshape(b, n, Hkv * heads, D)
    return unfold(dq, T, g), unfold(dk, S, 1), unfold(dv, S, 1)


def _bottom_right_mask(n: int, m: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return j <= i + (m - n)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, cu_seqlens_k=None, max_seqlen_k=None,
                     plan: PackedPlan | None = None):
    """Attention over packed sequences, the training/scoring call site: sequence b's queries are
    q[cu_seqlens[b]:cu_seqlens[b+1]], its keys k[cu_seqlens_k[b]:cu_seqlens_k[b+1]] (default: the same
    tokens); with more keys than queries the queries are the last ones (bottom-right causal). With a plan:
    the batch-invariant kernel decoding uses (block_attention), on any device."""
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    max_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
    if plan is not None and causal:
        return varlen_attention_blocks(q, k, v, plan)
    name = backend(q) if q.dtype == k.dtype == v.dtype else "sdpa"
    if name == "flash-attn":
        return _flash_varlen(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, causal=causal)
    if name == "torch-varlen":
        return _torch_varlen(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k,
                             window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k.shape[1])
    return varlen_attention_torch(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, causal=causal)


def cache_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """The KV cache's dtype for a model computing in `dtype`: its own, except bfloat16/float16 on a CPU,
    where the cache is float32: block_attention computes in float32, and a float32 cache holding the
    bfloat16 keys' exact values casts each new key once instead of every cached key at every step."""
    low = dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu"
    return torch.float32 if low else dtype


def kvcache_attention(q, k_cache, v_cache, k, v, plan: CachePlan, invariant=False):
    """Append k/v to the cache rows and attend causally, the decoding/chunked-prefill call site: FlashAttention
    on a GPU, else (and whenever invariant) the batch-invariant block kernel."""
    k, v = k.to(k_cache.dtype), v.to(k_cache.dtype)
    name = backend(q) if q.dtype == k_cache.dtype and not invariant else "sdpa"
    if name == "flash-attn":
        return _flash_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=plan.seqlens,
                              cache_batch_idx=plan.rows, causal=True)
    if name == "torch-varlen" and TORCH_VARLEN_PAGED:
        return kvcache_attention_paged(q, k_cache, v_cache, k, v, plan.seqlens, plan.rows, _torch_varlen)
    return kvcache_attention_blocks(q, k_cache, v_cache, k, v, plan)


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
