"""From a response to a reward: answer extraction, the paper's strict reward, math-verify grading with a
hard time limit.

The ZeroTIR reward (`zero_tir_reward`, read in the paper's code: env/common/zero_template_format_score.py
and env/math/math_reward_tir.py) is 1 only when three gates pass: the response has the answer format
(`</think>`, `<answer>` and `</answer>` once each, a `\\boxed{}` inside the answer, at most a few tokens
after `</answer>`), it ended normally (a stop string or EOS, not the length limit), and the last
`\\boxed{}` after `</think>` equals the gold answer under math-verify. Text inside an ```output block
is the tool's, never the model's answer: every function here ignores it.

Grading runs in worker processes started as `python -m minitir.reward --worker`, so math-verify's
signal-based timeout works (it needs a main thread) and nothing re-imports the caller's main module. A
worker that does not answer in time, or dies, is replaced and each check it held is tried again on its own;
a check that fails twice on its own is an error (`None` from `math_equal_many`, `GradeError` from
`math_equal`), never False.
"""
from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache

from minitir.tasks import last_boxed

# --- extraction ---------------------------------------------------------------------------------
# an output block as the generator writes it; an unclosed one runs to the end of the text
OUTPUT_BLOCK = re.compile(r"```output\n.*?(?:```|\Z)", re.DOTALL)
ANSWER_FORMAT = re.compile(r"<answer>.*?\\boxed\{.*\}.*?</answer>", re.DOTALL)   # the paper's zero_pattern
ANSWER_TAGS = ("</think>", "<answer>", "</answer>")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # where `-m minitir` finds it
MAX_TAIL_TOKENS = 5          # the paper allows at most 5 tokens after </answer>


def strip_tool_output(text: str) -> str:
    """The text without its ```output blocks: what the model itself wrote."""
    return OUTPUT_BLOCK.sub("", text)


def extract_answer(response: str) -> str | None:
    """Lenient: the last \\boxed answer inside the <answer> section, else the last \\boxed anywhere;
    tool output never counts."""
    response = strip_tool_output(response)
    start = response.rfind("<answer>")
    if start != -1:
        end = response.find("</answer>", start)
        inside = last_boxed(response[start:end if end != -1 else len(response)])
        if inside is not None:
            return inside
    return last_boxed(response)


def has_answer_format(response: str) -> bool:
    """An <answer> section holding a \\boxed answer (the lenient format check)."""
    m = re.search(r"<answer>(.*?)</answer>", strip_tool_output(response), re.DOTALL)
    return bool(m) and last_boxed(m.group(1)) is not None


def _rough_tokens(text: str) -> int:
    """A tokenizer-free count for the tail after </answer>: words and punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def zero_tir_format(response: str, count_tokens=None) -> bool:
    """The paper's answer format (zero_tir_template_format_score_fn): <answer> ... \\boxed{} ... </answer>,
    each of </think>, <answer>, </answer> exactly once, at most 5 tokens after </answer>.
    count_tokens(text) -> int counts the tail with the policy's tokenizer (default: a rough count)."""
    text = strip_tool_output(response)
    if not ANSWER_FORMAT.search(text) or any(text.count(tag) != 1 for tag in ANSWER_TAGS):
        return False
    tail = text.split("</answer>", 1)[1]
    return (count_tokens or _rough_tokens)(tail) <= MAX_TAIL_TOKENS


def final_answer(response: str) -> str | None:
    """The paper's answer: the last \\boxed{} after </think> (tool output removed first)."""
    return last_boxed(strip_tool_output(response).split("</think>")[-1])


def zero_tir_reward(response: str, gold: str, finished: bool, *, grader: "Grader | None" = None,
                    count_tokens=None) -> float:
    """The paper's outcome reward, 1.0 or 0.0: answer format, ended normally (`finished`: a stop string
    or EOS, not the length limit) and the final answer equal to `gold` under math-verify. The same path as
    training and evaluation (`judge`, `outcome_reward`). `response` is the model's own text
    (Completion.policy_text, as training grades) or the whole text, whose ```output blocks are then known by
    their fences alone. Raises GradeError when the grader could not check the answer (never a silent 0)."""
    j = judge([(response, finished)], [gold], "strict", grader or default_grader(), count_tokens)[0]
    if not j.graded:
        raise GradeError(f"could not grade {j.answer!r} against {gold!r}: the grader worker died or hung twice")
    return outcome_reward(j.correct, j.format_ok, not finished, RewardConfig())


# --- the comparison itself (runs inside a worker process) ---------------------------------------
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
    except Exception:  # math-verify raises on answers it cannot parse: those are not equal
        return False


def _timed_compare(pred: str, gold: str, timeout_s: int) -> tuple[bool, bool]:
    """-> (the verdict, whether the check ran for its whole time limit: where math-verify's wall-clock
    timeout decides, so a rerun may see another verdict)."""
    t = time.monotonic()
    verdict = _compare(pred, gold, timeout_s)
    return verdict, time.monotonic() - t >= timeout_s


def _worker_main(timeout_s: int):
    """The worker process: one JSON line in (a list of [pred, gold]), one JSON line out ([verdicts, number of
    checks that ran into the time limit])."""
    import logging
    logging.disable(logging.WARNING)  # math-verify logs every timeout
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write on the answer channel
    import math_verify  # noqa: F401 - fails here, before "ready", when the package is missing
    out.write("ready\n")
    out.flush()
    for p, g in (("0.5", "\\frac{1}{2}"), ("(1,2]", "[1,2)"), ("\\{1,2\\}", "\\{2,1\\}"), ("x=3", "3"),
                 ("\\sqrt{8}", "2\\sqrt{2}"), ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(1,2)"), ("30^\\circ", "30"),
                 ("\\text{A}", "B"), ("2\\pi", "6.28")):
        _compare(p, g, timeout_s)  # fill lazy imports and caches before the first real check
    for line in sys.stdin:
        pairs = json.loads(line)
        checks = [_timed_compare(p, g, timeout_s) for p, g in pairs]
        out.write(json.dumps([[v for v, _ in checks], sum(t for _, t in checks)]) + "\n")
        out.flush()


# --- the grader: a small pool of worker processes with a watchdog -------------------------------
class GradeError(RuntimeError):
    """The grader could not check an answer (a worker that cannot start, or crashed twice on it)."""


class _Worker:
    def __init__(self, timeout_s: int):
        self.log = tempfile.TemporaryFile()   # its stderr, read back if it fails to start
        path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "minitir.reward", "--worker", str(timeout_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, encoding="utf-8", start_new_session=True,
                                     env={**os.environ, "PYTHONPATH": path, "PYTHONHASHSEED": "0",   # one hash seed
                                          "PYTHONSAFEPATH": "1"})   # no module from the working directory
        self.ready = False

    def wait_ready(self, limit_s: float = 120.0):
        """Block until the worker said it started; raise GradeError with its stderr if it did not."""
        if self.ready:
            return
        line = _readline(self.proc, limit_s)
        if line != "ready\n":
            self.proc.kill()
            self.proc.wait()
            self.log.seek(0)
            err = self.log.read().decode(errors="replace").strip().splitlines()[-3:]
            self.kill()
            raise GradeError(f"a grader worker ({sys.executable} -m minitir.reward --worker) failed to "
                             f"start: {' | '.join(err) or 'no output'}; check that math-verify is installed "
                             f"(pip install -r requirements.txt)")
        self.ready = True

    def ask(self, pairs: list[tuple[str, str]], limit_s: float) -> tuple[list[bool], int] | None:
        """The worker's answers and how many ran into the time limit, or None when it died or ran past limit_s
        (it is then killed)."""
        try:
            self.proc.stdin.write(json.dumps(pairs) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):   # dead, or killed earlier (its pipe closed)
            return None
        line = _readline(self.proc, limit_s)
        try:
            out = json.loads(line) if line else None
        except ValueError:
            out = None
        ok = isinstance(out, list) and len(out) == 2 and isinstance(out[0], list) and len(out[0]) == len(pairs)
        return (out[0], int(out[1])) if ok else None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.log):
            with suppress(OSError):
                f.close()


def _readline(proc: subprocess.Popen, limit_s: float) -> str | None:
    """One line from the process's stdout within limit_s seconds, else None (a thread does the read)."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(limit_s)
    if t.is_alive():
        proc.kill()  # also ends the blocked read
        t.join()
        return None
    return box[0] or None


class Grader:
    """math_equal with a hard time limit per check, usable from any thread."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0):
        self.timeout_s = max(1, int(round(timeout_s)))
        self._idle: queue.Queue = queue.Queue()
        self.errors = 0                    # checks given up on (reported as None / GradeError)
        self.timeouts = 0                  # checks that ran into math-verify's wall-clock limit (counted as False)
        self._count = threading.Lock()
        started = [_Worker(self.timeout_s) for _ in range(workers)]  # they start in parallel
        for w in started:
            try:
                w.wait_ready()
            except GradeError:
                for other in started:
                    other.kill()
                raise
            self._idle.put(w)

    def _ask(self, pairs: list[tuple[str, str]]) -> list[bool | None]:
        """Each pair's verdict; a batch lost to a dead or stuck worker is retried pair by pair on fresh
        workers, and a pair that fails twice on its own is None."""
        out = self._try(pairs)
        if out is not None:
            return out
        results: list[bool | None] = []
        for p in pairs:
            r = self._try([p]) if len(pairs) > 1 else None
            if r is None:
                r = self._try([p])
            if r is None:
                with self._count:
                    self.errors += 1
            results.append(None if r is None else r[0])
        return results

    def _try(self, pairs):
        w = self._idle.get()
        # math-verify checks its own limit for parse and verify of each side; allow all of them
        out = w.ask(pairs, len(pairs) * 3 * self.timeout_s + 5)
        if out is None:
            w.kill()
            w = _Worker(self.timeout_s)
            try:
                w.wait_ready()
            finally:
                self._idle.put(w)
            return None
        self._idle.put(w)
        with self._count:
            self.timeouts += out[1]
        return out[0]

    def math_equal(self, pred: str | None, gold: str) -> bool:
        """Raises GradeError when the check could not be made."""
        r = self.math_equal_many([(pred, gold)])[0]
        if r is None:
            raise GradeError(f"could not grade {pred!r} against {gold!r}: the grader worker died or hung twice")
        return r

    def math_equal_many(self, pairs: list[tuple[str | None, str]], batch: int = 16) -> list[bool | None]:
        """Many checks spread over the workers (results in input order; None = could not be checked)."""
        out: list[bool | None] = [None] * len(pairs)
        todo = []
        for i, (p, g) in enumerate(pairs):
            if p is None or not str(p).strip():
                out[i] = False
            elif _normalize(str(p)) == _normalize(str(g)):
                out[i] = True   # no round trip for the common exact match
            else:
                todo.append(i)
        chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
        ask = lambda chunk: self._ask([(str(pairs[i][0]), str(pairs[i][1])) for i in chunk])  # noqa: E731
        with ThreadPoolExecutor(max(1, len(chunks))) as pool:   # (a worker that cannot start raises here)
            for chunk, verdicts in zip(chunks, pool.map(ask, chunks)):
                for i, r in zip(chunk, verdicts):
                    out[i] = r
        return out

    def close(self):
        """Kills the idle workers (call it when no check is running): they hold nothing to save, and a clean
        exit of an interpreter with sympy loaded takes ~0.5 s."""
        while not self._idle.empty():
            self._idle.get().kill()


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
    """Lenient grading: extract the answer from a response, then compare it with the gold answer."""
    return default_grader().math_equal(extract_answer(response), gold)


# --- rewards ------------------------------------------------------------------------------------
@dataclass
class RewardConfig:
    kind: str = "strict"             # strict: zero_tir_reward's gates | lenient: any \boxed answer counts
    format_penalty: float = 0.0      # lenient only: subtracted without <answer>...\boxed{}...</answer>
    truncation_penalty: float = 0.0  # lenient only: subtracted when the response was cut at the length limit


def outcome_reward(correct: bool, format_ok: bool, truncated: bool, cfg: RewardConfig) -> float:
    """1 or 0, minus the lenient mode's optional penalties (off by default, as in the paper).
    format_ok: the Judgement's (lenient: an <answer> section holding a \\boxed answer)."""
    r = float(correct)
    if cfg.kind == "lenient" and cfg.format_penalty and not format_ok:
        r -= cfg.format_penalty
    if cfg.kind == "lenient" and cfg.truncation_penalty and truncated:
        r -= cfg.truncation_penalty
    return r


def answer_to_grade(text: str, finished: bool, kind: str, count_tokens=None) -> tuple[str | None, bool]:
    """-> (the answer to compare with the gold one or None, whether the text has the format).
    strict: the paper's gates first (format, ended normally), then the final answer after </think>;
    lenient: extract_answer, whatever the format."""
    if kind == "strict":
        ok = zero_tir_format(text, count_tokens)
        return (final_answer(text) if ok and finished else None), ok
    return extract_answer(text), has_answer_format(text)


@dataclass
class Judgement:
    answer: str | None   # what was compared with the gold answer (None: nothing to compare, so not correct)
    format_ok: bool      # strict: the paper's format gate; lenient: an <answer> section holding a \\boxed
    correct: bool
    graded: bool         # False: the grader could not check the answer (neither right nor wrong)


def judge(responses: list[tuple[str, bool]], golds: list[str], kind: str, grader: Grader,
          count_tokens=None) -> list[Judgement]:
    """The one grading path: training (rollout.grade), evaluation and `zero_tir_reward` all come here.
    responses: (the response's text, finished: ended at a stop string or EOS); every function here leaves
    its ```output blocks out, and training passes the policy's own tokens only (rollout.grade).
    kind: strict (the paper's gates) or lenient (any \\boxed answer). Checks run on the grader's workers."""
    found = [answer_to_grade(text, finished, kind, count_tokens) for text, finished in responses]
    verdicts = grader.math_equal_many([(answer, gold) for (answer, _), gold in zip(found, golds)])
    return [Judgement(answer, ok, bool(v), v is not None) for (answer, ok), v in zip(found, verdicts)]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(int(sys.argv[2]))
