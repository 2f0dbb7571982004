"""Per-token log-probabilities (and entropy) of target tokens without full [tokens x vocab] logits.

With Qwen's 151,936-token vocabulary, float32 logits for 16k tokens alone take 10 GB, and autograd
would keep them (and their softmax) for the backward pass. Here the lm_head product, logsumexp and
gather run chunk by chunk in forward, and backward recomputes each chunk's logits instead of storing
them: peak memory is one chunk of logits, whatever the number of tokens.

`token_loss` goes one step further for training: given the per-token loss, it takes the loss's gradient
in forward, chunk by chunk, so backward needs no logits at all.
"""
from __future__ import annotations

import torch

from minitir import ops


def _acc(t):
    return torch.promote_types(t.dtype, torch.float32)


def _log_softmax(h, w, temperature, invariant):
    """h [C, D], w [V, D] -> log softmax((h w^T) / temperature) [C, V] float32, the product through
    ops._products in the compute dtype: the very numbers the sampler turned into this token's log-prob."""
    return ops.log_softmax(ops._product(h, w, None, invariant=invariant), temperature)


def _row_dot(a, b):
    """Row-wise dot products of [C, V] tensors -> [C]. torch splits a lone row's reduction over threads (so
    its bits would depend on the thread count): one row is reduced as two."""
    if a.shape[0] == 1:
        return torch.linalg.vecdot(torch.cat([a, a]), torch.cat([b, b]))[:1]
    return torch.linalg.vecdot(a, b)


def _grad_logits(p, logp_full, ent, g_logp, g_ent, targets, temperature):
    """dL/d(h W^T) [C, V] for L a function of logp = log p(target) and H, given p = softmax [C, V]
    (overwritten with the result) and, when g_ent is given, log p [C, V] (overwritten too) and H [C]."""
    if g_ent is not None:
        # dH/dz_j = -p_j (log p_j + H)
        gz = logp_full.add_(ent[:, None]).mul_(p).mul_(-g_ent[:, None])
        gz.sub_(p.mul_(g_logp[:, None]))
    else:
        gz = p.mul_(-g_logp[:, None])                                         # d logp_t / dz = onehot(t) - p
    gz.scatter_add_(-1, targets[:, None], g_logp[:, None])
    return gz.div_(temperature) if temperature != 1.0 else gz


def _head_grads(gz, h, weight, weight_t, g_hidden, g_weight):
    """gz [C, V] -> g_hidden (the chunk's rows [C, D], written) and g_weight [V, D] (accumulated)."""
    gz = gz.to(h.dtype)
    if g_hidden is not None:
        if weight_t is not None:   # CPU (float32, bfloat16): oneDNN, ~1.2x MKL on this product
            g_hidden.copy_(ops._product(gz, weight_t, None))
        elif gz.dtype == weight.dtype == g_hidden.dtype and not torch.is_autocast_enabled(gz.device.type):
            torch.mm(gz, weight, out=g_hidden)
        else:
            g_hidden.copy_(gz @ weight)
    if g_weight is not None:
        g_weight.addmm_(gz.t().to(g_weight.dtype), h.to(g_weight.dtype))


def _grad_buffers(hidden, weight, need_h, need_w):
    g_hidden = torch.empty_like(hidden) if need_h else None
    g_weight = torch.zeros(weight.shape, dtype=_acc(weight), device=weight.device) if need_w else None
    weight_t = weight.t().contiguous() if need_h and ops._onednn_ok(hidden, weight) else None
    return g_hidden, g_weight, weight_t


class _TokenLogprobs(torch.autograd.Function):
    """Chunked log-probs (and entropy). With loss_fn, also the loss sum_chunks loss_fn(logp, H, rows), whose
    gradient is taken per chunk in forward while the chunk's log-softmax is at hand: backward then only
    scales it, instead of recomputing the logits (one of the head's four vocabulary-sized products)."""

    @staticmethod
    @ops.amp_forward
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy, loss_fn, invariant):
        n = hidden.shape[0]
        acc = _acc(hidden)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        ent = torch.empty(n, dtype=acc, device=hidden.device) if with_entropy else None
        fused = loss_fn is not None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if fused:
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            g_hidden, g_weight, weight_t = _grad_buffers(hidden, weight, need_h, need_w)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logp_full = _log_softmax(hidden[s:e], weight, temperature, invariant)        # [C, V]
            logp[s:e] = logp_full.gather(-1, targets[s:e, None]).squeeze(-1)
            p = logp_full.exp() if with_entropy or fused else None                         # softmax [C, V]
            if with_entropy:
                ent[s:e] = -_row_dot(p, logp_full)
            if not fused:
                continue
            # the chunk's loss and its gradient w.r.t. logp [C] and H [C], through loss_fn's own autograd graph
            lp = logp[s:e].detach().requires_grad_()
            en = ent[s:e].detach().requires_grad_() if with_entropy else None
            with torch.enable_grad():
                chunk_loss = loss_fn(lp, en, slice(s, e))
            loss += chunk_loss.detach().float()
            if not (need_h or need_w) or not chunk_loss.requires_grad:
                if need_h:
                    g_hidden[s:e] = 0
                continue
            grads = torch.autograd.grad(chunk_loss, [lp] if en is None else [lp, en], allow_unused=True)
            g_lp = torch.zeros_like(lp) if grads[0] is None else grads[0]
            g_en = grads[1] if len(grads) > 1 else None   # None too when loss_fn does not use H
            gz = _grad_logits(p, logp_full if g_en is not None else None, ent[s:e] if g_en is not None else None,
                              g_lp, g_en, targets[s:e], temperature)
            _head_grads(gz, hidden[s:e], weight, weight_t, g_hidden[s:e] if need_h else None, g_weight)
        ctx.fused, ctx.weight_dtype = fused, weight.dtype
        if fused:
            ctx.save_for_backward(g_hidden, g_weight)
            ctx.mark_non_differentiable(logp, *([ent] if with_entropy else []))
        else:
            ctx.save_for_backward(hidden, weight, targets, ent if with_entropy else logp)
            ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
            ctx.invariant = invariant
        return logp, (ent if with_entropy else torch.empty(0, device=hidden.device)), loss

    @staticmethod
    @ops.amp_backward
    def backward(ctx, g_logp, g_ent, g_loss):
        if ctx.fused:
            # scaled in place: a copy of the float32 weight gradient would add its size to the peak
            if getattr(ctx, "consumed", False):
                raise RuntimeError("token_loss: backward runs once per forward (retain_graph is not supported)")
            ctx.consumed = True
            g_hidden, g_weight = ctx.saved_tensors
            gh = None if g_hidden is None else g_hidden.mul_(g_loss.to(g_hidden.dtype))
            gw = None if g_weight is None else g_weight.mul_(g_loss).to(ctx.weight_dtype)
            return gh, gw, None, None, None, None, None, None
        hidden, weight, targets, ent = ctx.saved_tensors
        T, n = ctx.temperature, hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_hidden, g_weight, weight_t = _grad_buffers(hidden, weight, need_h, need_w)
        with_ent = ctx.with_entropy and g_ent is not None
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            logp_full = _log_softmax(hidden[s:e], weight, T, ctx.invariant)                 # [C, V], recomputed
            gz = _grad_logits(logp_full.exp(), logp_full if with_ent else None, ent[s:e] if with_ent else None,
                              g_logp[s:e], g_ent[s:e] if with_ent else None, targets[s:e], T)
            _head_grads(gz, hidden[s:e], weight, weight_t, g_hidden[s:e] if need_h else None, g_weight)
        return g_hidden, (g_weight.to(weight.dtype) if need_w else None), None, None, None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False,
                   invariant: bool = False):
    """hidden [N, D] (final-norm states), weight [V, D] (lm_head), targets [N] -> log p(target) [N] (float32,
    or hidden's dtype if wider) under softmax(logits / temperature), and entropy [N] if asked (else None).
    invariant: the head's product batch invariant on CUDA too (ops._products), as the decoder's."""
    return token_loss(hidden, weight, targets, None, temperature=temperature, chunk_size=chunk_size,
                      with_entropy=with_entropy, invariant=invariant)[1:]


def token_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_fn, *,
               temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False,
               invariant: bool = False):
    """A loss over per-token log-probs, fused into the chunked head. -> (loss [], logp [N], entropy [N] or None).

    loss_fn(logp [C], entropy [C] or None, rows: slice) -> scalar is called once per chunk of rows `rows`
    and loss is the sum of its values; its gradient w.r.t. hidden and weight is computed chunk by chunk in
    forward, so backward does no vocabulary-sized work. A loss that is a sum over tokens (every loss in
    minitir.rl, weighted by rl.token_weights) is exactly this sum. logp and entropy come back detached
    (loss_fn None: no loss, and their gradients flow: `token_logprobs`)."""
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets has {targets.shape[0]}")
    logp, ent, loss = _TokenLogprobs.apply(hidden, weight, targets.long(), float(temperature), int(chunk_size),
                                           bool(with_entropy), loss_fn, invariant)
    return loss, logp, (ent if with_entropy else None)
