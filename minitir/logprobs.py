"""Per-token log-probabilities (and entropy) of target tokens without full [tokens x vocab] logits.

With Qwen's 151,936-token vocabulary, float32 logits for 16k tokens alone take 10 GB, and autograd
would keep them (and their softmax) for the backward pass. Here the lm_head product, logsumexp and
gather run chunk by chunk in forward, and backward recomputes each chunk's logits instead of storing
them: peak memory is one chunk of logits, whatever the number of tokens.
"""
from __future__ import annotations

import torch


def _acc(t):
    return torch.promote_types(t.dtype, torch.float32)


def _scaled_logits(h, w, temperature, out):
    """h [C, D], w [V, D] -> z [C, V] = (h w^T) / temperature, at least float32, written into `out` [>=C, V]
    when the dtypes allow: one buffer per call instead of a fresh vocabulary-sized tensor per chunk
    (on CPU every fresh allocation of that size is page-faulted in again)."""
    if h.dtype == out.dtype and not torch.is_autocast_enabled(h.device.type):
        z = torch.mm(h, w.t(), out=out[:h.shape[0]])
    else:
        z = (h @ w.t()).to(out.dtype)
    return z if temperature == 1.0 else z.div_(temperature)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):
        n, V = hidden.shape[0], weight.shape[0]
        acc = _acc(hidden)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        ent = torch.empty(n, dtype=acc, device=hidden.device) if with_entropy else None
        lse_all = torch.empty(n, dtype=acc, device=hidden.device)
        buf = torch.empty(min(chunk_size, n), V, dtype=acc, device=hidden.device)
        ebuf = torch.empty_like(buf) if with_entropy else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _scaled_logits(hidden[s:e], weight, temperature, buf)                  # [C, V]
            zt = z.gather(-1, targets[s:e, None]).squeeze(-1)                         # [C]
            m = z.amax(-1, keepdim=True)                                              # [C, 1]
            d = z.sub_(m)                                                             # z - max, in place
            ex = torch.exp(d, out=ebuf[:e - s]) if with_entropy else d.exp_()        # [C, V]
            se = ex.sum(-1)                                                           # [C]
            lse = m.squeeze(-1) + se.log()
            logp[s:e] = zt - lse
            lse_all[s:e] = lse
            if with_entropy:
                # H = lse - E_p[z] = log(se) - E_p[z - max]; row-wise dot products via bmm (no [C, V] temporary)
                ed = torch.bmm(ex.unsqueeze(1), d.unsqueeze(2)).view(-1)
                ent[s:e] = se.log() - ed / se
        ctx.save_for_backward(hidden, weight, targets, lse_all, ent if with_entropy else lse_all)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        return (logp, ent) if with_entropy else (logp, torch.empty(0, device=hidden.device))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse_all, ent = ctx.saved_tensors
        T, n = ctx.temperature, hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_hidden = torch.empty_like(hidden) if need_h else None
        g_weight = torch.zeros(weight.shape, dtype=_acc(weight), device=weight.device) if need_w else None
        with_ent = ctx.with_entropy and g_ent is not None
        buf = torch.empty(min(ctx.chunk_size, n), weight.shape[0], dtype=_acc(hidden), device=hidden.device)
        pbuf = torch.empty_like(buf) if with_ent else None
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h = hidden[s:e]
            logp_full = _scaled_logits(h, weight, T, buf).sub_(lse_all[s:e, None])   # [C, V], in place
            if with_ent:
                p = torch.exp(logp_full, out=pbuf[:e - s])
                # dH/dz_j = -p_j (log p_j + H)
                gz = logp_full.add_(ent[s:e, None]).mul_(p).mul_(-g_ent[s:e, None])
                gz.sub_(p.mul_(g_logp[s:e, None]))
            else:
                gz = logp_full.exp_().mul_(-g_logp[s:e, None])   # d logp_t / dz = onehot(t) - p
            gz.scatter_add_(-1, targets[s:e, None], g_logp[s:e, None])
            if T != 1.0:
                gz.div_(T)
            gz = gz.to(hidden.dtype)                               # [C, V], d/d(h W^T)
            if need_h:
                if gz.dtype == weight.dtype == g_hidden.dtype and not torch.is_autocast_enabled(gz.device.type):
                    torch.mm(gz, weight, out=g_hidden[s:e])
                else:
                    g_hidden[s:e] = gz @ weight
            if need_w:
                g_weight.addmm_(gz.t().to(g_weight.dtype), h.to(g_weight.dtype))
        return g_hidden, (g_weight.to(weight.dtype) if need_w else None), None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False):
    """hidden [N, D] (final-norm states), weight [V, D] (lm_head), targets [N] ->
    log p(target) [N] float32 under softmax(logits / temperature), and entropy [N] if asked (else None)."""
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets has {targets.shape[0]}")
    logp, ent = _TokenLogprobs.apply(hidden, weight, targets.long(), float(temperature), int(chunk_size),
                                     bool(with_entropy))
    return logp, (ent if with_entropy else None)


def sequence_logprobs(model, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, *, temperature: float = 1.0,
                      chunk_size: int = 1024, with_entropy: bool = False):
    """Log-probs of every token given its prefix, for packed sequences input_ids [N] / cu_seqlens [S+1].

    Returns logp [N] (and entropy [N] or None) where entry t scores input_ids[t] from position t-1;
    the first token of each sequence has no prefix and gets 0 (mask it out: it is the prompt anyway).
    """
    hidden = model.hidden_packed(input_ids, cu_seqlens)            # [N, D]
    n = input_ids.shape[0]
    # predict token t+1 from position t; the last position of a sequence predicts nothing
    targets = torch.roll(input_ids, -1)
    logp, ent = token_logprobs(hidden, model.lm_head.weight, targets, temperature=temperature,
                               chunk_size=chunk_size, with_entropy=with_entropy)
    first = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
    first[cu_seqlens[:-1].long()] = True
    zero = torch.zeros(1, dtype=logp.dtype, device=logp.device)
    shifted = torch.cat([zero, logp[:-1]]).masked_fill(first, 0.0)   # align to the scored token
    if ent is not None:
        ent = torch.cat([zero, ent[:-1]]).masked_fill(first, 0.0)
    return shifted, ent
