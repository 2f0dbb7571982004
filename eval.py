"""Evaluate a model with the training stack: same generator, sandbox, prompt and grader.

    python eval.py --model runs/NAME/checkpoints/step-000100 --benchmarks math500,aime24 --n-samples 8
    python eval.py --model Qwen2.5-1.5B --benchmarks math500 --paper            # the paper's eval settings
    python eval.py --model Qwen2.5-1.5B --benchmarks math500 --max-tool-calls 0,1,2,4,8,16   # the sweep
    python eval.py --model smollm2-135m --benchmarks math500 --prompt zero_rl                 # no tools
    python eval.py --model runs/NAME/checkpoints/step-000040 --benchmarks heldout --max-tool-calls 0,1,2

    torchrun --nproc_per_node 8 eval.py --model ... --benchmarks math500 --n-samples 16   # problems split over ranks

Writes OUT/samples.jsonl (one line per response), OUT/summary.json and, for a sweep, OUT/tool_calls.png;
prints a table. An interrupted evaluation picks up from OUT/samples.jsonl. Bad input (a flag, a data file,
a benchmark name, a checkpoint) prints one line saying what to change and exits with status 2.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from minitir import cli, distributed, load_pretrained
from minitir.checkpoint import CheckpointError
from minitir.config import compute_dtype
from minitir.cli import UsageError
from minitir.evaluate import format_table, summarize
from minitir.generate import Engine
from minitir.reward import Grader, RewardConfig
from minitir.sandbox import SandboxUnavailable
from minitir.rollout import generate_groups, generation_config, grade, make_tool, prompt_ids
from minitir.tasks import DatasetError, get_template, iter_jsonl, load_benchmark, render_prompt
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent


@dataclass
class EvalConfig:
    model: str                          # checkpoint dir, hub id, short name (Qwen2.5-1.5B) or smollm2-135m
    benchmarks: str = "math500"         # comma-separated names (math500, aime24, amc23, ..., miniature: seed 0's
                                        # held-out problems; heldout: --model's run's own) or files
    data_dir: str = str(ROOT / "data")  # where benchmark files are looked up (then the Hugging Face hub)
    n_samples: int = 1                  # responses per problem (avg@n, pass@k, maj@n)
    max_tool_calls: str = "2"           # one value, or a comma-separated sweep such as 0,1,2,4
    prompt: str = "zero_tir"            # zero_tir | zero_rl | zero_tir_explained | chat_tir | a text with {question}
    temperature: float | None = None    # default: 0 (greedy) for one sample, else 1.0
    top_p: float = 1.0                  # nucleus sampling
    max_new_tokens: int | None = None   # response budget, tool output included (default: 3072, or what the
                                        # model's context leaves after the longest prompt when that is less)
    max_tool_output_tokens: int = 256   # an output block over this many tokens is replaced (or cut)
    tool_output_overflow: Literal["replace", "truncate"] = "replace"   # the paper's message, or keep the start
    reward: Literal["lenient", "strict"] = "lenient"   # lenient: the last \boxed answer (the paper's eval script);
                                        # strict: the training reward's format and ended-normally gates too
    max_batch: int = 64                 # sequences decoded at once (KV-cache rows)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"   # the weights decoded with; auto: bfloat16 where the
                                        # run's decode copy is (CUDA, CPUs with native bfloat16 products)
    limit: int | None = None            # first N problems of each benchmark
    seed: int = 0                       # sampling seed (streams are per response, independent of batching)
    sandbox_url: str = ""               # a remote `sandbox.py serve` instead of local workers
    sandbox_timeout: float = 5.0        # seconds per code run
    sandbox_memory_mb: int = 1024       # memory per code run, all its processes (sent to a sandbox_url too)
    sandbox_allow_unisolated: bool = False   # run model-written code even where nothing isolates it
    out: str = ""                       # output directory (default: eval_out/<model name>)


# the paper's evaluation (evaluation/my_evaluation_tir.sh and the paper's setup): 32 samples at T=1, top-p 1,
# responses up to 16k tokens
PAPER = dict(n_samples=32, temperature=1.0, top_p=1.0, max_new_tokens=16384)


def parse(argv: list[str]) -> EvalConfig:
    paper = "--paper" in argv
    argv = [a for a in argv if a != "--paper"]
    default = replace(EvalConfig(model=""), **PAPER) if paper else None
    cfg = cli.parse(EvalConfig, argv, default=default,
                    description="Evaluate a model with minitir's generator, sandbox and grader. --paper sets the "
                                "paper's evaluation: " + ", ".join(f"{k}={v}" for k, v in PAPER.items()) + ".")
    if not cfg.model:
        raise UsageError("--model is required (a checkpoint directory, a hub id or smollm2-135m)")
    try:
        cfg.sweep = [int(x) for x in cfg.max_tool_calls.split(",")]
    except ValueError:
        raise UsageError(f"--max-tool-calls {cfg.max_tool_calls!r}: expected integers such as 2 or 0,1,2,4") from None
    if cfg.n_samples < 1:
        raise UsageError(f"--n-samples {cfg.n_samples}: must be >= 1")
    if cfg.temperature is None:
        cfg.temperature = 0.0 if cfg.n_samples == 1 else 1.0
    try:
        get_template(cfg.prompt)
    except ValueError as e:
        raise UsageError(f"--prompt: {e}") from None
    return cfg


def load_benchmarks(cfg: EvalConfig, say) -> dict:
    """Every benchmark, before the model loads: a missing file fails in a second."""
    benches = {}
    for name in [b for b in cfg.benchmarks.split(",") if b]:
        if name == "heldout":   # the run's own held-out problems, saved next to its checkpoints
            saved = Path(cfg.model).parent.parent / "heldout.jsonl"
            if not saved.exists():
                raise DatasetError(f"--benchmarks heldout: {saved} not found (--model must be RUN/checkpoints/step-N "
                                   f"of a run that evaluated held-out problems)")
            name = str(saved)
        problems, report = load_benchmark(name, cfg.data_dir, limit=cfg.limit)
        if report.skipped_no_answer:
            say(f"{name}: skipped {report.skipped_no_answer} records without a gold answer")
        benches[Path(name).stem if Path(name).exists() else name] = problems
    return benches


def default_budget(model, tok, cfg: EvalConfig, benches: dict) -> int:
    """3072 tokens, or what the model's context leaves after the longest prompt (the miniature's is 1024)."""
    template = get_template(cfg.prompt)
    longest = max((len(prompt_ids(tok, template, p.question)) for ps in benches.values() for p in ps), default=0)
    room = model.config.max_position_embeddings - longest
    if room < 1:
        raise UsageError(f"a prompt of {longest} tokens fills the model's context of "
                         f"{model.config.max_position_embeddings}: pass --max-new-tokens to decode past it")
    return min(3072, room)


def evaluate(cfg: EvalConfig, engine: Engine, grader, problems, bench: str, calls: int, first: int,
             show: bool = True) -> list[dict]:
    """Generate cfg.n_samples responses per problem with at most `calls` tool calls (a progress bar when show);
    grade them -> records."""
    tok = engine.tok
    template = get_template(cfg.prompt)
    gen = generation_config(template, max_tool_calls=calls, max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                            seed_offset=first * cfg.n_samples, max_tool_output_tokens=cfg.max_tool_output_tokens,
                            tool_output_overflow=cfg.tool_output_overflow, max_batch=cfg.max_batch)
    with tqdm(total=len(problems) * cfg.n_samples, desc=f"{bench}, {calls} calls", leave=False, dynamic_ncols=True,
              file=sys.stdout, disable=not show) as bar:
        samples = generate_groups(engine, template, problems, cfg.n_samples, gen,
                                  autocast=engine.model.device.type == "cuda", progress=bar.update)
    grade(samples, grader, RewardConfig(kind=cfg.reward), tok)
    prompts = [render_prompt(template, p.question, tok) for p in problems]   # once per problem, not per sample
    rows = []
    for i, s in enumerate(samples):
        p, c = problems[i // cfg.n_samples], s.completion
        rows.append({"benchmark": bench, "problem_id": p.id, "sample": i % cfg.n_samples, "max_tool_calls": calls,
                     "prompt": prompts[i // cfg.n_samples], "response": c.text, "answer": s.answer,
                     "gold": p.answer, "correct": s.correct, "grade_error": not s.graded and not c.num_tool_failures,
                     "num_tool_calls": c.num_tool_calls, "num_tool_errors": c.num_tool_errors,
                     "num_tool_failures": c.num_tool_failures,
                     "length": len(c.tokens), "policy_length": sum(c.policy_mask), "finish_reason": c.finish_reason})
    return rows


def run(cfg: EvalConfig) -> dict | None:
    # under torchrun each rank takes a contiguous share of every benchmark and rank 0 writes the results;
    # sampling streams are per response and global, so the samples do not depend on the number of ranks
    d, device = distributed.init()
    say = print if d.main else (lambda *args, **kw: None)
    out = Path(cfg.out or Path("eval_out") / Path(cfg.model.rstrip("/")).name)
    out.mkdir(parents=True, exist_ok=True)
    samples_path = out / "samples.jsonl"
    benches = load_benchmarks(cfg, say)
    done, records = set(), []
    if samples_path.exists():  # resume
        for _, r in iter_jsonl(samples_path):
            records.append(r)
            done.add((r["benchmark"], r["problem_id"], r["max_tool_calls"]))
        say(f"resuming: {len(done)} problem runs already in {samples_path}")
    tool = None   # before the model: a sandbox that cannot isolate stops the evaluation at once
    if get_template(cfg.prompt).tools and max(cfg.sweep) > 0:
        tool = make_tool(cfg.sandbox_url, cfg.sandbox_timeout, cfg.sandbox_memory_mb, workers=2,
                         allow_unisolated=cfg.sandbox_allow_unisolated)
    bf16 = compute_dtype(cfg.dtype, device) == "bfloat16"
    model, tok = load_pretrained(cfg.model, dtype=torch.bfloat16 if bf16 else torch.float32, device=device)
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = default_budget(model, tok, cfg, benches)
    grader, engine = Grader(), Engine(model, tok, tool)   # one engine: its cache and graphs serve every sweep
    try:
        for calls in cfg.sweep:
            for bench, problems in benches.items():
                todo = [p for p in problems if (bench, p.id, calls) not in done]
                if not todo:
                    continue
                t = time.time()
                lo, hi = distributed.split(len(todo), d)
                rows = evaluate(cfg, engine, grader, todo[lo:hi], bench, calls, lo, show=d.main)
                rows = sum(d.gather(rows), [])
                if d.main:
                    with open(samples_path, "a") as f:  # whole problems at a time, so a resume never splits one
                        f.writelines(json.dumps(r) + "\n" for r in rows)
                records += rows
                errors, failed = sum(r["grade_error"] for r in rows), sum(r["num_tool_failures"] > 0 for r in rows)
                say(f"{bench} (max {calls} tool calls): {len(todo)} problems x {cfg.n_samples} in "
                    f"{time.time() - t:.0f}s" + (f", {errors} could not be graded" if errors else "") +
                    (f", {failed} met a sandbox failure (counted as wrong)" if failed else ""))
    finally:
        grader.close()
        if tool is not None:
            tool.close()
        distributed.shutdown()
    if not d.main:
        return None
    summary = summarize(records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(summary))
    if len(cfg.sweep) > 1:
        plot_sweep(summary, out / "tool_calls.png")
        print(f"plot: {out / 'tool_calls.png'}")
    print(f"samples: {samples_path}\nsummary: {out / 'summary.json'}")
    return summary


def plot_sweep(summary: dict, path: Path):
    """Accuracy against the number of tool calls allowed, one line per benchmark."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for bench in sorted({m["benchmark"] for m in summary.values()}):
        rows = sorted((m["max_tool_calls"], m[f"avg@{m['n']}"]) for m in summary.values() if m["benchmark"] == bench)
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=bench)
    ax.set_xlabel("tool calls allowed per response")
    ax.set_ylabel("accuracy (avg@n)")
    ax.set_title("Accuracy vs tool-call budget")
    ax.set_xticks(sorted({m["max_tool_calls"] for m in summary.values()}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    """From Python, main([...]) raises input errors; as a command they print one line and exit with 2."""
    if argv is not None:
        return run(parse(argv))
    errors = (DatasetError, CheckpointError, SandboxUnavailable)
    return cli.run(lambda a: run(parse(a)), "eval.py", errors, sys.argv[1:])


if __name__ == "__main__":
    main()
