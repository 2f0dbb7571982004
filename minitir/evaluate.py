"""Evaluation metrics: unbiased pass@k, majority vote, and the per-benchmark summary eval.py prints.

A record is one sampled response: {"benchmark", "problem_id", "sample", "max_tool_calls", "answer",
"correct", "num_tool_calls", "num_tool_errors", "length" (all tokens), "policy_length" (the model's), "finish_reason",
...}.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _vote_key(answer: str | None) -> str | None:
    if answer is None:
        return None
    return re.sub(r"\s+", "", answer).strip("$").rstrip(".") or None


def majority_correct(samples: list[dict]) -> bool:
    """maj@n: the most frequent extracted answer (ties: the earliest sample's) and whether it is correct.
    Responses without an answer do not vote."""
    keys = [_vote_key(s.get("answer")) for s in samples]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return False
    best = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == best)
    return any(s["correct"] for s, k in zip(samples, keys) if k == winner)


def ks_for(n: int) -> list[int]:
    return [2 ** i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []


def summarize(records: list[dict]) -> dict:
    """{(benchmark, max_tool_calls) as "bench@calls": metrics} over the records."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[(r["benchmark"], r["max_tool_calls"])][r["problem_id"]].append(r)
    out = {}
    for (bench, calls), problems in sorted(groups.items()):
        n = min(len(v) for v in problems.values())
        flat = [r for v in problems.values() for r in v]
        m = {"benchmark": bench, "max_tool_calls": calls, "problems": len(problems), "n": n,
             f"avg@{n}": sum(r["correct"] for r in flat) / len(flat)}
        for k in ks_for(n):
            m[f"pass@{k}"] = sum(pass_at_k(len(v), sum(r["correct"] for r in v), k)
                                 for v in problems.values()) / len(problems)
        m[f"maj@{n}"] = sum(majority_correct(v) for v in problems.values()) / len(problems)
        calls_total = sum(r["num_tool_calls"] for r in flat)
        m.update({
            "code_ratio": sum(r["num_tool_calls"] > 0 for r in flat) / len(flat),
            "tool_calls_per_response": calls_total / len(flat),
            "tool_error_rate": sum(r["num_tool_errors"] for r in flat) / max(calls_total, 1),
            "tool_failures": sum(r.get("num_tool_failures", 0) > 0 for r in flat),   # the sandbox's, not the code's
            "response_length": sum(r["policy_length"] for r in flat) / len(flat),   # as in training: the
            "response_length_all": sum(r["length"] for r in flat) / len(flat),     # model's tokens; + tool output
            "truncation_rate": sum(r["finish_reason"] == "length" for r in flat) / len(flat),
        })
        out[f"{bench}@{calls}"] = m
    return out


def format_table(summary: dict) -> str:
    if not summary:
        return "(no results)"
    first = next(iter(summary.values()))
    n = first["n"]
    cols = ["benchmark", "max_tool_calls", "problems", f"avg@{n}"] + [f"pass@{k}" for k in ks_for(n)] + \
        [f"maj@{n}", "code_ratio", "tool_calls_per_response", "tool_error_rate", "response_length", "truncation_rate"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m in summary.values():
        cells = [m.get(c, "") for c in cols]
        lines.append("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)
