"""One token per row from the model's logits: temperature, top-k, top-p, and the log-prob of what was chosen."""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, generators: list, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> tuple[list[int], list[float]]:
    """logits [B, V] -> (ids [B], log p(id) under softmax(logits / T), T = 1 when greedy). temperature 0 is
    greedy; generators[b] is row b's torch.Generator (None: the default one)."""
    logits = logits.float()
    logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)         # [B, V]
    if temperature <= 0:
        ids = logits.argmax(-1)
    else:
        filt = _top_p(_top_k(logp, top_k), top_p, renormalise=top_k > 0)
        # Gumbel-max: argmax_i (log p_i - log(-log u_i)) is i with probability p_i (-log u_i ~ Exp(1): the
        # exponential race torch.multinomial runs too). Each row draws its uniforms from its own generator,
        # so its samples do not depend on which others share the batch; the race changes its winner only on a
        # near-tie, so neither do last-bit logit differences between batch sizes (an inverse CDF would sum
        # them over the vocabulary). The logs run batched over [B, V]: one multinomial per row spent a fifth
        # of a decode step at batch 16 drawing its exponentials.
        u = torch.empty_like(filt)                                                          # [B, V]
        for b, g in enumerate(generators):
            u[b].uniform_(generator=g)
        ids = (filt - u.log_().neg_().log_()).argmax(-1)                                    # u = 0: -inf, never
    return ids.tolist(), logp.gather(-1, ids[:, None]).squeeze(-1).tolist()


def _top_k(logp: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0:
        return logp
    kth = torch.topk(logp, min(k, logp.shape[-1]), dim=-1).values[:, -1:]
    return logp.masked_fill(logp < kth, float("-inf"))


def _top_p(logp: torch.Tensor, p: float, renormalise: bool) -> torch.Tensor:
    """Keep the smallest prefix, by probability, whose mass reaches p. Sorting the whole vocabulary dominated a
    sampling step: take the k most likely tokens instead, k growing until their mass exceeds p in every row,
    so nothing past them can be kept. After top-k, top-p measures the mass of what top-k kept (renormalise,
    as HF and vLLM do)."""
    if p >= 1.0:
        return logp
    if renormalise:
        logp = logp.log_softmax(-1)
    k = min(64, logp.shape[-1])
    while True:
        top_lp, order = logp.topk(k, dim=-1)                                                # [B, k], descending
        probs = top_lp.exp()
        cum = probs.cumsum(-1)
        if k == logp.shape[-1] or bool((cum[:, -1] > p).all()):
            break
        k = min(4 * k, logp.shape[-1])
    drop = cum - probs > p                                                                  # mass before the token
    return torch.full_like(logp, float("-inf")).scatter(-1, order, top_lp.masked_fill(drop, float("-inf")))
