"""The generator/trainer log-prob gap of the GPU recipe, emulated on this CPU: the generator decodes with a
bfloat16 copy of the weights, the trainer recomputes the same tokens from float32 weights under bfloat16
autocast through its own packed forward and head (Transformer.hidden_packed, logprobs.token_logprobs), with
batch invariance (the default: the gap must be exactly 0) and without (SDPA in the packed forward), and from
the float32 weights without autocast (a different precision: what a float32 trainer would see). SmolLM2-135M,
the first MATH-500 problems in the zero_tir prompt, 2 responses each sampled at T=1. Prints the gap
|log pi_generator - log pi_trainer| per token and how often the truncated importance weight
pi_trainer / pi_generator would reach a cap.

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
from minitir.logprobs import token_logprobs  # noqa: E402
from minitir.tasks import get_template, load_benchmark, render_prompt  # noqa: E402


def trainer_logprobs(model, prompts, outs, autocast: bool, invariant: bool) -> torch.Tensor:
    """Each response's log-probs as the trainer computes them: one packed forward over prompt + response, the
    chunked head at the policy positions [tokens]."""
    model.batch_invariant, res = invariant, []
    for p, c in zip(prompts, outs):
        ids = torch.tensor(p + c.tokens)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = model.hidden_packed(ids, torch.tensor([0, len(ids)], dtype=torch.int32))[len(p) - 1:-1]
            res.append(token_logprobs(h, model.lm_head.weight, torch.tensor(c.tokens), invariant=invariant)[0])
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
    for name, autocast, invariant in (("float32 masters under bfloat16 autocast, batch invariant (default)", True, True),
                                      ("float32 masters under bfloat16 autocast, --no-batch-invariant", True, False),
                                      ("float32 weights, float32 (another precision)", False, True)):
        logp = trainer_logprobs(model, prompts, outs, autocast, invariant)
        gap, w = (gen - logp).abs(), torch.exp(logp - gen)
        print(f"| {name} | {gap.mean():.4f} | {gap.quantile(0.99):.4f} | {gap.max():.4f} | "
              f"{(w >= 2).float().mean():.4f} | {(w <= 0.5).float().mean():.4f} |")


if __name__ == "__main__":
    main()
