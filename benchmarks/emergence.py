"""Tool use emerging from outcome reward, in miniature, with the paper's comparison: the same pretrained base
model trained with tools (ZeroTIR: the zero_tir prompt, code executed) and without (ZeroRL: the zero_rl
prompt, nothing executed). Writes both runs, one figure of the two and a table of held-out numbers.

    python benchmarks/emergence.py [--seed 0] [--out runs/emergence]   (extra flags go to both train.py runs)

What `python train.py` runs is the ZeroTIR half, from the base model shipped in minitir/miniature_base
(`python -m minitir.miniature` rebuilds it).
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from minitir import plot  # noqa: E402
from minitir.trainer import Trainer  # noqa: E402

RUNS = {"ZeroTIR (tools)": [], "ZeroRL (no tools)": ["--prompt", "zero_rl"]}


def held_out(rows: list[dict]) -> tuple[dict, dict]:
    """(first, last) held-out evaluation of a run."""
    evals = [r for r in rows if "eval/accuracy" in r]
    return evals[0], evals[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "emergence"))
    a, extra = ap.parse_known_args()
    out = Path(a.out)
    results, walls = {}, {}
    for name, flags in RUNS.items():
        run = "zerotir" if not flags else "zerorl"
        cfg, _ = train.parse(["--seed", str(a.seed), "--run-dir", str(out), "--run-name", run, "--no-tensorboard",
                              "--print-every", "0"] + flags + extra)
        t = time.time()
        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
        walls[name] = time.time() - t
        results[name] = plot.read_metrics(out / run)
    fig = plot.scaling_figure(results, out / "emergence.png")
    table = {"command": "python benchmarks/emergence.py " + " ".join(sys.argv[1:]), "seed": a.seed,
             "runs": {}}
    print("| run | held-out code ratio | held-out accuracy | held-out response length | Spearman(step, code / acc / length) | wall s |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        first, last = held_out(rows)
        corr = plot.analyse(rows)["corr"]
        rho = [corr[f"step~{k}"].get("spearman") for k in ("code_ratio", "accuracy", "response_length")]
        fmt = lambda k, d=2: f"{first[k]:.{d}f} -> {last[k]:.{d}f}"
        print(f"| {name} | {fmt('eval/code_ratio')} | {fmt('eval/accuracy')} | {fmt('eval/response_length', 0)} | "
              f"{' / '.join('undefined' if r is None else f'{r:.2f}' for r in rho)} | {walls[name]:.0f} |")
        table["runs"][name] = {"first": first, "last": last, "spearman_step": rho, "wall_s": round(walls[name], 1)}
    (out / "emergence.json").write_text(json.dumps(table, indent=2))
    print(f"figure: {fig}\ntable: {out / 'emergence.json'}")


if __name__ == "__main__":
    main()
