"""Entry point for RL training. The trainer (GRPO/PPO/REINFORCE++) is not built yet: until it is, this
runs a smoke test of the stack it will drive: load the model, generate with the KV-cached engine.

    python train.py [--model smollm2-135m] [--max-new-tokens 48]
"""
import argparse
import time

import torch

from minitir import load_pretrained
from minitir.generate import generate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.time()
    model, tok = load_pretrained(a.model, device=device)
    print(f"loaded {a.model}: {model.num_parameters() / 1e6:.0f}M parameters, {model.dtype}, {device} "
          f"in {time.time() - t:.1f}s")
    prompts = ["What is 17 * 23? Answer:", "def is_prime(n):"]
    t = time.time()
    outs = generate(model, tok, [tok.encode(p) for p in prompts], max_new_tokens=a.max_new_tokens, temperature=0)
    n = sum(len(o.tokens) for o in outs)
    for p, o in zip(prompts, outs):
        print(f"--- {p!r} -> {o.text!r} ({o.finish_reason})")
    print(f"{n} tokens in {time.time() - t:.1f}s; the RL trainer is the next step (see README)")


if __name__ == "__main__":
    main()
