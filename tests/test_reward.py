import threading
import time

import pytest

from minitir.reward import (Grader, RewardConfig, extract_answer, final_answer, grade, has_answer_format,
                            math_equal, outcome_reward, zero_tir_format, zero_tir_reward)
from minitir.tasks import last_boxed

# (prediction, gold, equal?)
CASES = [
    # integers, signs, leading zeros, separators
    ("25", "025", True), ("025", "25", True), ("7", "7", True), ("-3", "-3", True), ("3", "-3", False),
    ("1000", "1,000", True), ("1,000,000", "1000000", True), ("12", "21", False), ("0", "0", True),
    ("100", "10^{2}", True), ("10^{3}", "1000", True), ("2", "3", False),
    # fractions, decimals, \frac vs /, \dfrac
    ("0.5", "\\frac{1}{2}", True), ("\\frac12", "0.5", True), ("1/2", "\\dfrac{1}{2}", True),
    ("\\tfrac{3}{4}", "0.75", True), ("1.5", "\\frac{3}{2}", True), ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("\\frac{1}{3}", "\\frac{1}{4}", False), ("-\\frac{1}{2}", "-0.5", True), ("\\frac{-1}{2}", "-\\frac12", True),
    ("0.25", "\\frac{1}{5}", False), ("\\frac{7}{3}", "2\\frac{1}{3}", True), ("3/4", "0.7", False),
    # radicals
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True), ("\\sqrt{8}", "2\\sqrt{2}", True), ("\\sqrt{3}", "\\sqrt{2}", False),
    ("2\\sqrt{3}", "\\sqrt{12}", True), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("3+2\\sqrt{2}", "2\\sqrt{2}+3", True), ("\\sqrt[3]{8}", "2", True),
    # pi
    ("2\\pi", "2\\pi", True), ("\\pi", "3.14159265358979", True), ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("3\\pi", "2\\pi", False), ("\\pi r^2", "\\pi r^2", True),
    # intervals
    ("(1,2]", "(1,2]", True), ("[1,2)", "(1,2]", False), ("(-\\infty, 3)", "(-\\infty,3)", True),
    ("[0, \\infty)", "[0,\\infty)", True), ("(-\\infty,0)\\cup(1,\\infty)", "(-\\infty,0)\\cup(1,\\infty)", True),
    ("[2,5]", "[2,6]", False),
    # ordered tuples and sets
    ("(1,2)", "(1,2)", True), ("(2,1)", "(1, 2)", False), ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\{1,2,3\\}", "\\{3,2,1\\}", True), ("\\{1,2\\}", "\\{1,3\\}", False), ("1, 2", "2, 1", True),
    ("(1,2,3)", "(1,2,4)", False),
    # matrices
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", False),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{bmatrix}0&1\\\\1&0\\end{bmatrix}", "\\begin{pmatrix}0&1\\\\1&0\\end{pmatrix}", True),
    # degrees, percentages, units, currency
    ("30^\\circ", "30", True), ("30", "30^{\\circ}", True), ("45^\\circ", "30^\\circ", False),
    ("50\\%", "50", True), ("25\\%", "30\\%", False), ("5\\text{ cm}", "5", True), ("12 \\text{ inches}", "12", True),
    ("\\$5", "5", True), ("\\$5.50", "5.5", True), ("7 \\text{ meters}", "8", False),
    # text answers and choices
    ("\\text{Monday}", "\\text{Monday}", True), ("\\text{Monday}", "\\text{Tuesday}", False),
    ("\\text{(B)}", "B", True), ("(C)", "C", True), ("\\textbf{(A)}", "A", True), ("A", "B", False),
    ("\\text{even}", "\\text{even}", True),
    # expressions and equations
    ("x=3", "3", True), ("y = 2x + 1", "y=2x+1", True), ("2x+1", "1+2x", True), ("x^2-1", "(x-1)(x+1)", True),
    ("x^2+1", "x^2-1", False), ("\\frac{x}{2}", "0.5x", True),
    # plainly wrong or malformed answers
    ("42", "\\frac{1}{2}", False), ("\\text{no solution}", "5", False), ("", "5", False),
    ("\\infty", "\\infty", True), ("-\\infty", "\\infty", False), ("1e3", "1001", False),
]


@pytest.fixture(scope="module")
def grader():
    g = Grader(workers=2, timeout_s=3)
    yield g
    g.close()


@pytest.mark.quick
def test_at_least_80_cases():
    assert len(CASES) >= 80


def test_math_equal_table(grader):
    results = grader.math_equal_many([(p, g) for p, g, _ in CASES])
    wrong = [(p, g, want) for (p, g, want), got in zip(CASES, results) if got != want]
    assert wrong == []


@pytest.mark.quick
def test_extraction():
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("a \\boxed{1} b \\boxed{{2}^{3}} c") == "{2}^{3}"
    assert last_boxed("so \\boxed 5 done") == "5"
    assert last_boxed("\\fbox{x+1}") == "x+1"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None
    r = "<think>\\boxed{1}</think> <answer>It is \\boxed{\\frac{\\sqrt{2}}{2}} or \\boxed{3}</answer> \\boxed{9}"
    assert extract_answer(r) == "3"
    assert extract_answer("no answer tag, \\boxed{4} then \\boxed{5}") == "5"
    assert extract_answer("<answer>no box</answer> earlier \\boxed{7}") == "7"
    assert extract_answer("<answer>\\boxed{\\begin{pmatrix}1&{2}\\end{pmatrix}}</answer>") == \
        "\\begin{pmatrix}1&{2}\\end{pmatrix}"
    assert has_answer_format("<answer>\\boxed{1}</answer>") and not has_answer_format("\\boxed{1}")


@pytest.mark.quick
def test_grade_and_module_functions():
    assert grade("<think>2+2</think><answer>\\boxed{4}</answer>", "4")
    assert not grade("<answer>\\boxed{5}</answer>", "4")
    assert not grade("no boxed answer", "4")
    assert math_equal("\\frac{1}{2}", "0.5")


def test_pathological_input_returns_in_time(grader):
    t = time.time()
    assert grader.math_equal("2^{2^{2^{2^{2^{2^{2}}}}}}", "5") is False
    assert grader.math_equal("9!!!!!!!!!!!!!!", "7") is False
    assert time.time() - t < 3 * 3 * 2 + 10
    assert grader.math_equal("2", "2.0")  # the pool still works afterwards


@pytest.mark.quick
def test_grading_from_threads(grader):
    out = {}

    def work(i):
        out[i] = grader.math_equal(f"\\frac{{{2 * i}}}{{2}}", str(i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out[i] for i in range(8))


@pytest.mark.quick
def test_outcome_reward():
    cfg = RewardConfig()
    assert outcome_reward(True, False, False, cfg) == 1.0 and outcome_reward(False, True, True, cfg) == 0.0
    cfg = RewardConfig(kind="lenient", format_penalty=0.5, truncation_penalty=0.25)
    assert outcome_reward(True, True, False, cfg) == 1.0
    assert outcome_reward(True, False, True, cfg) == 0.25
    assert outcome_reward(True, False, True, RewardConfig(format_penalty=0.5)) == 1.0  # strict: no shaping


CODE = "```python\nprint(chr(92) + 'boxed{' + str(3 * 4) + '}')\n```\n```output\n\\boxed{12}\n```\n\n\n"


@pytest.mark.quick
def test_strict_reward_by_hand(grader):
    good = f"Let me compute. {CODE}So the product is 12.</think> <answer>The answer is \\boxed{{12}}</answer>"
    assert zero_tir_reward(good, "12", True, grader=grader) == 1.0
    # the only \boxed is inside the tool's output: the model never answered
    only_tool = f"Let me compute. {CODE}</think> <answer>see above</answer>"
    assert zero_tir_reward(only_tool, "12", True, grader=grader) == 0.0
    assert extract_answer(only_tool) is None and not grade(only_tool, "12")
    assert zero_tir_reward(good, "12", False, grader=grader) == 0.0             # cut at the length limit
    assert zero_tir_reward(good.replace("</think>", ""), "12", True, grader=grader) == 0.0   # no </think>
    assert zero_tir_reward(good.replace("{12}</answer>", "{13}</answer>"), "12", True, grader=grader) == 0.0
    assert zero_tir_reward(good + " and more words after the answer", "12", True, grader=grader) == 0.0
    assert zero_tir_reward(good + "\n", "12", True, grader=grader) == 1.0   # a few tokens after it are allowed
    two_answers = good + " <answer>\\boxed{12}</answer>"
    assert not zero_tir_format(two_answers)
    # a \boxed guess inside <think> does not count: the answer is taken after </think>
    assert final_answer("<think>\\boxed{5}</think> <answer>\\boxed{7}</answer>") == "7"
    assert zero_tir_format(good, count_tokens=lambda t: 0) and not zero_tir_format(good + "x", count_tokens=lambda t: 6)


@pytest.mark.quick
def test_repeatness_against_the_suffix_array_definition():
    import random
    from minitir.filters import repeatness

    def by_definition(s):  # 2 * sum of adjacent LCPs in the sorted suffixes / (n (n + 1))
        n = len(s)
        sa = sorted(range(n), key=lambda i: s[i:])
        lcp = 0
        for a, b in zip(sa, sa[1:]):
            k = 0
            while a + k < n and b + k < n and s[a + k] == s[b + k]:
                k += 1
            lcp += k
        return 2 * lcp / (n * (n + 1))

    r = random.Random(0)
    for _ in range(100):
        s = "".join(r.choice("ab c\n") for _ in range(r.randint(2, 80)))
        assert repeatness(s) == pytest.approx(by_definition(s), abs=1e-12)
    assert repeatness("abcdefg") == 0.0 and repeatness("aaaa") == pytest.approx(0.6)
    assert repeatness("The answer is 12 " * 40) > 0.9 > 0.05 > repeatness("Let x be 3; then 4x = 12.")


@pytest.mark.quick
def test_a_script_without_main_guard_grades_correctly(tmp_path):
    """Workers are separate interpreters started as `python -m minitir.reward`: they never re-import the caller's
    script, so a script without `if __name__ == "__main__":` grades right and runs once, from any directory."""
    import subprocess
    import sys
    from pathlib import Path
    runs = tmp_path / "runs.txt"
    script = tmp_path / "plain.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
                      f"open({str(runs)!r}, 'a').write('ran\\n')\n"
                      "from minitir.reward import math_equal\n"
                      "print(math_equal('1,000', '1000'), math_equal('x^2+2x+1', '(x+1)^2'), math_equal('3', '4'))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.stdout.split() == ["True", "True", "False"], out.stderr[-2000:]
    assert runs.read_text() == "ran\n"


def test_a_killed_worker_is_retried_and_a_lost_check_is_an_error(monkeypatch):
    import os
    import signal
    import sys
    from minitir import reward
    g = Grader(workers=1, timeout_s=3)
    try:
        w = g._idle.queue[0]
        os.kill(w.proc.pid, signal.SIGKILL)                     # the worker dies before the check
        assert g.math_equal("x^2+2x+1", "(x+1)^2") is True       # retried on a fresh worker
        assert g.errors == 0
        os.kill(g._idle.queue[0].proc.pid, signal.SIGKILL)       # it dies again, and its replacement
        with monkeypatch.context() as m:                          # cannot start: an error, said at once
            m.setattr(sys, "executable", "/bin/false")
            with pytest.raises(reward.GradeError, match="failed to start"):
                g.math_equal("x^2+2x+1", "(x+1)^2")
        assert g.math_equal("x^2+2x+1", "(x+1)^2") is True       # the next check starts one again
        assert g.errors == 0
        monkeypatch.setattr(reward._Worker, "ask", lambda self, pairs, limit: None)   # every worker dies on it
        assert g.math_equal_many([("x^2", "x*x"), ("2", "2")]) == [None, True]   # an error, never False
        assert g.errors == 1
        with pytest.raises(reward.GradeError, match="could not grade"):
            g.math_equal("x^2", "x*x")
    finally:
        g.close()


@pytest.mark.quick
def test_a_worker_that_cannot_start_raises_at_once(monkeypatch):
    import sys
    from minitir import reward
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(reward.GradeError, match="failed to start"):
        Grader(workers=2)


@pytest.mark.quick
def test_a_check_that_runs_into_its_time_limit_is_counted(monkeypatch):
    """math-verify's limit is wall-clock: a check that ran for it is counted (grade_timeouts), a fast one not."""
    from minitir import reward
    monkeypatch.setattr(reward, "_compare", lambda p, g, t: (time.sleep(t if p == "slow" else 0), False)[1])
    assert reward._timed_compare("slow", "1", 0.05) == (False, True)
    assert reward._timed_compare("fast", "1", 0.05) == (False, False)
