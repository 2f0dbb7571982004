"""The generator/trainer log-prob gap of the GPU recipe, emulated on this CPU: the generator decodes with a
bfloat16 copy of the weights, the trainer recomputes the same tokens from float32 weights (plain, and under
bfloat16 autocast as it does on CUDA). SmolLM2-135M, the first MATH-500 problems in the zero_tir prompt,
2 responses each sampled at T=1. Prints the gap |log pi_generator - log pi_trainer| per token and how often the
truncated importance weight pi_trainer / pi_generator would reach a cap.

    python benchmarks/logprob_gap.py [--problems 4] [--tokens 128]
"""
import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minitir import load_pretrained  # noqa: E402
from minitir.generate import generate  # noqa: E402
from minitir.tasks import get_template, load_benchmark, render_prompt  # noqa: E402


def teacher_forced(model, prompts, outs, autocast: bool) -> torch.Tensor:
    """Each response's log-probs recomputed by `model` in one forward over prompt + response [tokens]."""
    res = []
    for p, c in zip(prompts, outs):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(torch.tensor([p + c.tokens]))[0, len(p) - 1:-1].float()
        res.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1))
    return torch.cat(res)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    model, tok = load_pretrained("smollm2-135m")
    problems, _ = load_benchmark("math500", ROOT / "data", limit=a.problems)
    template = get_template("zero_tir")
    prompts = [tok(render_prompt(template, p.question, tok)).input_ids for p in problems for _ in range(2)]
    decoder = copy.deepcopy(model).to(torch.bfloat16)
    outs = generate(decoder, tok, prompts, max_new_tokens=a.tokens, temperature=1.0, seed=0, ignore_eos=True)
    gen = torch.tensor([lp for c in outs for lp in c.logprobs])
    print(f"{len(gen)} tokens sampled by the bfloat16 copy")
    print("| trainer | mean gap | p99 gap | max gap | weight >= 2 | weight <= 0.5 |\n|---|---|---|---|---|---|")
    for name, m, autocast in (("float32", model, False), ("float32 under bfloat16 autocast", model, True),
                              ("the bfloat16 copy itself, teacher-forced", decoder, False)):
        logp = teacher_forced(m, prompts, outs, autocast)
        gap, w = (gen - logp).abs(), torch.exp(logp - gen)
        print(f"| {name} | {gap.mean():.4f} | {gap.quantile(0.99):.4f} | {gap.max():.4f} | "
              f"{(w >= 2).float().mean():.4f} | {(w <= 0.5).float().mean():.4f} |")


if __name__ == "__main__":
    main()
