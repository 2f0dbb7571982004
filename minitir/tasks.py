"""Problems and prompts: templates, dataset loading with gold-answer detection, the benchmark names,
and the offline synthetic task (the embedded default training set)."""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Problem:
    id: str
    question: str
    answer: str                        # gold final answer, as text
    meta: dict = field(default_factory=dict)


# --- prompt templates: plain data ({question} is filled in) -------------------------------------
@dataclass
class PromptTemplate:
    text: str
    stop: tuple[str, ...] = ()
    tools: bool = False               # whether code blocks are executed for this prompt
    chat: bool = False                # text is the user message of the tokenizer's chat template


# The paper's prompts, character for character (openrlhf/cli/template.py: ZERO_TIR, and ZERO_V2 for the
# no-tool baseline). {question} is replaced verbatim (str.replace: the text holds a literal \boxed{}).
_PAPER_HEAD = ("A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
               "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
               "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
               "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
               "here </answer>.")
_PAPER_TOOLS = " In your reasoning-process, You can use python-code to solve your problem."
_PAPER_TAIL = (" User: You must put your answer inside <answer> </answer> tags, i.e., <answer> answer here "
               "</answer>. And your final answer will be extracted automatically by the \\boxed{} tag.\n"
               "This is the problem:{question}\nAssistant: <think>")
# the paper's rollout stop strings (experience_maker_async.py), EOS aside
_STOP = ("User:", "Human:", "Assistant:", "</answer>")

# minitir's own wording, which explains the code protocol: for small models that need to be told
_SYSTEM = ("A conversation between User and Assistant. The User asks a question and the Assistant solves it. "
           "The Assistant first reasons step by step inside <think> </think>, then gives the answer inside "
           "<answer> </answer>, with the final result in \\boxed{}.")
_TOOLS = (" While reasoning, the Assistant may write Python code in a ```python ... ``` block; the code is run "
          "and its output is shown in an ```output ... ``` block right after it, and the Assistant continues "
          "from there.")

TEMPLATES: dict[str, PromptTemplate] = {
    # ZeroTIR (the paper's ZERO_TIR): a base model continues after "Assistant: <think>"
    "zero_tir": PromptTemplate(_PAPER_HEAD + _PAPER_TOOLS + _PAPER_TAIL, _STOP, tools=True),
    # the no-tool baseline (ZeroRL, the paper's ZERO_V2)
    "zero_rl": PromptTemplate(_PAPER_HEAD + _PAPER_TAIL, _STOP, tools=False),
    # minitir's explanatory wording: says how code blocks and their output look
    "zero_tir_explained": PromptTemplate(_SYSTEM + _TOOLS + "\nUser: {question}\nAssistant: <think>", _STOP,
                                         tools=True),
    "zero_rl_explained": PromptTemplate(_SYSTEM + "\nUser: {question}\nAssistant: <think>", _STOP, tools=False),
    # instruct models: the explanatory instructions as a chat user turn
    "chat_tir": PromptTemplate(_SYSTEM + _TOOLS + "\n\n{question}", ("</answer>",), tools=True, chat=True),
}


_BOXED = re.compile(r"\\(?:boxed|fbox)\b")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} / `\\boxed x` in text (nested braces handled): a dataset's
    answer inside its solution here, the model's answer in reward.py."""
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


def render_prompt(template: PromptTemplate, question: str, tokenizer=None) -> str:
    text = template.text.replace("{question}", question)
    if template.chat:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("this prompt template needs a tokenizer with a chat template (an instruct model)")
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def get_template(name_or_text: str) -> PromptTemplate:
    """A template by name, or a custom zero_tir-style template text containing {question}."""
    if name_or_text in TEMPLATES:
        return TEMPLATES[name_or_text]
    if "{question}" in name_or_text:
        return PromptTemplate(name_or_text, _STOP, tools=True)
    raise ValueError(f"prompt template {name_or_text!r}: not one of {sorted(TEMPLATES)} and has no {{question}}")


# --- datasets -----------------------------------------------------------------------------------
QUESTION_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("answer", "final_answer", "solution")

# benchmark name -> (file names looked for under a data dir, Hugging Face dataset id, split)
BENCHMARKS = {
    "math500": (("math500.jsonl", "math500/test.jsonl"), "HuggingFaceH4/MATH-500", "test"),
    "aime24": (("aime24.jsonl", "aime24/test.jsonl"), "HuggingFaceH4/aime_2024", "train"),
    "aime25": (("aime25.jsonl", "aime25/test.jsonl"), "yentinglin/aime_2025", "train"),
    "amc23": (("amc23.jsonl", "amc23/test.jsonl"), "math-ai/amc23", "test"),
    "gsm8k": (("gsm8k_test.jsonl", "gsm8k.jsonl", "gsm8k/test.jsonl"), "openai/gsm8k", "test"),
    "olympiadbench": (("olympiadbench.jsonl", "olympiadbench/test.jsonl"), "Hothan/OlympiadBench", "train"),
    "minerva": (("minerva_math.jsonl", "minerva.jsonl", "minerva_math/test.jsonl"), "math-ai/minervamath", "test"),
    "math_train": (("train_math_deepscaler.jsonl", "math_train.jsonl"), "EleutherAI/hendrycks_math", "train"),
}


class DatasetError(ValueError):
    pass


def gold_answer(record: dict, answer_field: str | None = None) -> str | None:
    """The gold final answer of a record, or None: `answer` (GSM8K's `#### N` handled), `final_answer`
    (a list in OlympiadBench), or the last \\boxed in `solution`."""
    fields = (answer_field,) if answer_field else ANSWER_FIELDS
    for f in fields:
        v = record.get(f)
        if v is None:
            continue
        if isinstance(v, list):
            v = ", ".join(str(x).strip().strip("$") for x in v) if v else None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(int(v)) if float(v).is_integer() else str(v)
        if not isinstance(v, str) or not v.strip():
            continue
        if "####" in v:
            v = v.rsplit("####", 1)[1].strip().replace(",", "")
        elif f == "solution" or (answer_field is None and "\\boxed" in v and len(v) > 80):
            v = last_boxed(v)
        if v:
            return v.strip()
    return None


def iter_jsonl(path: Path, error=None):
    """(line number, object) for each non-empty line of a JSONL file; a bad line raises `error`
    (default DatasetError) naming the file and line."""
    error = error or DatasetError
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg}); fix or delete that line") from None
            if not isinstance(rec, dict):
                raise error(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            yield n, rec


def _read_records(path: Path):
    """-> iterator of (line number or index, record dict)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from iter_jsonl(path)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} or similar
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON array of objects")
        for n, rec in enumerate(data, 1):
            if not isinstance(rec, dict):
                raise DatasetError(f"{path}: record {n} is not an object")
            yield n, rec
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DatasetError(f"{path}: reading parquet needs pyarrow (`pip install pyarrow`)") from None
        for n, rec in enumerate(pq.read_table(path).to_pylist(), 1):
            yield n, rec
    else:
        raise DatasetError(f"{path}: unknown file type {suffix!r} (use .jsonl, .json or .parquet)")


@dataclass
class LoadReport:
    loaded: int = 0
    skipped_no_answer: int = 0
    skipped_lines: list[int] = field(default_factory=list)


def load_problems(path: str | Path, question_field: str | None = None, answer_field: str | None = None,
                  limit: int | None = None) -> tuple[list[Problem], LoadReport]:
    """Problems from a local JSONL / JSON / parquet file. A record without a question is an error naming
    file, line and field; a record without a usable gold answer is skipped and counted in the report."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    return _problems(_read_records(path), path, question_field, answer_field, limit)


def _problems(records, source, question_field, answer_field, limit) -> tuple[list[Problem], LoadReport]:
    problems, report = [], LoadReport()
    for n, rec in records:
        qf = question_field or next((f for f in QUESTION_FIELDS if isinstance(rec.get(f), str)), None)
        if qf is None or not isinstance(rec.get(qf), str) or not rec[qf].strip():
            want = question_field or "/".join(QUESTION_FIELDS)
            raise DatasetError(f"{source}:{n}: field {want!r} is missing or empty (fields: {sorted(rec)})"
                               + ("" if question_field else "; name the question field with --question-field"))
        if answer_field is not None and answer_field not in rec:
            raise DatasetError(f"{source}:{n}: answer field {answer_field!r} is missing (fields: {sorted(rec)})")
        gold = gold_answer(rec, answer_field)
        if gold is None:
            report.skipped_no_answer += 1
            report.skipped_lines.append(n)
            continue
        pid = str(rec.get("unique_id", rec.get("id", rec.get("idx", n))))
        problems.append(Problem(pid, rec[qf].strip(), gold, {k: v for k, v in rec.items()
                                                             if k in ("level", "subject", "type", "difficulty")}))
        if limit is not None and len(problems) >= limit:
            break
    report.loaded = len(problems)
    return problems, report


def load_benchmark(name: str, data_dir: str | Path | None = None, limit: int | None = None):
    """A benchmark by name (see BENCHMARKS; `miniature`: the held-out problems of `python train.py`): its file
    under data_dir if present, else the Hugging Face dataset (needs `datasets` and network); or a file path
    that exists. -> (problems, report)."""
    if name == "miniature":
        problems = miniature_held_out()[:limit]
        return problems, LoadReport(loaded=len(problems))
    if name not in BENCHMARKS:
        if Path(name).exists():
            return load_problems(name, limit=limit)
        raise DatasetError(f"unknown benchmark {name!r}: use one of {sorted(BENCHMARKS) + ['miniature']} "
                           f"or a file path")
    files, hub_id, split = BENCHMARKS[name]
    for d in [Path(data_dir)] if data_dir else []:
        for f in files:
            if (d / f).exists():
                return load_problems(d / f, limit=limit)
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"benchmark {name!r}: no {' or '.join(files)} under --data-dir {data_dir}, and the "
                           f"`datasets` package is not installed to fetch {hub_id}") from None
    try:
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as e:
        raise DatasetError(f"benchmark {name!r}: could not load {hub_id} from the hub ({type(e).__name__}); "
                           f"put {files[0]} under --data-dir") from None
    return _problems(enumerate(ds, 1), hub_id, None, None, limit)


# --- the offline synthetic task: exact answers, and code is the reliable way to them ------------
def primes_below(n: int) -> list[int]:
    sieve = bytearray([1]) * max(n, 2)
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytearray(len(sieve[i * i::i]))
    return [i for i in range(n) if sieve[i]]


def _big_product(r: random.Random, d: int):
    a, b = r.randrange(10 ** (d - 1), 10 ** d), r.randrange(10 ** (d - 1), 10 ** d)
    return f"Compute ${a} \\times {b}$.", str(a * b)


def _mod_pow(r: random.Random, d: int):
    a, e, m = r.randrange(2, 10 ** d), r.randrange(10 ** d, 10 ** (d + 2)), r.randrange(7, 10 ** min(d + 1, 6))
    return f"What is the remainder when ${a}^{{{e}}}$ is divided by ${m}$?", str(pow(a, e, m))


def _prime_sum(r: random.Random, d: int):
    n = r.randrange(10 ** d, 10 ** (d + 1))
    return f"What is the sum of all prime numbers less than ${n}$?", str(sum(primes_below(n)))


def _count_divisible(r: random.Random, d: int):
    n = r.randrange(10 ** (d + 1), 10 ** (d + 2))
    a, b, c = r.sample([2, 3, 5, 7, 11, 13], 3)
    count = sum(1 for k in range(1, n + 1) if (k % a == 0 or k % b == 0) and k % c != 0)
    return (f"How many integers from $1$ to ${n}$ inclusive are divisible by ${a}$ or by ${b}$ "
            f"but not by ${c}$?", str(count))


def _binomial(r: random.Random, d: int):
    n = r.randrange(10 * d, 25 * d)
    k = r.randrange(2, n // 2)
    return f"Compute $\\binom{{{n}}}{{{k}}}$.", str(math.comb(n, k))


def _linear_system(r: random.Random, d: int):
    size = 2 if d < 3 else 3
    names = "xyz"[:size]
    while True:
        sol = [r.randint(-9 * d, 9 * d) for _ in range(size)]
        rows = [[r.randint(-9, 9) for _ in range(size)] for _ in range(size)]
        det = rows[0][0] * rows[1][1] - rows[0][1] * rows[1][0] if size == 2 else (
            rows[0][0] * (rows[1][1] * rows[2][2] - rows[1][2] * rows[2][1])
            - rows[0][1] * (rows[1][0] * rows[2][2] - rows[1][2] * rows[2][0])
            + rows[0][2] * (rows[1][0] * rows[2][1] - rows[1][1] * rows[2][0]))
        if det != 0:
            break
    eqs = []
    for row in rows:
        lhs = " + ".join(f"{c}{v}" for c, v in zip(row, names)).replace("+ -", "- ")
        eqs.append(f"{lhs} = {sum(c * s for c, s in zip(row, sol))}")
    return (f"Solve the system ${', '.join(eqs)}$. What is ${' + '.join(names)}$?", str(sum(sol)))


def _digit_sum_power(r: random.Random, d: int):
    a, e = r.randrange(2, 10 * d), r.randrange(20 * d, 60 * d)
    return f"What is the sum of the digits of ${a}^{{{e}}}$?", str(sum(map(int, str(a ** e))))


SYNTHETIC_KINDS = {"big_product": _big_product, "mod_pow": _mod_pow, "prime_sum": _prime_sum,
                   "count_divisible": _count_divisible, "binomial": _binomial, "linear_system": _linear_system,
                   "digit_sum_power": _digit_sum_power}


def synthetic_problems(n: int, seed: int = 0, difficulty: int = 2) -> list[Problem]:
    """n seeded problems, every kind in turn (difficulty 1 = small numbers ... 5 = large), exact integer answers."""
    if not 1 <= difficulty <= 5:
        raise ValueError(f"difficulty must be in 1..5, got {difficulty}")
    kinds = list(SYNTHETIC_KINDS)
    r = random.Random(seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        q, a = SYNTHETIC_KINDS[kind](r, difficulty)
        out.append(Problem(f"synthetic-{seed}-{i}", q, a, {"kind": kind, "difficulty": difficulty}))
    return out


# --- the miniature task (minitir/miniature.py): problems where code pays, with the programs that solve each ---
# a kind draws (question, programs): each program is (code, the number it prints); the last one prints the answer
def _mini_product(r: random.Random, small: bool):
    a, b = (r.randint(2, 12), r.randint(2, 12)) if small else (r.randint(10, 99), r.randint(10, 99))
    return f"Compute ${a} \\times {b}$.", [(f"print({a} * {b})", a * b)]


def _mod_pow_args(r: random.Random, small: bool) -> tuple[int, int, int]:
    if small:
        return r.randint(2, 9), r.randint(2, 3), r.randint(5, 12)
    return r.randint(2, 99), r.randint(10, 999), r.randint(7, 999)


def _mini_mod_pow(r: random.Random, small: bool):
    a, e, m = _mod_pow_args(r, small)
    return (f"What is the remainder when ${a}^{{{e}}}$ is divided by ${m}$?",
            [(f"print(pow({a}, {e}, {m}))", pow(a, e, m))])


def _prime_sum_program(n: int) -> tuple[str, int]:
    return f"from sympy import primerange\nprint(sum(primerange({n})))", sum(primes_below(n))


def _mini_prime_sum(r: random.Random, small: bool):
    n = r.randint(5, 30) if small else r.randint(100, 999)
    return f"What is the sum of all prime numbers less than ${n}$?", [_prime_sum_program(n)]


def _mini_two_step(r: random.Random, small: bool):
    """Two programs: the second takes the number the first prints. One program nesting both calls would do,
    but the miniature's programs only ever hold numbers the model has read (in the question or an output
    block), so its way to the answer takes two tool calls."""
    a, e, m = _mod_pow_args(r, small)
    n = pow(a, e, m)
    return (f"Let $n$ be the remainder when ${a}^{{{e}}}$ is divided by ${m}$. "
            f"What is the sum of all prime numbers less than $n$?",
            [(f"print(pow({a}, {e}, {m}))", n), _prime_sum_program(n)])


MINIATURE_KINDS = {"product": _mini_product, "mod_pow": _mini_mod_pow, "prime_sum": _mini_prime_sum,
                   "two_step": _mini_two_step}


def miniature_problems(n: int, seed: int, small_share: float = 0.1,
                       kinds: tuple[str, ...] = tuple(MINIATURE_KINDS)) -> list[Problem]:
    """n problems, kinds in turn, one in ten (small_share) small enough to memorise; meta["programs"] holds
    the programs that solve each one, as (code, printed text)."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        small = r.random() < small_share
        q, programs = MINIATURE_KINDS[kind](r, small)
        programs = [(code, str(v)) for code, v in programs]
        meta = {"kind": kind, "small": small, "programs": programs}
        out.append(Problem(f"mini-{seed}-{i}", q, programs[-1][1], meta))
    return out


def miniature_source(size: int, seed: int) -> list[Problem]:
    """A miniature run's problems (training, then held-out): the base model's corpora used seeds 0 and 7
    (miniature.BaseConfig), so 10,000 + seed draws problems apart from them (the question space is small, so
    many questions, most prime sums among them, recur there)."""
    return miniature_problems(size, seed=10_000 + seed)


def miniature_held_out(train_size: int = 4000, eval_size: int = 64, seed: int = 0) -> list[Problem]:
    """The held-out problems of `python train.py` (configs/miniature.json's synthetic_size and eval_size,
    seed 0), for eval.py --benchmarks miniature."""
    return miniature_source(train_size + eval_size, seed)[-eval_size:]


# --- a run's problems: the training source and its held-out part, and the order they are drawn in ---
def training_problems(cfg, say=print) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems) for a TrainConfig: generated (miniature, synthetic), a file, or a
    benchmark name; the held-out ones from cfg.eval_data, else the last cfg.eval_size of the source; training
    problems whose question is also held out are left out (and said). Records without a gold answer are
    skipped and said."""
    def loaded(name, pair):
        problems, report = pair
        if report.skipped_no_answer:
            say(f"{name}: skipped {report.skipped_no_answer} records without a gold answer (lines "
                f"{report.skipped_lines[:10]}{' ...' if len(report.skipped_lines) > 10 else ''})")
        return problems

    n = cfg.synthetic_size + cfg.eval_size
    if cfg.data == "miniature":
        problems = miniature_source(n, cfg.seed)
    elif cfg.data == "synthetic":
        problems = synthetic_problems(n, seed=cfg.seed, difficulty=cfg.synthetic_difficulty)
    elif Path(cfg.data).exists():
        problems = loaded(cfg.data, load_problems(cfg.data, cfg.question_field, cfg.answer_field))
    else:
        problems = loaded(cfg.data, load_benchmark(cfg.data, cfg.data_dir))
    held_out = []
    if cfg.eval_size > 0 and cfg.eval_data:
        held_out = loaded(cfg.eval_data, load_benchmark(cfg.eval_data, cfg.data_dir, limit=cfg.eval_size))
    elif cfg.eval_size > 0:
        if len(problems) <= cfg.eval_size:
            raise DatasetError(f"--eval-size {cfg.eval_size} leaves no training problems out of {len(problems)}")
        problems, held_out = problems[:-cfg.eval_size], problems[-cfg.eval_size:]
    seen = {p.question for p in held_out}   # a held-out problem is never trained on (generated sources repeat)
    train = [p for p in problems if p.question not in seen]
    if len(train) < len(problems):
        say(f"left out {len(problems) - len(train)} training problems that are also held-out problems")
    if not train:
        raise DatasetError(f"no training problems in {cfg.data!r}")
    return train, held_out


class ProblemStream:
    """The problems in a seeded permutation per epoch; epoch and pos are saved in checkpoints."""

    def __init__(self, problems: list[Problem], seed: int):
        self.problems, self.seed, self.epoch, self.pos = problems, seed, 0, 0

    def next(self, k: int) -> list[Problem]:
        out = []
        while len(out) < k:
            order = list(range(len(self.problems)))
            random.Random(self.seed * 7919 + self.epoch).shuffle(order)
            take = order[self.pos:self.pos + k - len(out)]
            out += [self.problems[i] for i in take]
            self.pos += len(take)
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        return out
