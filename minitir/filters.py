"""Which responses leave the batch after grading, and why: the paper's replay-buffer filters and the void-turn
mask. Each returns a reason (a metric name) or None; the trainer counts the reasons.

- overlong   (paper: exp_filter_fn's overlong_filter): the response hit the length limit without a correct
             answer. It is dropped rather than scored 0, so a long budget is not taught to be bad.
- repetitive (paper: use_replay_buffer_filter, threshold 0.05): a correct response whose text repeats
             itself (`repeatness` above the threshold) is dropped, so degenerate loops are not reinforced.
             The text scored is the whole response, tool output blocks included, as the paper scores
             its output_text (env/math/math_reward_tir.py); the prompt is not part of it.

`mask_reason` says why a kept response carries no loss tokens (it still counts in its group's statistics):
- truncated  (mask_truncated): cut at the length limit.
- void       (mask_void_turns; beyond the paper, after SimpleTIR's void turns): a response that wrote code
             which never ran, or ended without a final answer.
"""
from __future__ import annotations

import re

CODE_OPEN = re.compile(r"```python")


def repeatness(text: str) -> float:
    """The paper's repetition score (env/common/repeatness.py): 2 * sum(LCP) / (n (n + 1)) over the suffix
    array of the characters. sum(LCP) counts the substring occurrences that repeat one seen before, so
    this is 1 - (distinct substrings) / (all n (n + 1) / 2 substrings): 0 for text without repeats, near 1
    for one character repeated. Distinct substrings are counted with a suffix automaton, O(n)."""
    n = len(text)
    if n <= 1:
        return 0.0
    length, link, nxt = [0], [-1], [{}]          # state 0: the empty string
    last = 0
    for ch in text:
        cur = len(length)
        length.append(length[last] + 1), link.append(0), nxt.append({})
        p = last
        while p != -1 and ch not in nxt[p]:
            nxt[p][ch] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][ch]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:  # split q: a clone with the shorter length takes over its incoming edges from p's chain
                clone = len(length)
                length.append(length[p] + 1), link.append(link[q]), nxt.append(dict(nxt[q]))
                while p != -1 and nxt[p].get(ch) == q:
                    nxt[p][ch] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        last = cur
    distinct = sum(length[v] - length[link[v]] for v in range(1, len(length)))
    return 1.0 - distinct / (n * (n + 1) / 2)


def drop_reason(finish_reason: str, text: str, correct: bool, overlong: bool, repetition: float) -> str | None:
    """Why the paper's filters drop this response from the batch, or None to keep it.
    overlong: drop responses cut at the length limit that are not correct; repetition: the repeatness
    threshold for correct responses (0 = off)."""
    if overlong and finish_reason == "length" and not correct:
        return "overlong"
    if repetition > 0 and correct and repeatness(text) > repetition:
        return "repetitive"
    return None


def mask_reason(finish_reason: str, policy_text: str, tool_calls: int, has_answer: bool, mask_truncated: bool,
                mask_void: bool) -> str | None:
    """Why a kept response's tokens stay out of the loss ("truncated", "void"), or None to train on them."""
    if mask_truncated and finish_reason == "length":
        return "truncated"
    if mask_void and is_void(policy_text, tool_calls, has_answer):
        return "void"
    return None


def is_void(policy_text: str, tool_calls: int, has_answer: bool) -> bool:
    """Wrote a code block that never ran (more ```python openings than executed calls), or ended without
    a final answer."""
    return len(CODE_OPEN.findall(policy_text)) > tool_calls or not has_answer
