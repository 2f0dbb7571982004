"""GRPO-RoC's Resample-on-Correct (rStar2-Agent, arXiv 2508.20722, section 2.2; code: microsoft/rStar,
rstar2_agent/down_sample/roc.py): sample K x n responses per problem, keep n, and keep the better correct
ones, so that responses which reach the right answer through failing code are not reinforced.

- How many of each: the group's proportion, round(negatives / K) negatives (Python's round, half to even, as
  the released code), the rest positives; at least min(2, available) of each class is kept (the released
  code's floor), so a rare correct response is not rounded away.
- Negatives (incorrect): uniformly at random, as the paper says. The code released on 2025-08-29 ranked
  them by the same penalty as the positives (removed on 2025-09-05, PR #50, which takes them in rollout
  order; rollouts are exchangeable, so that is uniform in distribution).
- Positives (correct): the lowest penalty first, ties at random, as the released code does; the paper
  instead samples them with probability inversely proportional to the penalty. Penalty = p_err + p_format:
  p_err the share of the response's tool calls that failed (0.5 with no tool call: a correct answer found
  without code is neither rewarded nor punished for it), p_format 1 when the response fails the format
  gate (possible under --reward lenient; the strict reward never calls such a response correct). The
  released code finds errors by the word "error" in the tool output, minitir by the run's status.
- Responses the grader or the sandbox failed on are not candidates (they are kept out of the loss anyway).
Group statistics (the baselines) are then computed over the n kept, as in the released code.
"""
from __future__ import annotations

import random


def penalty(num_tool_calls: int, num_tool_errors: int, format_ok: bool) -> float:
    """p_err + p_format of a correct response (0 .. 2, lower is better)."""
    p_err = num_tool_errors / num_tool_calls if num_tool_calls else 0.5
    return p_err + (0.0 if format_ok else 1.0)


def kept_counts(positives: int, negatives: int, n: int) -> tuple[int, int]:
    """-> (positives kept, negatives kept), summing to min(n, positives + negatives)."""
    total = positives + negatives
    if total <= n:
        return positives, negatives
    neg = min(max(round(negatives * n / total), min(2, negatives)), negatives)
    neg = max(neg, n - positives)   # too few positives to fill the rest
    pos = n - neg
    if pos < min(2, positives):
        pos = min(2, positives)
        neg = n - pos
    return pos, neg


def downsample(correct: list[bool], penalties: list[float], n: int, rng: random.Random) -> list[int]:
    """The indices (ascending) of the n responses kept from one oversampled group of graded responses."""
    pos = [i for i, c in enumerate(correct) if c]
    neg = [i for i, c in enumerate(correct) if not c]
    k_pos, k_neg = kept_counts(len(pos), len(neg), n)
    rng.shuffle(pos)                                   # ties among positives at random
    pos.sort(key=lambda i: penalties[i])               # then the lowest penalty first (a stable sort)
    return sorted(pos[:k_pos] + rng.sample(neg, k_neg))
