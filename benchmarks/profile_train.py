"""Where `python train.py` spends its time, by phase: the run as users start it (train.main, the same flags),
with a wall clock around the functions that make up each phase. A phase's time excludes the phases nested in
it (decode inside evaluation counts as "evaluation: decode"); "loop" is Trainer.train's own time (the bar, metric
rows, the scaling figure), "other" what no phase covers. Main thread only: sandbox runs overlap decoding on their
own processes, so the main thread's wait for tool results is what they cost the run; the runs' own time, as the
sandbox reports it, is printed beside it. A CUDA-graph decode step counts as "decode" too.

    python benchmarks/profile_train.py [train.py flags, e.g. --steps 10]
"""
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from minitir import generate, learner, model, run_state, trainer  # noqa: E402
from minitir.sandbox import Sandbox  # noqa: E402

PHASES = [  # (owner, attribute, phase)
    (trainer.Trainer, "__init__", "start"), (trainer.Trainer, "close", "close"),
    (trainer.Trainer, "evaluate", "evaluation"), (trainer.Trainer, "reward", "grading"),
    (trainer, "grade", "grading"), (trainer.Trainer, "prepare", "update"), (learner.Learner, "update", "update"),
    (learner.Learner, "behaviour_logprobs", "update"),
    (generate.Generation, "_prefill", "prefill: batching"),
    (generate.Generation, "_copy_prompts", "prefill: prompt copies"),
    (model.Transformer, "forward_cached", "forward"), (generate.DecodeGraphs, "__call__", "forward"),
    (generate.Generation, "_sampled", "sampling and checks"),
    (generate.Generation, "_take_tool_results", "tool results (wait + splice)"),
    (generate.Engine, "generate", "engine bookkeeping"),
    (run_state.RunLog, "metrics", "logging"), (run_state.RunLog, "samples", "logging"),
    (trainer.Trainer, "save_checkpoint", "checkpoint"), (trainer.Trainer, "train", "loop"),
]
seconds, calls, stack, main = defaultdict(float), defaultdict(int), [], threading.main_thread()
runs, runs_lock = {"n": 0, "s": 0.0}, threading.Lock()   # counted from the sandbox's worker threads


def install():
    for owner, attr, phase in PHASES:
        setattr(owner, attr, _wrap(getattr(owner, attr), phase))
    submit = Sandbox.submit   # what the engine calls (Sandbox.run goes through it too)

    def count(future):
        if not future.cancelled() and future.exception() is None:
            with runs_lock:
                runs["n"], runs["s"] = runs["n"] + 1, runs["s"] + future.result().duration_s

    def counted(self, code, *a, **k):
        future = submit(self, code, *a, **k)
        future.add_done_callback(count)
        return future
    Sandbox.submit = counted


def _wrap(fn, phase):
    def run(*args, **kwargs):
        if threading.current_thread() is not main:
            return fn(*args, **kwargs)
        name = phase
        if phase == "forward":
            name = "decode" if args[1].shape[1] == 1 else "prefill"
        if any(p.startswith("evaluation") for p, _ in stack) and not name.startswith("evaluation"):
            name = f"evaluation: {name}"
        now = time.perf_counter()
        if stack:
            seconds[stack[-1][0]] += now - stack[-1][1]
        stack.append([name, now])
        calls[name] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            now = time.perf_counter()
            top = stack.pop()
            seconds[top[0]] += now - top[1]
            if stack:
                stack[-1][1] = now
    return run


if __name__ == "__main__":
    install()
    started = time.perf_counter()
    seconds["imports"] = started - T0
    train.main(sys.argv[1:])
    total = time.perf_counter() - T0
    seconds["other"] = total - sum(seconds.values())
    print("\n| phase | seconds | share | calls | ms per call |\n|---|---|---|---|---|")
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        n = calls.get(name, 0)
        print(f"| {name} | {s:.1f} | {s / total:.0%} | {n or ''} | {f'{s / n * 1e3:.1f}' if n else ''} |")
    print(f"| **total** | **{total:.1f}** | | | |")
    each = runs["s"] / max(runs["n"], 1) * 1e3
    print(f"\nsandbox: {runs['n']} runs, {runs['s']:.1f} s of their own time ({each:.1f} ms each), on the "
          f"sandbox's workers beside the main thread")
