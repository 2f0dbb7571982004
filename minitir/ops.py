"""The model's products and its two fused operations with hand-written backward passes.

`linear` is F.linear with the forward product in oneDNN on x86 CPUs (see _ONEDNN); inside
`packed_weights()` the weights are reordered once for a whole `generate` call.

Autograd would keep every intermediate of RMSNorm and SwiGLU alive until backward: per token and layer,
the normalised input twice and three [intermediate]-sized tensors (silu(gate), silu(gate)*up, ...).
`norm_linears` and `mlp` keep only what cannot be recomputed cheaply (the norm's input and 1/rms, gate
and up) and redo the elementwise work in backward, which cuts activation memory roughly in half at no
cost in matrix products; `mlp(..., recompute=True)` (selective checkpointing) also reruns gate/up.
"""
from __future__ import annotations

import functools
import os
import platform
import weakref
from contextlib import contextmanager

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


def _onednn_ok(x, w) -> bool:
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == w.dtype and x.dtype in _DTYPES
            and type(w) in (torch.Tensor, torch.nn.Parameter) and not torch.is_autocast_enabled("cpu"))


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


_packing = False   # inside `packed_weights()`
_PACKED: dict = {}   # id of a group's first weight -> (weakref to it, ids, versions, packed weight, bias)


@contextmanager
def packed_weights():
    """Within this block, CPU float32/bfloat16 products without autograd use weights reordered into oneDNN's
    blocked layout, and linears sharing an input (q/k/v, gate/up) run as one product with their weights
    stacked. Decoding reads every weight once per token; reordering it in every call was a third of the
    product's time at batch 16. The packed copies (as large as the weights) are kept beside the weights
    and reused by later blocks until a weight changes (an optimizer step): packing took ~0.15 s of every
    generate call's start for SmolLM2-135M. They go when the weights do."""
    global _packing
    outer, _packing = _packing, _ONEDNN
    try:
        yield
    finally:
        _packing = outer


def _packed_weight(ws, bs):
    key, ids = id(ws[0]), tuple(map(id, (*ws, *bs)))
    version = tuple(t._version for t in (*ws, *bs) if t is not None)
    entry = _PACKED.get(key)
    if entry is None or entry[0]() is not ws[0] or entry[1] != ids or entry[2] != version:
        w = torch.cat([w.detach() for w in ws])
        b = None if bs[0] is None else torch.cat([b.detach() for b in bs])
        alive = weakref.ref(ws[0], lambda _, k=key: _PACKED.pop(k, None))   # the copy goes with the weight
        entry = _PACKED[key] = (alive, ids, version, torch.ops.mkldnn._reorder_linear_weight(w, 16), b)
    return entry[3], entry[4]


def _products(x, ws, bs) -> tuple[torch.Tensor, ...]:
    """x [..., in] @ w_i[out_i, in]^T + b_i for each i, without autograd."""
    if not _onednn_ok(x, ws[0]):
        return tuple(F.linear(x, w, b) for w, b in zip(ws, bs))
    x2 = x.reshape(-1, x.shape[-1])
    if _packing and not torch.is_grad_enabled() and len({b is None for b in bs}) == 1:
        w, b = _packed_weight(ws, bs)
        y = torch.ops.mkldnn._linear_pointwise(x2, w, b, "none", [], "").view(*x.shape[:-1], -1)
        return y.split([w.shape[0] for w in ws], -1) if len(ws) > 1 else (y,)
    return tuple(torch.ops.mkldnn._linear_pointwise(x2, w, b, "none", [], "").view(*x.shape[:-1], -1)
                 for w, b in zip(ws, bs))


def _product(x, w, b):
    return _products(x, (w,), (b,))[0]


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
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_b = b is not None
        return _product(x, w, b)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = grad_input(gy2, w).view(x.shape) if ctx.needs_input_grad[0] else None
        gw = gy2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = gy2.sum(0) if ctx.has_b and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b), with the forward product in oneDNN on x86 CPUs (see _ONEDNN)."""
    if not _onednn_ok(x, w):
        return F.linear(x, w, b)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _Linear.apply(x, w, b)
    return _product(x, w, b)


def _norm(x, norm_w, eps):
    """RMSNorm as the reference implementations compute it: statistics in float32. -> (x_hat, n, rstd)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)          # [N, 1]
    xhat = (xf * rstd).to(x.dtype)                                      # [N, D]
    return xhat, norm_w * xhat, rstd


def _norm_linears_backward(x, rstd, norm_w, wb, gys, needs_bias):
    """Gradients of y_i = norm(x) @ W_i^T + b_i given dL/dy_i -> (dx, d norm_w, [dW_0, db_0, ...])."""
    xhat = (x.float() * rstd).to(x.dtype)                               # recomputed [N, D]
    n = norm_w * xhat
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
    silu = F.silu(g)                                                    # [N, F]
    g_W = gout.t() @ (silu * u)                                         # [D, F]
    g_prod = grad_input(gout, W)                                        # [N, F]
    g_u = g_prod * silu
    g_g = torch.ops.aten.silu_backward(g_prod.mul_(u), g)               # (g_prod * u) * silu'(g)
    return g_g, g_u, g_W, gout.sum(0) if has_b else None


class _NormLinears(torch.autograd.Function):
    """y_i = (rmsnorm(x) * w) @ W_i^T + b_i for several linears sharing one normalised input."""

    @staticmethod
    @amp_forward
    def forward(ctx, x, norm_w, eps, *wb):
        # x [N, D]; wb = (W_0, b_0, W_1, b_1, ...) with b_i possibly None
        _, n, rstd = _norm(x, norm_w, eps)
        ctx.save_for_backward(x, rstd, norm_w, *wb)
        return _products(n, wb[0::2], wb[1::2])

    @staticmethod
    @amp_backward
    def backward(ctx, *gys):
        x, rstd, norm_w, *wb = ctx.saved_tensors
        has_b = [wb[i + 1] is not None for i in range(0, len(wb), 2)]
        gx, g_norm_w, grads = _norm_linears_backward(x, rstd, norm_w, wb, gys, has_b)
        return (gx, g_norm_w, None, *grads)


def norm_linears(x: torch.Tensor, norm, linears) -> tuple[torch.Tensor, ...]:
    """RMSNorm module `norm` then each nn.Linear in `linears`, on x [..., D] -> tuple of [..., out_i]."""
    shape = x.shape[:-1]
    if not torch.is_grad_enabled():  # decoding: the same math without autograd's bookkeeping
        _, n, _ = _norm(x, norm.weight, norm.eps)
        return _products(n, [lin.weight for lin in linears], [lin.bias for lin in linears])
    wb = [t for lin in linears for t in (lin.weight, lin.bias)]
    ys = _NormLinears.apply(x.reshape(-1, x.shape[-1]), norm.weight, norm.eps, *wb)
    return tuple(y.view(*shape, -1) for y in ys)


class _SwiGLUDown(torch.autograd.Function):
    """(silu(g) * u) @ W^T + b, keeping g and u only."""

    @staticmethod
    @amp_forward
    def forward(ctx, g, u, W, b):
        ctx.save_for_backward(g, u, W)
        ctx.has_b = b is not None
        return _product(F.silu(g) * u, W, b)

    @staticmethod
    @amp_backward
    def backward(ctx, gout):
        g, u, W = ctx.saved_tensors
        return _swiglu_down_backward(g, u, W, gout, ctx.has_b)


class _RecomputedMLP(torch.autograd.Function):
    """down(silu(gate(norm(x))) * up(norm(x))) keeping only x and 1/rms: gate and up are recomputed in
    backward (two of the layer's seven matrix products) instead of stored (over half its activations)."""

    @staticmethod
    @amp_forward
    def forward(ctx, x, norm_w, eps, Wg, bg, Wu, bu, Wd, bd):
        _, n, rstd = _norm(x, norm_w, eps)
        ctx.save_for_backward(x, rstd, norm_w, Wg, bg, Wu, bu, Wd)
        ctx.has_b = (bg is not None, bu is not None, bd is not None)
        return _product(F.silu(_product(n, Wg, bg)) * _product(n, Wu, bu), Wd, bd)

    @staticmethod
    @amp_backward
    def backward(ctx, gout):
        x, rstd, norm_w, Wg, bg, Wu, bu, Wd = ctx.saved_tensors
        n = norm_w * (x.float() * rstd).to(x.dtype)                      # recomputed [N, D]
        g, u = _product(n, Wg, bg), _product(n, Wu, bu)
        g_g, g_u, g_Wd, g_bd = _swiglu_down_backward(g, u, Wd, gout, ctx.has_b[2])
        gx, g_norm_w, (g_Wg, g_bg, g_Wu, g_bu) = _norm_linears_backward(
            x, rstd, norm_w, (Wg, bg, Wu, bu), (g_g, g_u), ctx.has_b[:2])
        return gx, g_norm_w, None, g_Wg, g_bg, g_Wu, g_bu, g_Wd, g_bd


def swiglu_down(g: torch.Tensor, u: torch.Tensor, down) -> torch.Tensor:
    """down(silu(g) * u) for g, u [..., F] and an nn.Linear `down`."""
    if not torch.is_grad_enabled():
        return _product(F.silu(g) * u, down.weight, down.bias)
    shape = g.shape[:-1]
    out = _SwiGLUDown.apply(g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1]), down.weight, down.bias)
    return out.view(*shape, -1)


def mlp(x: torch.Tensor, norm, gate, up, down, recompute: bool = False) -> torch.Tensor:
    """The SwiGLU MLP on norm(x), x [..., D]; with recompute, gate/up activations are not stored."""
    if not recompute:
        g, u = norm_linears(x, norm, (gate, up))
        return swiglu_down(g, u, down)
    shape = x.shape[:-1]
    out = _RecomputedMLP.apply(x.reshape(-1, x.shape[-1]), norm.weight, norm.eps, gate.weight, gate.bias,
                               up.weight, up.bias, down.weight, down.bias)
    return out.view(*shape, -1)
