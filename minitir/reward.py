"""From a response to a reward: answer extraction, math-verify grading with a hard time limit, rewards.

math-verify (the grader the ZeroTIR paper used) can take seconds on a pathological answer (a power
tower, a huge factorial), and its own timeout uses signal.alarm, which only works in a main thread.
So checks run in worker processes, where math-verify's alarm works, and the parent also watches the
clock: a worker that does not answer in time is killed and replaced, and the check counts as wrong.
The trainer's threads and processes can call `grade` freely.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import re
import threading
from dataclasses import dataclass
from functools import lru_cache

# ------------------------------------------------------------------------------------------------
# extraction
# ------------------------------------------------------------------------------------------------
_BOXED = re.compile(r"\\(?:boxed|fbox)\b")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} / `\\boxed x` in text (nested braces handled)."""
    found = None
    for m in _BOXED.finditer(text):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    found = text[i + 1:j]
                    break
        elif i > m.end():  # `\boxed 5`: the next word
            word = re.match(r"[^\s$]+", text[i:])
            found = word.group(0) if word else found
    return found.strip() if found is not None else None


def extract_answer(response: str) -> str | None:
    """The last \\boxed answer inside the <answer> section, else the last \\boxed anywhere."""
    start = response.rfind("<answer>")
    if start != -1:
        end = response.find("</answer>", start)
        inside = last_boxed(response[start:end if end != -1 else len(response)])
        if inside is not None:
            return inside
    return last_boxed(response)


def has_answer_format(response: str) -> bool:
    """The zero_tir/zero_rl format: an <answer> section holding a \\boxed answer."""
    m = re.search(r"<answer>(.*?)</answer>", response, re.DOTALL)
    return bool(m) and last_boxed(m.group(1)) is not None


# ------------------------------------------------------------------------------------------------
# the comparison itself (runs inside a worker process)
# ------------------------------------------------------------------------------------------------
def _normalize(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\(?:dfrac|tfrac)", r"\\frac", s)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\:", "", s)
    return s.rstrip(".").strip()


@lru_cache(maxsize=4096)
def _parse(s: str, timeout_s: int):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse("\\boxed{" + s + "}", extraction_config=cfg, parsing_timeout=timeout_s)


def _compare(pred: str, gold: str, timeout_s: int) -> bool:
    from math_verify import verify
    p, g = _normalize(pred), _normalize(gold)
    if p == g:
        return True
    try:
        return bool(verify(_parse(g, timeout_s), _parse(p, timeout_s), timeout_seconds=timeout_s))
    except Exception:
        return False


def _worker(conn, timeout_s: int):
    import logging
    logging.disable(logging.WARNING)  # math-verify logs every timeout
    for p, g in (("0.5", "\\frac{1}{2}"), ("(1,2]", "[1,2)"), ("\\{1,2\\}", "\\{2,1\\}"), ("x=3", "3"),
                 ("\\sqrt{8}", "2\\sqrt{2}"), ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(1,2)"), ("30^\\circ", "30"),
                 ("\\text{A}", "B"), ("2\\pi", "6.28")):
        _compare(p, g, timeout_s)  # fill lazy imports and caches before the first real check
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        conn.send([_compare(p, g, timeout_s) for p, g in item])


# ------------------------------------------------------------------------------------------------
# the grader: a small pool of worker processes with a watchdog
# ------------------------------------------------------------------------------------------------
class Grader:
    """math_equal / grade with a hard time limit per check, usable from any thread."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0):
        self.timeout_s = max(1, int(round(timeout_s)))
        self._ctx = mp.get_context("spawn")  # never fork a trainer holding torch threads
        self._idle: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        for _ in range(workers):
            self._idle.put(self._start())

    def _start(self):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, args=(child, self.timeout_s), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def _ask(self, pairs: list[tuple[str, str]]) -> list[bool]:
        proc, conn = self._idle.get()
        try:
            conn.send(pairs)
            # math-verify checks its own limit for parse and verify of each side; allow all of them
            if conn.poll(len(pairs) * 3 * self.timeout_s + 5):
                out = conn.recv()
                self._idle.put((proc, conn))
                return out
        except (EOFError, OSError, BrokenPipeError):
            pass
        proc.kill()  # stuck past every limit, or dead: replace it; the checks count as wrong
        proc.join()
        self._idle.put(self._start())
        return [False] * len(pairs) if len(pairs) == 1 else [self._ask([p])[0] for p in pairs]

    def math_equal(self, pred: str | None, gold: str) -> bool:
        if pred is None or not str(pred).strip():
            return False
        if _normalize(str(pred)) == _normalize(str(gold)):
            return True  # no round trip for the common exact match
        return self._ask([(str(pred), str(gold))])[0]

    def grade(self, response: str, gold: str) -> bool:
        return self.math_equal(extract_answer(response), gold)

    def math_equal_many(self, pairs: list[tuple[str | None, str]], batch: int = 16) -> list[bool]:
        """Many checks spread over the workers (results in input order)."""
        out: list[bool | None] = [None] * len(pairs)
        todo = []
        for i, (p, g) in enumerate(pairs):
            if p is None or not str(p).strip():
                out[i] = False
            elif _normalize(str(p)) == _normalize(str(g)):
                out[i] = True
            else:
                todo.append(i)
        chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]

        def run(chunk):
            for i, r in zip(chunk, self._ask([(str(pairs[i][0]), str(pairs[i][1])) for i in chunk])):
                out[i] = r

        threads = [threading.Thread(target=lambda c=c: run(c)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out  # type: ignore[return-value]

    def close(self):
        while not self._idle.empty():
            proc, conn = self._idle.get()
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(timeout=1)
            if proc.is_alive():
                proc.kill()


_default: Grader | None = None
_default_lock = threading.Lock()


def default_grader() -> Grader:
    """The shared grader behind `grade` / `math_equal` (started on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Grader()
        return _default


def math_equal(pred: str, gold: str) -> bool:
    """Whether two final answers are mathematically equal (math-verify, time-limited)."""
    return default_grader().math_equal(pred, gold)


def grade(response: str, gold: str) -> bool:
    """Extract the answer from a response, then compare it with the gold answer."""
    return default_grader().grade(response, gold)


# ------------------------------------------------------------------------------------------------
# rewards
# ------------------------------------------------------------------------------------------------
@dataclass
class RewardConfig:
    correct: float = 1.0
    wrong: float = 0.0
    format_penalty: float = 0.0      # subtracted when the response lacks <answer>...\boxed{}...</answer>
    truncation_penalty: float = 0.0  # subtracted when the response was cut at the length limit


def outcome_reward(correct: bool, response: str, truncated: bool, cfg: RewardConfig) -> float:
    """The paper's default is 1 for a correct final answer and 0 otherwise; the penalties are off."""
    r = cfg.correct if correct else cfg.wrong
    if cfg.format_penalty and not has_answer_format(response):
        r -= cfg.format_penalty
    if cfg.truncation_penalty and truncated:
        r -= cfg.truncation_penalty
    return r
