"""The model's products, its two fused operations with hand-written backward passes, and the log-softmax
the sampler and the trainer share.

Every product goes through `_products`: whole tiles of rows (a row computes the same bits however many
rows share it: batch invariance), oneDNN on x86 CPUs (see _ONEDNN), weights cast to the compute dtype as
autocast casts them, and when decoding, weights packed in oneDNN's layout and kept on their module.

Autograd would keep every intermediate of RMSNorm and SwiGLU alive until backward: per token and layer,
the normalised input twice and three [intermediate]-sized tensors (silu(gate), silu(gate)*up, ...).
`norm_linears` and `mlp` keep only what cannot be recomputed cheaply (the norm's input and 1/rms, gate
and up) and redo the elementwise work in backward, which cuts activation memory roughly in half at no
cost in matrix products; `mlp(..., recompute=True)` (selective checkpointing) also reruns gate/up.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

import torch
import torch.nn.functional as F

# oneDNN runs the x @ W^T and gy @ W products on x86 CPUs in float32, and in bfloat16 where the CPU multiplies
# it natively: on the AMD EPYC these benchmarks ran on, MKL's sgemm (what F.linear calls) is ~1.3x slower at
# training shapes and ~2x at decoding's few-row shapes; in bfloat16, packed oneDNN weights decode ~1.6x faster
# than F.linear. The weight gradients (gy^T @ x) stay in MKL, which was as fast or faster for them.
# MINITIR_ONEDNN=0 keeps every product in F.linear / torch.mm.
_ONEDNN = (torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
           and os.environ.get("MINITIR_ONEDNN", "1") != "0")
_BF16 = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
_DTYPES = (torch.float32, torch.bfloat16) if _BF16 else (torch.float32,)


ROW_TILE = 4          # CPU products run on whole tiles of 4 rows (see _products)
CUDA_ROW_TILE = 128   # batch-invariant products on CUDA: one fixed-size call per tile of 128 rows
PACK_ROWS = 256       # products of at most this many rows without autograd (decoding) use packed weights


def keep_freed_memory():
    """Called by the Learner and the Engine on a CPU. Training there allocates and frees activation-sized
    tensors (tens of MB) thousands of times a step; glibc hands such blocks back to the kernel on free and the
    next allocation page-faults them in again, which made elementwise ops 3-6x slower than their arithmetic
    (bench_logprobs: 46 s -> 41 s). Keep freed memory in the process instead: it is reused, and peak RSS is
    what the process needed anyway. MINITIR_KEEP_FREED_MEMORY=0 leaves the allocator alone."""
    if not sys.platform.startswith("linux") or os.environ.get("MINITIR_KEEP_FREED_MEMORY", "1") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)   # glibc's maximum: blocks up to 32 MB come from the heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 40)    # never shrink the heap
    libc.mallopt(M_TOP_PAD, 64 << 20)          # grow it in 64 MB steps


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What x's products run in: autocast's dtype where autocast is on for x's device, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _onednn_ok(x, w) -> bool:
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == w.dtype and x.dtype in _DTYPES
            and type(w) in (torch.Tensor, torch.nn.Parameter))


def amp_forward(fwd):
    """torch.amp.custom_fwd for whichever device the first input is on (CPU or CUDA): records the autocast
    state forward runs under, which amp_backward restores, so backward's products see forward's dtypes."""
    @functools.wraps(fwd)
    def run(ctx, x, *args):
        dev = x.device.type
        ctx.amp = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return fwd(ctx, x, *args)
    return run


def amp_backward(bwd):
    @functools.wraps(bwd)
    def run(ctx, *grads):
        dev, enabled, dtype = ctx.amp
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            return bwd(ctx, *grads)
    return run


class _Pack:
    """Weights packed for oneDNN, held by the module that owns them (`_packed`); a copy of the module does not
    copy them (it packs its own on first use)."""

    def __init__(self, key, weight, bias):
        self.key, self.weight, self.bias = key, weight, bias

    def __deepcopy__(self, memo):
        return None


def _packed(owner: torch.nn.Module, ws, bs, dtype):
    """The weights ws (and biases bs) of one product group, cast to dtype, stacked and reordered into oneDNN's
    blocked layout: decoding reads every weight once per token, and reordering it in every call was a third of
    the product's time at batch 16. Kept on the module that owns the weights (`owner`) until any of them
    changes its data, version (an in-place update), dtype or device."""
    key = (dtype, *((t.data_ptr(), t._version, t.dtype, t.device) for t in (*ws, *bs) if t is not None))
    held = owner.__dict__.get("_onednn_packed")
    if held is None or held.key != key:
        w = torch.cat([w.detach().to(dtype) for w in ws])
        b = None if bs[0] is None else torch.cat([b.detach().to(dtype) for b in bs])
        held = owner.__dict__["_onednn_packed"] = _Pack(key, torch.ops.mkldnn._reorder_linear_weight(w, 16), b)
    return held.weight, held.bias


def _products(x, ws, bs, owner=None, invariant=False) -> tuple[torch.Tensor, ...]:
    """x [..., in] @ w_i[out_i, in]^T + b_i for each i, without autograd, in x's compute dtype (weights cast to
    it, as autocast does and as the decode copy holds them).

    Batch invariant: a row's result must not depend on how many rows share the product. The CPU's kernels
    (MKL, oneDNN) compute 1-3 rows by another algorithm (a GEMV) than 4 or more, so rows are padded to whole
    tiles of ROW_TILE: every row then computed the same bits for 1 to 2,048 rows on 1 to 4 threads, float32
    and bfloat16 (tests/test_ops.py keeps 1-1,030 rows, 1-2 threads). cuBLAS picks its kernel by the whole
    shape, so with `invariant` every CUDA call has one shape: CUDA_ROW_TILE rows. Linears sharing x (q/k/v,
    gate/up) run as one product when their weights are packed (`owner`: the module whose parameters they
    are and which keeps the packed copy, see _packed; a computed weight, LoRA's, is never packed)."""
    dt, shape = compute_dtype(x), x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dt)
    M = x2.shape[0]
    tile = ROW_TILE if x.device.type == "cpu" else CUDA_ROW_TILE if invariant else 1
    if M % tile:
        x2 = F.pad(x2, (0, 0, 0, tile - M % tile))
    cast = [w.to(dt) for w in ws], [None if b is None else b.to(dt) for b in bs]
    if _onednn_ok(x2, cast[0][0]):
        if owner is not None and M <= PACK_ROWS and not torch.is_grad_enabled() and len({b is None for b in bs}) == 1 \
                and all(isinstance(w, torch.nn.Parameter) for w in ws):
            w, b = _packed(owner, ws, bs, dt)
            y = torch.ops.mkldnn._linear_pointwise(x2, w, b, "none", [], "")[:M].view(*shape, -1)
            return y.split([w.shape[0] for w in ws], -1) if len(ws) > 1 else (y,)
        linear_ = lambda t, w, b: torch.ops.mkldnn._linear_pointwise(t, w, b, "none", [], "")
    elif tile > 1 and x.is_cuda:
        linear_ = lambda t, w, b: torch.cat([F.linear(part, w, b) for part in t.split(tile)])
    else:
        linear_ = F.linear
    with torch.autocast(x.device.type, enabled=False):
        return tuple(linear_(x2, w, b)[:M].view(*shape, -1) for w, b in zip(*cast))


def _product(x, w, b, owner=None, invariant=False):
    return _products(x, (w,), (b,), owner, invariant)[0]


def grad_input(gy: torch.Tensor, w: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """acc + gy @ W: the gradient of x for y = x @ W^T, summed over the linears that share x.
    oneDNN takes W^T as a weight (a weight-sized copy per call, small next to the product) and runs
    these ~1.3x faster than MKL does given W as it is."""
    if _onednn_ok(gy, w):
        g = _product(gy.contiguous(), w.t().contiguous(), None)
        return g if acc is None else acc.add_(g)
    return gy @ w if acc is None else torch.addmm(acc, gy, w)   # out of place: autocast may change dtypes


class _Linear(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(ctx, x, w, b, invariant):
        ctx.save_for_backward(x, w)
        ctx.has_b = b is not None
        return _product(x, w, b, invariant=invariant)

    @staticmethod
    @amp_backward
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = grad_input(gy2, w).view(x.shape) if ctx.needs_input_grad[0] else None
        gw = gy2.t() @ x.reshape(-1, x.shape[-1]).to(gy2.dtype) if ctx.needs_input_grad[1] else None
        gb = gy2.sum(0) if ctx.has_b and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, owner=None,
           invariant: bool = False) -> torch.Tensor:
    """F.linear(x, w, b) through _products (whole row tiles; oneDNN on x86 CPUs; packed weights kept on `owner`
    when decoding), differentiable."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _Linear.apply(x, w, b, invariant)
    return _product(x, w, b, owner, invariant)


def silu(x: torch.Tensor) -> torch.Tensor:
    """F.silu. In float32 as x / (1 + exp(-x)): F.silu's float32 kernel rounds its vectorised loop and its
    scalar tail differently, so a value would depend on where in the tensor it falls (and so on the batch);
    exp's kernels agree (10^7 values checked). bfloat16's F.silu agrees with itself either way."""
    return x / (1 + torch.exp(-x)) if x.dtype == torch.float32 else F.silu(x)


def rms_norm(x, norm_w, eps):
    """RMSNorm as the reference implementations compute it: statistics in float32. -> (normed, rstd)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)          # [N, 1]
    xhat = (xf * rstd).to(x.dtype)                                      # [N, D]
    return norm_w.to(x.dtype) * xhat, rstd   # the weight in x's dtype, as the decode copy holds it


def _norm_linears_backward(x, rstd, norm_w, wb, gys, needs_bias):
    """Gradients of y_i = norm(x) @ W_i^T + b_i given dL/dy_i -> (dx, d norm_w, [dW_0, db_0, ...])."""
    xhat = (x.float() * rstd).to(x.dtype)                               # recomputed [N, D]
    n = norm_w.to(x.dtype) * xhat
    gn, grads = None, []
    for i, gy in enumerate(gys):
        if gy is None:
            grads += [None, None]
            continue
        gn = grad_input(gy, wb[2 * i], gn)                               # [N, D]
        grads += [gy.t() @ n, gy.sum(0) if needs_bias[i] else None]
    g_norm_w = (gn * xhat).sum(0)
    gxhat, xh = (gn * norm_w).float(), xhat.float()
    gx = torch.addcmul(gxhat, xh, (gxhat * xh).mean(-1, keepdim=True), value=-1).mul_(rstd)
    return gx.to(x.dtype), g_norm_w, grads


def _swiglu_down_backward(g, u, W, gout, has_b):
    """Gradients of (silu(g) * u) @ W^T + b -> (dg, du, dW, db). Five elementwise passes over [N, F]:
    these tensors are the largest of the layer, so passes, not FLOPs, are the cost."""
    silu_g = silu(g)                                                    # [N, F]
    g_W = gout.t() @ (silu_g * u)                                       # [D, F]
    g_prod = grad_input(gout, W)                                        # [N, F]
    g_u = g_prod * silu_g
    g_g = _silu_backward(g_prod.mul_(u), g)                             # (g_prod * u) * silu'(g)
    return g_g, g_u, g_W, gout.sum(0) if has_b else None


def _silu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad * silu'(x), silu' = s (1 + x (1 - s)) with s = sigmoid(x); in float32 through exp, as `silu`."""
    if x.dtype != torch.float32:
        return torch.ops.aten.silu_backward(grad, x)
    s = torch.exp(-x).add_(1).reciprocal_()
    return grad * s * (1 + x * (1 - s))


class _NormLinears(torch.autograd.Function):
    """y_i = (rmsnorm(x) * w) @ W_i^T + b_i for several linears sharing one normalised input."""

    @staticmethod
    @amp_forward
    def forward(ctx, x, norm_w, eps, invariant, *wb):
        # x [N, D]; wb = (W_0, b_0, W_1, b_1, ...) with b_i possibly None
        n, rstd = rms_norm(x, norm_w, eps)
        ctx.save_for_backward(x, rstd, norm_w, *wb)
        return _products(n, wb[0::2], wb[1::2], invariant=invariant)

    @staticmethod
    @amp_backward
    def backward(ctx, *gys):
        x, rstd, norm_w, *wb = ctx.saved_tensors
        has_b = [wb[i + 1] is not None for i in range(0, len(wb), 2)]
        gx, g_norm_w, grads = _norm_linears_backward(x, rstd, norm_w, wb, gys, has_b)
        return (gx, g_norm_w, None, None, *grads)


def norm_linears(x: torch.Tensor, norm, linears, invariant: bool = False) -> tuple[torch.Tensor, ...]:
    """RMSNorm module `norm` then each nn.Linear in `linears`, on x [..., D] -> tuple of [..., out_i]."""
    shape = x.shape[:-1]
    if not torch.is_grad_enabled():  # decoding: the same math without autograd's bookkeeping
        n, _ = rms_norm(x, norm.weight, norm.eps)
        return _products(n, [lin.weight for lin in linears], [lin.bias for lin in linears], linears[0], invariant)
    wb = [t for lin in linears for t in (lin.weight, lin.bias)]
    ys = _NormLinears.apply(x.reshape(-1, x.shape[-1]), norm.weight, norm.eps, invariant, *wb)
    return tuple(y.view(*shape, -1) for y in ys)


class _SwiGLUDown(torch.autograd.Function):
    """(silu(g) * u) @ W^T + b, keeping g and u only."""

    @staticmethod
    @amp_forward
    def forward(ctx, g, u, W, b, invariant):
        ctx.save_for_backward(g, u, W)
        ctx.has_b = b is not None
        return _product(silu(g) * u, W, b, invariant=invariant)

    @staticmethod
    @amp_backward
    def backward(ctx, gout):
        g, u, W = ctx.saved_tensors
        return (*_swiglu_down_backward(g, u, W, gout, ctx.has_b), None)


class _RecomputedMLP(torch.autograd.Function):
    """down(silu(gate(norm(x))) * up(norm(x))) keeping only x and 1/rms: gate and up are recomputed in
    backward (two of the layer's seven matrix products) instead of stored (over half its activations)."""

    @staticmethod
    @amp_forward
    def forward(ctx, x, norm_w, eps, invariant, Wg, bg, Wu, bu, Wd, bd):
        n, rstd = rms_norm(x, norm_w, eps)
        ctx.save_for_backward(x, rstd, norm_w, Wg, bg, Wu, bu, Wd)
        ctx.has_b, ctx.invariant = (bg is not None, bu is not None, bd is not None), invariant
        g, u = _products(n, (Wg, Wu), (bg, bu), invariant=invariant)
        return _product(silu(g) * u, Wd, bd, invariant=invariant)

    @staticmethod
    @amp_backward
    def backward(ctx, gout):
        x, rstd, norm_w, Wg, bg, Wu, bu, Wd = ctx.saved_tensors
        n = norm_w.to(x.dtype) * (x.float() * rstd).to(x.dtype)          # recomputed [N, D]
        g, u = _products(n, (Wg, Wu), (bg, bu), invariant=ctx.invariant)   # as forward computed them
        g_g, g_u, g_Wd, g_bd = _swiglu_down_backward(g, u, Wd, gout, ctx.has_b[2])
        gx, g_norm_w, (g_Wg, g_bg, g_Wu, g_bu) = _norm_linears_backward(
            x, rstd, norm_w, (Wg, bg, Wu, bu), (g_g, g_u), ctx.has_b[:2])
        return gx, g_norm_w, None, None, g_Wg, g_bg, g_Wu, g_bu, g_Wd, g_bd


def swiglu_down(g: torch.Tensor, u: torch.Tensor, down, invariant: bool = False) -> torch.Tensor:
    """down(silu(g) * u) for g, u [..., F] and an nn.Linear `down`."""
    if not torch.is_grad_enabled():
        return _product(silu(g) * u, down.weight, down.bias, down, invariant)
    shape = g.shape[:-1]
    out = _SwiGLUDown.apply(g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1]), down.weight, down.bias,
                            invariant)
    return out.view(*shape, -1)


def mlp(x: torch.Tensor, norm, gate, up, down, recompute: bool = False, invariant: bool = False) -> torch.Tensor:
    """The SwiGLU MLP on norm(x), x [..., D]; with recompute, gate/up activations are not stored."""
    if not recompute:
        g, u = norm_linears(x, norm, (gate, up), invariant)
        return swiglu_down(g, u, down, invariant)
    shape = x.shape[:-1]
    out = _RecomputedMLP.apply(x.reshape(-1, x.shape[-1]), norm.weight, norm.eps, invariant, gate.weight, gate.bias,
                               up.weight, up.bias, down.weight, down.bias)
    return out.view(*shape, -1)


def log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [N, V] -> log softmax(logits / temperature) [N, V] in float32 (or float64): the one log-softmax of
    the sampler (sampling.sample) and the trainer (logprobs), so a sampled token's log-prob is the same bits in both.
    torch's log_softmax reduces each row on its own (any number of rows and threads give the same row)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(z if temperature == 1.0 else z / temperature, -1)


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """x.sum() whose bits do not depend on the thread count: torch splits one long reduction over threads
    (where partial sums meet then depends on how many there are); here every reduction sums rows of 64
    elements, level by level, and rows are only ever shared out whole."""
    x = x.flatten()
    while x.numel() > 64:
        x = F.pad(x, (0, -x.numel() % 64)).view(-1, 64).sum(1)
    return x.sum()
