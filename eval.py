"""Evaluate a model with the training stack: same generator, sandbox, prompt and grader.

    python eval.py --model runs/NAME/checkpoints/step-000100 --benchmarks math500,aime24 --n-samples 8 --data-dir DIR
    python eval.py --model Qwen2.5-1.5B --benchmarks math500 --max-tool-calls 0,1,2,4,8,16   # the sweep
    python eval.py --model smollm2-135m --benchmarks math500 --prompt zero_rl                 # no tools

    torchrun --nproc_per_node 8 eval.py --model ... --benchmarks math500 --n-samples 16           # problems split over ranks

Writes OUT/samples.jsonl (one line per response), OUT/summary.json and, for a sweep, OUT/tool_calls.png;
prints a table. An interrupted evaluation picks up from OUT/samples.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from minitir import distributed, load_pretrained
from minitir.evaluate import format_table, summarize
from minitir.generate import GenerationConfig, Generator
from minitir.reward import Grader, extract_answer
from minitir.tasks import get_template, iter_jsonl, load_benchmark, render_prompt


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint dir, hub id, short name or smollm2-135m")
    ap.add_argument("--benchmarks", default="math500", help="comma-separated names (math500, aime24, ...) or files")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--n-samples", dest="n", type=int, default=1, help="samples per problem")
    ap.add_argument("--max-tool-calls", default="2", help="one value, or a comma-separated sweep such as 0,1,2,4")
    ap.add_argument("--prompt", default="zero_tir")
    ap.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for n=1, else 1.0")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=3072)
    ap.add_argument("--max-tool-output-tokens", type=int, default=512)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sandbox-url", default="")
    ap.add_argument("--sandbox-timeout", type=float, default=5.0)
    ap.add_argument("--out", default="", help="output directory (default: eval_out/<model name>)")
    a = ap.parse_args(argv)
    try:
        a.sweep = [int(x) for x in a.max_tool_calls.split(",")]
    except ValueError:
        ap.error(f"--max-tool-calls {a.max_tool_calls!r}: expected integers such as 2 or 0,1,2,4")
    if a.n < 1:
        ap.error("--n-samples must be >= 1")
    if a.temperature is None:
        a.temperature = 0.0 if a.n == 1 else 1.0
    return a


def main(argv=None):
    a = parse(sys.argv[1:] if argv is None else argv)
    # under torchrun each rank takes a contiguous share of every benchmark and rank 0 writes the results;
    # sampling streams are per response and global, so the samples do not depend on the number of ranks
    d, device = distributed.init()
    say = print if d.main else (lambda *args, **kw: None)
    out = Path(a.out or Path("eval_out") / Path(a.model.rstrip("/")).name)
    out.mkdir(parents=True, exist_ok=True)
    samples_path = out / "samples.jsonl"
    template = get_template(a.prompt)
    # load every benchmark first: a missing file fails before the model loads
    benches = {}
    for name in [b for b in a.benchmarks.split(",") if b]:
        problems, report = load_benchmark(name, a.data_dir, limit=a.limit)
        if report.skipped_no_answer:
            say(f"{name}: skipped {report.skipped_no_answer} records without a gold answer")
        benches[Path(name).stem if Path(name).exists() else name] = problems
    done, records = set(), []
    if samples_path.exists():  # resume
        for _, r in iter_jsonl(samples_path):
            records.append(r)
            done.add((r["benchmark"], r["problem_id"], r["max_tool_calls"]))
        say(f"resuming: {len(done)} problem runs already in {samples_path}")
    model, tok = load_pretrained(a.model, device=device)
    tool = None
    if template.tools and max(a.sweep) > 0:
        import sandbox
        tool = (sandbox.RemoteSandbox(a.sandbox_url, timeout_s=a.sandbox_timeout) if a.sandbox_url
                else sandbox.Sandbox(a.sandbox_timeout, workers=2))
    grader = Grader()
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        for calls in a.sweep:
            for bench, problems in benches.items():
                todo = [p for p in problems if (bench, p.id, calls) not in done]
                if not todo:
                    continue
                t = time.time()
                lo, hi = distributed.split(len(todo), d)
                mine = todo[lo:hi]
                prompts = [render_prompt(template, p.question, tok) for p in mine]
                ids = [tok(x).input_ids for x in prompts]
                cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                                       stop=template.stop, seed=a.seed, seed_offset=lo * a.n,
                                       max_tool_calls=calls if template.tools else 0,
                                       max_tool_output_tokens=a.max_tool_output_tokens, max_batch=a.max_batch)
                with autocast:
                    comps = Generator(model, tok, cfg, tool).generate([x for x in ids for _ in range(a.n)])
                answers = [extract_answer(c.text) for c in comps]
                correct = grader.math_equal_many([(ans, mine[i // a.n].answer) for i, ans in enumerate(answers)])
                rows = []
                for i, (c, ans, ok) in enumerate(zip(comps, answers, correct)):
                    p = mine[i // a.n]
                    rows.append({"benchmark": bench, "problem_id": p.id, "sample": i % a.n, "max_tool_calls": calls,
                                 "prompt": prompts[i // a.n], "response": c.text, "answer": ans, "gold": p.answer,
                                 "correct": bool(ok), "num_tool_calls": c.num_tool_calls,
                                 "num_tool_errors": c.num_tool_errors, "length": len(c.tokens),
                                 "policy_length": sum(c.policy_mask), "finish_reason": c.finish_reason})
                rows = sum(d.gather(rows), [])
                if d.main:
                    with open(samples_path, "a") as f:  # whole problems at a time, so a resume never splits one
                        f.writelines(json.dumps(r) + "\n" for r in rows)
                records += rows
                say(f"{bench} (max {calls} tool calls): {len(todo)} problems x {a.n} in {time.time() - t:.0f}s")
    finally:
        grader.close()
        if tool is not None and hasattr(tool, "close"):
            tool.close()
        distributed.shutdown()
    if not d.main:
        return None
    summary = summarize(records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(summary))
    if len(a.sweep) > 1:
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
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
