"""Time per RL step of the smollm2-cpu preset (SmolLM2-135M, 2 prompts x 4 responses, up to 160 new
tokens, the zero_tir prompt with its sandbox), split into generate / tools (the runs' own time) / grade / score / update; and, when trl
is installed (not a requirement of minitir), TRL's GRPOTrainer on the same problems in the same order, with
the same sampling, group shape, token budget, optimizer and checkpointing (full), in the same run.

    python benchmarks/bench_step.py [--steps 3] [--no-trl]   (other flags go to train.py, e.g. --no-batch-invariant)

The first step of each is a warm-up and left out of the averages. TRL generates through transformers'
generate without a tool and without stop strings, so its responses run to the token limit; a second minitir
run generates the same way (no stop strings, no tool, EOS ignored: every response max_new_tokens long), so
the two steps hold the same tokens and compare as they are.
"""
import dataclasses
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from minitir import trainer  # noqa: E402
from minitir.config import compute_dtype  # noqa: E402
from minitir.rollout import generation_config  # noqa: E402


def minitir_rows(cfg, like_trl: bool = False):
    """One row of metrics per step. like_trl: responses generated as TRL's are, each max_new_tokens long."""
    def without_stops(template, **kw):
        return dataclasses.replace(generation_config(template, **kw), stop=(), max_tool_calls=0, ignore_eos=True)

    trainer.generation_config = without_stops if like_trl else generation_config
    t = trainer.Trainer(cfg)
    try:
        return [t.train_step() for _ in range(cfg.steps)]
    finally:
        t.close()
        trainer.generation_config = generation_config


def trl_rows(cfg, bf16: bool):
    """[(seconds, generated tokens)] per GRPOTrainer step; the problems are the ones minitir draws. bf16: TRL's
    bfloat16 option (the Trainer's CPU autocast), else float32 as a CPU user runs it."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from minitir.checkpoint import resolve
    from minitir.reward import grade
    from minitir.tasks import ProblemStream, get_template, render_prompt, training_problems
    problems = ProblemStream(training_problems(cfg, say=lambda *a: None)[0], cfg.seed).next(cfg.prompts_per_step * cfg.steps)
    template = get_template(cfg.prompt)
    data = Dataset.from_list([{"prompt": render_prompt(template, p.question), "gold": p.answer} for p in problems])
    path = str(resolve(cfg.model))
    tokens, rows = [], []

    def reward(completions, gold, completion_ids, **_):
        tokens.append(sum(len(c) for c in completion_ids))
        return [float(grade(c, g)) for c, g in zip(completions, gold)]

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            rows.append((time.perf_counter() - self.t, tokens[-1]))

    with tempfile.TemporaryDirectory() as d:
        args = GRPOConfig(output_dir=d, use_cpu=True, bf16=bf16, seed=cfg.seed, max_steps=cfg.steps,
                          per_device_train_batch_size=cfg.prompts_per_step * cfg.n_samples, num_generations=cfg.n_samples,
                          max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          learning_rate=cfg.lr, lr_scheduler_type="constant", optim="adamw_torch", max_grad_norm=cfg.grad_clip,
                          adam_beta1=cfg.adam_betas[0], adam_beta2=cfg.adam_betas[1], beta=0.0, num_iterations=1,
                          gradient_checkpointing=cfg.checkpointing != "none", shuffle_dataset=False,
                          save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                    processing_class=AutoTokenizer.from_pretrained(path, padding_side="left"),
                    callbacks=[Clock()]).train()
    return rows


def main():
    args = sys.argv[1:]
    use_trl = "--no-trl" not in args and importlib.util.find_spec("trl") is not None
    args = [a for a in args if a != "--no-trl"]
    steps = 3
    if "--steps" in args:
        steps = int(args[args.index("--steps") + 1])
    with tempfile.TemporaryDirectory() as d:
        cfg, _ = train.parse(["--config", "smollm2-cpu", "--steps", str(steps), "--run-dir", d, "--run-name", "bench", "--eval-size", "0",
                              "--no-tensorboard"] + [a for a in args if a != "--steps" and a != str(steps)])
        rows = minitir_rows(cfg)
        dtype = compute_dtype(cfg.dtype, torch.device("cpu"))
        same = {x: minitir_rows(dataclasses.replace(cfg, run_name=f"bench-as-trl-{x}", dtype=x), like_trl=True)
                for x in dict.fromkeys((dtype, "float32"))} if use_trl else {}
    print(f"smollm2-cpu: {cfg.model}, {cfg.prompts_per_step} prompts x {cfg.n_samples} responses, "
          f"max {cfg.max_new_tokens} new tokens, {cfg.checkpointing} checkpointing, {torch.get_num_threads()} threads, "
          f"{dtype}, batch invariant: {cfg.batch_invariant}")
    print("| step | generate s | tools s (the runs' own, overlapped) | grade s | score s | update s | total s | "
          "generated tokens/s | response length |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in rows:
        total = m["time/generate_s"] + m["time/grade_s"] + m["time/train_s"]
        print(f"| {m['step']} | {m['time/generate_s']:.1f} | {m['time/tools_s']:.2f} | {m['time/grade_s']:.2f} | "
              f"{m['time/score_s']:.1f} | {m['time/train_s'] - m['time/score_s']:.1f} | {total:.1f} | "
              f"{m['tokens_per_s']:.1f} | {m['response_length_all']:.0f} |")
    print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("time")}))
    if not use_trl:
        print("\nno TRL row (--no-trl, or trl is not installed: pip install trl to measure it)")
        return
    theirs = {"float32": trl_rows(cfg, bf16=False)}
    try:
        theirs["bfloat16"] = trl_rows(cfg, bf16=True)
    except Exception as e:   # TRL's bfloat16 option may refuse a CPU: said, not hidden
        print(f"TRL with bf16=True on CPU failed: {type(e).__name__}: {e}")
    print("\nwhole RL step against TRL's GRPOTrainer (steps after the first)")
    print("| trainer | seconds per step | generated tokens per step | ms per generated token | TRL float32 per token / this |")
    print("|---|---|---|---|---|")
    steps = lambda ms: [(m["time/generate_s"] + m["time/grade_s"] + m["time/train_s"],
                         round(m["response_length"] * cfg.prompts_per_step * cfg.n_samples)) for m in ms]  # sampled tokens
    table = [(f"TRL GRPOTrainer, {k}", r) for k, r in theirs.items()]
    table += [(f"minitir, {dtype} (stop strings, tool)", steps(rows))]
    table += [(f"minitir, {k}, as TRL generates (no stops, no tool, {cfg.max_new_tokens} tokens each)", steps(r))
              for k, r in same.items()]
    per_token = lambda r: sum(x for x, _ in r[1:]) / sum(y for _, y in r[1:])
    for name, r in table:
        s, n = sum(x for x, _ in r[1:]) / len(r[1:]), sum(y for _, y in r[1:]) / len(r[1:])
        print(f"| {name} | {s:.1f} | {n:.0f} | {1000 * s / n:.1f} | {per_token(theirs['float32']) / per_token(r):.2f}x |")


if __name__ == "__main__":
    main()
