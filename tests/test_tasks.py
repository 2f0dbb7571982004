import json
import math
import re

import pytest
from fractions import Fraction

from minitir.tasks import (BENCHMARKS, TEMPLATES, DatasetError, get_template, gold_answer, load_benchmark,
                           load_problems, render_prompt, synthetic_problems)
from tests.conftest import DATA_DIR

pytestmark = pytest.mark.quick   # the inner loop: pytest -m quick

EXPECTED = {"math500.jsonl": 500, "aime24.jsonl": 30, "amc23.jsonl": 40, "gsm8k_test.jsonl": 1319,
            "train_math_deepscaler.jsonl": 7474}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_shipped_record_loads_with_gold_or_is_counted(name):
    path = DATA_DIR / name
    problems, report = load_problems(path)
    assert report.loaded + report.skipped_no_answer == EXPECTED[name]
    raw = [json.loads(line) for line in open(path)]
    for n in report.skipped_lines:  # skipped records truly have no answer
        assert not raw[n - 1].get("answer")
    assert all(p.answer and p.question for p in problems)
    if name == "gsm8k_test.jsonl":
        assert problems[0].answer == "18" and all(re.fullmatch(r"-?[\d.]+", p.answer) for p in problems)
    if name == "train_math_deepscaler.jsonl":
        assert report.skipped_no_answer == 4


def test_benchmark_names_resolve_to_shipped_files():
    for name in ("math500", "aime24", "amc23", "gsm8k", "math_train"):
        problems, _ = load_benchmark(name, DATA_DIR, limit=3)
        assert len(problems) == 3
    assert {"aime25", "olympiadbench", "minerva"} <= set(BENCHMARKS)
    with pytest.raises(DatasetError, match="unknown benchmark"):
        load_benchmark("nope", DATA_DIR)


def test_gold_answer_sources():
    assert gold_answer({"answer": "#### 1,234"}) == "1234"
    assert gold_answer({"answer": "Janet has 3.\n#### 18"}) == "18"
    assert gold_answer({"final_answer": ["$\\frac{1}{2}$"]}) == "\\frac{1}{2}"
    assert gold_answer({"final_answer": ["1", "2"]}) == "1, 2"
    assert gold_answer({"solution": "So the answer is $\\boxed{\\frac{3}{4}}$."}) == "\\frac{3}{4}"
    assert gold_answer({"answer": 27.0}) == "27"
    assert gold_answer({"answer": "", "solution": "no box"}) is None
    assert gold_answer({"answer": None}) is None


def test_bad_input_errors_name_file_line_and_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "x", \n')
    with pytest.raises(DatasetError, match=r"d.jsonl:2: not valid JSON"):
        load_problems(f)
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"text": "x", "answer": "1"}\n')
    with pytest.raises(DatasetError, match=r"d.jsonl:2: field 'problem/question/prompt' is missing"):
        load_problems(f)
    f.write_text('{"q": "1+1", "a": "2"}\n{"q": "2+2", "a": ""}\n')
    problems, report = load_problems(f, question_field="q", answer_field="a")
    assert [p.answer for p in problems] == ["2"] and report.skipped_no_answer == 1 and report.skipped_lines == [2]
    j = tmp_path / "d.json"
    j.write_text(json.dumps([{"question": "a", "answer": "1"}, {"question": "b", "final_answer": ["2"]}]))
    assert [p.answer for p in load_problems(j)[0]] == ["1", "2"]
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DatasetError, match="unknown file type"):
        load_problems(tmp_path / "x.csv")


@pytest.mark.quick
def test_a_benchmark_from_the_hub_is_read_as_a_file_is(monkeypatch):
    """No local file: the hub's records go through the same checks and counts as a file's."""
    import sys
    import types
    rows = [{"problem": "1+1", "answer": "2", "unique_id": "a", "level": 1}, {"problem": "2+2", "answer": ""},
            {"problem": None, "question": "3+3", "answer": "6", "unique_id": "c"}]   # a hub row: every column
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda hub_id, split: rows))
    problems, report = load_benchmark("math500")
    assert [(p.id, p.answer, p.meta) for p in problems] == [("a", "2", {"level": 1}), ("c", "6", {})]
    assert report.skipped_no_answer == 1 and report.skipped_lines == [2]
    rows.append({"text": "no question"})
    with pytest.raises(DatasetError, match="HuggingFaceH4/MATH-500:4: field 'problem/question/prompt' is missing"):
        load_benchmark("math500")


# The paper's prompts as its code writes them (yyht/openrlhf_async_pipline, openrlhf/cli/template.py,
# commit 63b6159: the Python literals of 'ZERO_TIR' and 'ZERO_V2', with {query} for the problem).
PAPER_ZERO_TIR = """A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. In your reasoning-process, You can use python-code to solve your problem. User: You must put your answer inside <answer> </answer> tags, i.e., <answer> answer here </answer>. And your final answer will be extracted automatically by the \\boxed{} tag.\nThis is the problem:{query}\nAssistant: <think>"""
PAPER_ZERO_V2 = """A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: You must put your answer inside <answer> </answer> tags, i.e., <answer> answer here </answer>. And your final answer will be extracted automatically by the \\boxed{} tag.\nThis is the problem:{query}\nAssistant: <think>"""


def test_zero_templates_are_the_papers_character_for_character():
    q = "What is $2+2$? {Use braces}."
    assert render_prompt(TEMPLATES["zero_tir"], q) == PAPER_ZERO_TIR.replace("{query}", q)
    assert render_prompt(TEMPLATES["zero_rl"], q) == PAPER_ZERO_V2.replace("{query}", q)
    assert TEMPLATES["zero_tir"].tools and not TEMPLATES["zero_rl"].tools
    # the paper's rollout stop strings (experience_maker_async.py), EOS handled by the generator
    assert set(TEMPLATES["zero_tir"].stop) == {"User:", "Human:", "Assistant:", "</answer>"}


def test_templates():
    t = TEMPLATES["zero_tir_explained"]
    p = render_prompt(t, "What is 2+2?")
    assert p.endswith("User: What is 2+2?\nAssistant: <think>") and "```python" in p and "\\boxed{}" in p
    assert t.tools and not TEMPLATES["zero_rl_explained"].tools
    assert "```python" not in render_prompt(TEMPLATES["zero_rl_explained"], "q")
    custom = get_template("Q: {question}\nA:")
    assert render_prompt(custom, "1+1") == "Q: 1+1\nA:"
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        render_prompt(TEMPLATES["chat_tir"], "q")


def _check(p):
    """Recompute a synthetic answer independently from the question text."""
    q, kind = p.question, p.meta["kind"]
    nums = [int(x) for x in re.findall(r"-?\d+", q)]
    if kind == "big_product":
        return nums[0] * nums[1]
    if kind == "mod_pow":
        a, e, m = nums
        r, b = 1, a % m
        while e:  # square-and-multiply, not pow()
            if e & 1:
                r = r * b % m
            b, e = b * b % m, e >> 1
        return r
    if kind == "prime_sum":
        n = nums[0]
        return sum(k for k in range(2, n) if all(k % d for d in range(2, int(k ** 0.5) + 1)))
    if kind == "count_divisible":
        _, n, a, b, c = nums
        return len([k for k in range(1, n + 1) if k % a == 0 or k % b == 0]) - \
            len([k for k in range(1, n + 1) if (k % a == 0 or k % b == 0) and k % c == 0])
    if kind == "binomial":
        n, k = nums
        return math.factorial(n) // (math.factorial(k) * math.factorial(n - k))
    if kind == "linear_system":
        eqs = re.search(r"\$(.*)\$\. What", q).group(1).split(", ")
        names = sorted(set(re.findall(r"[xyz]", q.split("What")[0])))
        rows = []
        for e in eqs:
            lhs, rhs = e.split(" = ")
            coefs = {v: int(c.replace(" ", "")) for c, v in re.findall(r"(-?\s*\d+)([xyz])", lhs.replace("+ ", "+").replace("- ", "-"))}
            rows.append([Fraction(coefs[v]) for v in names] + [Fraction(int(rhs))])
        n = len(names)
        for i in range(n):  # Gauss-Jordan with exact fractions
            piv = next(r for r in range(i, n) if rows[r][i] != 0)
            rows[i], rows[piv] = rows[piv], rows[i]
            rows[i] = [x / rows[i][i] for x in rows[i]]
            for r in range(n):
                if r != i:
                    rows[r] = [a - rows[r][i] * b for a, b in zip(rows[r], rows[i])]
        return int(sum(rows[i][n] for i in range(n)))
    if kind == "digit_sum_power":
        a, e = nums[-2], nums[-1]
        return sum(int(ch) for ch in str(a ** e))
    raise AssertionError(kind)


@pytest.mark.parametrize("difficulty", [1, 3])
def test_synthetic_answers_independently_checked(difficulty):
    probs = synthetic_problems(35, seed=11, difficulty=difficulty)
    assert {p.meta["kind"] for p in probs} == {"big_product", "mod_pow", "prime_sum", "count_divisible", "binomial",
                                               "linear_system", "digit_sum_power"}
    for p in probs:
        assert int(p.answer) == _check(p), p
    assert [p.question for p in probs] == [p.question for p in synthetic_problems(35, seed=11, difficulty=difficulty)]
    assert [p.question for p in probs] != [p.question for p in synthetic_problems(35, seed=12, difficulty=difficulty)]


def test_the_miniature_benchmark_is_the_held_out_set_of_python_train_py():
    import train
    from minitir.config import TrainConfig
    from minitir.tasks import training_problems
    train_set, held_out = training_problems(TrainConfig(**train.preset("miniature")), say=print)
    problems, report = load_benchmark("miniature")
    assert [(p.question, p.answer) for p in problems] == [(p.question, p.answer) for p in held_out]
    assert report.loaded == len(problems) == 64
    assert not {p.question for p in problems} & {p.question for p in train_set}
    assert load_benchmark("miniature", limit=5)[0] == problems[:5]
