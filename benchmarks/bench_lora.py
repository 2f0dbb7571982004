"""How generation should use LoRA adapters: merged into the decode copy once per update (what minitir does),
or applied in every decode step as x W0^T + (alpha/r) (x A^T) B^T. Measured on the miniature and on
SmolLM2-135M, rank 16 on every linear of the decoder, batch 16 (one decode step's rows):

- per decode step, the adapted products of all layers' targets: merged (one product per linear, oneDNN-packed
  as the engine packs them) against applied (the frozen product plus the two low-rank ones);
- per update, the merge: computing W0 + (alpha/r) B A for every target into the decode copy.

    python benchmarks/bench_lora.py [--rank 16] [--rows 16] [--repeat 50]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minitir import load_pretrained, lora  # noqa: E402
from minitir.ops import linear  # noqa: E402


def per_step_ms(fn, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=50)
    a = ap.parse_args()
    print("| model | targets | merged products ms per step | applied (frozen + low-rank) ms per step | "
          "applied / merged | merge per update ms |")
    print("|---|---|---|---|---|---|")
    for name in ("miniature", "smollm2-135m"):
        model, _ = load_pretrained(name)
        lora.add_lora(model, a.rank, 2.0 * a.rank)
        mods = list(lora.lora_modules(model).values())
        with torch.no_grad():
            for m in mods:
                m.lora_B.normal_(0, 0.01)
            # the merged weights as a decode copy holds them: parameters of their own linears (packed on first use)
            merged = [torch.nn.Linear(1, 1, bias=False) for _ in mods]
            for lin, m in zip(merged, mods):
                lin.weight = torch.nn.Parameter(m.weight.clone(), requires_grad=False)
            x = {m.base.weight.shape[1]: torch.randn(a.rows, m.base.weight.shape[1]) for m in mods}
            t_merged = per_step_ms(lambda: [linear(x[lin.weight.shape[1]], lin.weight, None, lin) for lin in merged],
                                   a.repeat)
            t_applied = per_step_ms(lambda: [linear(x[m.base.weight.shape[1]], m.base.weight, None, m.base)
                                             + m.scale * ((x[m.base.weight.shape[1]] @ m.lora_A.t()) @ m.lora_B.t())
                                             for m in mods], a.repeat)
            copy = lora.merged_copy(model)
            params = dict(copy.named_parameters(remove_duplicate=False))
            t_merge = per_step_ms(lambda: [params[n].copy_(w) for n, w in lora.merged_weights(model)], 5)
        print(f"| {name} | {len(mods)} | {t_merged:.2f} | {t_applied:.2f} | {t_applied / t_merged:.2f}x | {t_merge:.1f} |")


if __name__ == "__main__":
    main()
