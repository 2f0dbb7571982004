"""One token per row from the model's logits: temperature, top-k, top-p, and the log-prob of what was chosen."""
from __future__ import annotations

import torch

from minitir.ops import log_softmax


def sample(logits: torch.Tensor, generators: list, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> tuple[list[int], list[float]]:
    """logits [B, V] -> (ids [B], log-probs [B]). temperature 0 is greedy; generators[b] is row b's
    torch.Generator (None: the default one).

    The log-prob is that of the distribution each id was actually drawn from (the behaviour policy of
    truncated importance sampling): softmax(logits / T), restricted to the top-k / top-p set and
    renormalised when either truncates. Without truncation this is the policy's own softmax(logits / T),
    which the trainer recomputes; with it, a kept token's sampling probability is higher than the
    policy's. Greedy: log p under softmax(logits) (evaluation only; the choice itself is certain)."""
    logp = log_softmax(logits, temperature if temperature > 0 else 1.0)                          # [B, V]
    if temperature <= 0:
        ids = logits.argmax(-1)
    else:
        kept = _top_p(_top_k(logp, top_k), top_p, renormalise=top_k > 0)                       # -inf: cut
        ids = gumbel_max(kept, generators)
        if kept is not logp:   # truncated: the sampled distribution is the kept set, renormalised
            logp = kept.log_softmax(-1)
    return ids.tolist(), logp.gather(-1, ids[:, None]).squeeze(-1).tolist()


HEAD = 128   # tokens that get their own noise in gumbel_max


def gumbel_max(logp: torch.Tensor, generators: list) -> torch.Tensor:
    """logp [B, V] (-inf: filtered out; need not be normalised) -> ids [B]: row b's token i with probability
    exp(logp_i) / sum_j exp(logp_j), drawn from generators[b] alone.

    Gumbel-max: argmax_i (logp_i + G_i), G_i = -log(-log u_i) ~ Gumbel(0, 1), is i with that probability (the
    exponential race torch.multinomial runs too). Each row draws from its own generator, so its samples do not
    depend on which others share the batch, and the race changes its winner only on a near-tie, so neither do
    last-bit logit differences between batch sizes. Noise for all V tokens (V uniforms per row from a
    sequential generator, two logs over [B, V]) took ~6 ms of a batch-16 decode step; so only the HEAD most
    likely tokens get their own noise. The best noisy score of the rest (the tail) is Gumbel distributed
    around the tail's logsumexp (max-stability) and independent of which tail token holds it: one uniform
    decides whether the tail wins, and only then (as often as the tail's mass: ~14% of SmolLM2's rows at
    T=1) does the row draw noise for the whole tail to pick its token. Same distribution, ~2.3 ms."""
    B, V = logp.shape
    K = min(HEAD, V)
    top, idx = logp.topk(K, dim=-1)                                                         # [B, K]
    rest = logp.scatter(-1, idx, float("-inf"))                                             # the tail [B, V]
    u = torch.empty(B, K + 1, dtype=logp.dtype, device=logp.device)
    for b, g in enumerate(generators):
        u[b].uniform_(generator=g)
    noise = _gumbel_(u)                                                                     # [B, K + 1]
    best, at = (top + noise[:, :K]).max(-1)                                                 # [B]
    ids = idx.gather(-1, at[:, None]).squeeze(-1)
    tail_wins = rest.logsumexp(-1) + noise[:, K] > best                                     # [B]
    for b in tail_wins.nonzero().flatten().tolist():
        ids[b] = (rest[b] + _gumbel_(torch.empty_like(rest[b]).uniform_(generator=generators[b]))).argmax()
    return ids


def _gumbel_(u: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) -> Gumbel(0, 1) noise -log(-log u), in place (u = 0 gives -inf: never chosen)."""
    return u.log_().neg_().log_().neg_()


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
