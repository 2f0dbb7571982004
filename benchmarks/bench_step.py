"""Time per RL step of the smollm2-cpu preset (SmolLM2-135M, 2 prompts x 4 responses, up to 160 new
tokens), split into generate / tools / grade / train.

    python benchmarks/bench_step.py [--steps 3]      (extra flags go to train.py, e.g. --max-new-tokens 64)
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from minitir.trainer import Trainer  # noqa: E402


def main():
    args = sys.argv[1:]
    steps = 3
    if "--steps" in args:
        steps = int(args[args.index("--steps") + 1])
    with tempfile.TemporaryDirectory() as d:
        cfg, _ = train.parse(["--config", "smollm2-cpu", "--steps", str(steps), "--run-dir", d, "--run-name", "bench", "--eval-size", "0",
                              "--no-tensorboard"] + [a for a in args if a != "--steps" and a != str(steps)])
        t = Trainer(cfg)
        try:
            rows = [t.train_step() for _ in range(cfg.steps)]
        finally:
            t.close()
    print(f"smollm2-cpu: {cfg.model}, {cfg.prompts_per_step} prompts x {cfg.n_samples} responses, "
          f"max {cfg.max_new_tokens} new tokens, {cfg.checkpointing} checkpointing")
    print("| step | generate s | tools s (overlapped) | grade s | train s | total s | generated tokens/s | response length |")
    print("|---|---|---|---|---|---|---|---|")
    for m in rows:
        total = m["time/generate_s"] + m["time/grade_s"] + m["time/train_s"]
        print(f"| {m['step']} | {m['time/generate_s']:.1f} | {m['time/tools_s']:.2f} | {m['time/grade_s']:.2f} | "
              f"{m['time/train_s']:.1f} | {total:.1f} | {m['tokens_per_s']:.1f} | {m['response_length_all']:.0f} |")
    print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("time")}))


if __name__ == "__main__":
    main()
