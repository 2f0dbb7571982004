"""Samples into the trainer's forward passes: packing into micro-batches under a token budget, and the
positions whose next token the policy chose (loss_mask == 1), as flat tensors and back."""
from __future__ import annotations

import torch

from minitir.generate import Completion
from minitir.rollout import Sample


def micro_batches(samples: list[Sample], budget: int, count: int | None = None) -> list[list[Sample]]:
    """Greedy packing in order under `budget` tokens (a sequence is prompt + completion; one always fits,
    config.validate checks); samples without loss tokens are left out. With count (FSDP: every forward is
    a collective, so every rank runs as many as the busiest), empty micro-batches pad the list to count."""
    out, cur, used = [], [], 0
    for s in samples:
        if not any(s.loss_mask):
            continue
        n = len(s.prompt_ids) + len(s.completion.tokens)
        if cur and used + n > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(s)
        used += n
    out += [cur] if cur else []
    return out + [[] for _ in range((count or 0) - len(out))]


def placeholder(eos: int) -> list[Sample]:
    """One one-token sample: what a rank with an empty micro-batch computes (and multiplies by 0) so that
    it joins its peers' collectives."""
    return [Sample(prompt_ids=[eos], completion=Completion([eos], [0.0], [1], "", "stop"), gold="", loss_mask=[1])]


def policy_positions(samples: list[Sample], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples packed back to back -> (token ids [N], cu_seqlens [S+1] int32, the positions of the policy's
    tokens [M] (loss_mask == 1, in order), each one's sequence index [M]). The hidden state that predicts
    the token at position p is the one at p - 1."""
    ids, cu, sel, seq_index = [], [0], [], []
    for i, s in enumerate(samples):
        start = cu[-1] + len(s.prompt_ids)
        ids += s.prompt_ids + s.completion.tokens
        sel += [start + j for j, m in enumerate(s.loss_mask) if m]
        seq_index += [i] * sum(s.loss_mask)
        cu.append(len(ids))
    return (torch.tensor(ids, device=device), torch.tensor(cu, dtype=torch.int32, device=device),
            torch.tensor(sel, dtype=torch.long, device=device), torch.tensor(seq_index, dtype=torch.long, device=device))


def per_token(samples: list[Sample], key: str, device) -> torch.Tensor:
    """A per-policy-token list field of the samples (adv, old_logp, ...) as one flat tensor [M]."""
    return torch.tensor([v for s in samples for v in getattr(s, key)], device=device)


def generator_logprobs(samples: list[Sample], device) -> torch.Tensor:
    """The generator's log-probs at the policy tokens in the loss [M]."""
    return torch.tensor([lp for s in samples for lp, k in zip(s.completion.logprobs, s.loss_mask) if k], device=device)


def per_sample(flat: torch.Tensor, samples: list[Sample], seq_index: torch.Tensor) -> list[list[float]]:
    """A flat per-token tensor [M] back to one list per sample (none for a placeholder's empty list)."""
    if not samples:
        return []
    out = [[] for _ in samples]
    for v, i in zip(flat.tolist(), seq_index.tolist()):
        out[i].append(v)
    return out
