"""Samples into the trainer's forward passes: micro-batches under a token budget, each packed into one
forward pass (a group's prompt once), with the positions whose next token the policy chose (loss_mask == 1),
as flat tensors and back."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minitir.sample import Completion, Sample


def micro_batches(samples: list[Sample], budget: int) -> list[list[Sample]]:
    """Greedy packing in order under `budget` tokens (a sample counts its completion, and its prompt unless
    the previous sample in the micro-batch has the same one; one sample always fits, config.validate
    checks); samples without loss tokens are left out."""
    out, cur, used = [], [], 0
    for s in samples:
        if not any(s.loss_mask):
            continue
        shared = bool(cur) and cur[-1].prompt_ids == s.prompt_ids     # packed once per group (see pack)
        n = len(s.completion.tokens) + (0 if shared else len(s.prompt_ids))
        if cur and used + n > budget:
            out.append(cur)
            cur, used = [], 0
            n = len(s.prompt_ids) + len(s.completion.tokens)
        cur.append(s)
        used += n
    return out + ([cur] if cur else [])


def placeholder(eos: int) -> list[Sample]:
    """One one-token sample: what a rank with an empty micro-batch computes (and multiplies by 0) so that
    it joins its peers' collectives."""
    return [Sample(prompt_ids=[eos], completion=Completion([eos], [0.0], [1], "", "stop"), gold="", loss_mask=[1])]


@dataclass
class Packed:
    """Samples as one packed forward pass (`Transformer.hidden_packed`). A prompt is packed once for the
    consecutive samples that share it (a group's responses), each response a sequence that continues it."""
    ids: torch.Tensor          # [N] tokens: prompts and responses back to back
    cu_seqlens: torch.Tensor   # [S+1] int32 sequence boundaries in ids
    continues: list[int]       # [S] the prompt sequence a response continues (-1: a prompt)
    pred: torch.Tensor         # [M] for each policy token (loss_mask == 1, in order): the position predicting it
    targets: torch.Tensor      # [M] the policy token
    seq_index: torch.Tensor    # [M] its sample's index


def pack(samples: list[Sample], device) -> Packed:
    ids, cu, continues, pred, targets, seq_index = [], [0], [], [], [], []
    prompt = -1   # the sequence index of the prompt being continued
    for i, s in enumerate(samples):
        if not (i and samples[i - 1].prompt_ids == s.prompt_ids):
            ids += s.prompt_ids
            cu.append(len(ids))
            continues.append(-1)
            prompt = len(continues) - 1
        start, prompt_end = len(ids), cu[prompt + 1] - 1
        ids += s.completion.tokens
        cu.append(len(ids))
        continues.append(prompt)
        for j, (t, m) in enumerate(zip(s.completion.tokens, s.loss_mask)):
            if m:   # token j is predicted at the position before it: for j = 0, the prompt's last one
                pred.append(start + j - 1 if j else prompt_end)
                targets.append(t)
                seq_index.append(i)
    long = dict(dtype=torch.long, device=device)
    return Packed(torch.tensor(ids, device=device), torch.tensor(cu, dtype=torch.int32, device=device), continues,
                  torch.tensor(pred, **long), torch.tensor(targets, **long), torch.tensor(seq_index, **long))


def per_token(samples: list[Sample], key: str, device) -> torch.Tensor:
    """A per-policy-token list field of the samples (adv, old_logp, ...) as one flat tensor [M]."""
    return torch.tensor([v for s in samples for v in getattr(s, key)], device=device)


def behaviour_logprobs(samples: list[Sample], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples' old_logp as one flat tensor [M], and [M] bool: where a sample holds none (it is trained
    in one update by the weights that generated it) the update's own detached log-probs stand in, marked
    False, with 0 as the placeholder value."""
    vals, held = [], []
    for s in samples:
        n = sum(s.loss_mask)
        if s.old_logp and len(s.old_logp) != n:
            raise ValueError(f"a sample holds {len(s.old_logp)} behaviour log-probs for {n} loss tokens")
        vals += s.old_logp or [0.0] * n
        held += [bool(s.old_logp)] * n
    return torch.tensor(vals, device=device), torch.tensor(held, dtype=torch.bool, device=device)


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
