"""The scaling analysis: how code use, response length and accuracy grow together over training.

    python -m minitir.plot runs/A [runs/B ...] [--out DIR] [--smooth 0.9]

Reads each run's metrics.jsonl; writes scaling.png (code ratio, response length and accuracy against
step, one panel each, runs overlaid, evaluation accuracy dashed), a PNG per metric (raw and smoothed), and
summary.json with, per run, the Pearson and Spearman correlations of the three with each other and with
the step, and a trend fit y = a + b * ln(step) with its R^2 for each metric; the same is printed. A
correlation with a constant series is undefined: it is reported as null with the reason. Every training
run writes its own scaling.png and scaling.json when it ends (`write_scaling`).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from minitir.tasks import iter_jsonl

METRICS = {"code_ratio": "code ratio (responses with code)", "response_length": "response length (policy tokens)",
           "accuracy": "training accuracy", "eval/accuracy": "evaluation accuracy"}


class MetricsError(ValueError):
    pass


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl" if Path(run_dir).is_dir() else Path(run_dir)
    if not path.exists():
        raise MetricsError(f"{path}: not found (pass a run directory written by train.py or its metrics.jsonl)")
    rows = []
    for n, row in iter_jsonl(path, MetricsError):
        if not isinstance(row.get("step"), int):
            raise MetricsError(f"{path}:{n}: each line must be an object with an integer 'step'")
        rows.append(row)
    if not rows:
        raise MetricsError(f"{path}: no metrics yet (the run has not finished a step)")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def ema(ys: list[float], alpha: float) -> list[float]:
    out, m = [], None
    for y in ys:
        m = y if m is None else alpha * m + (1 - alpha) * y
        out.append(m)
    return out


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson's r; nan when either series is constant or shorter than 3 (see `correlation`)."""
    n = len(x)
    if n < 3:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def correlation(x: list[float], y: list[float], names: tuple[str, str]) -> dict:
    """{"pearson", "spearman"} of two series, or both None and "undefined": why (too few points, or a
    series that does not vary, whose correlation with anything is 0/0)."""
    why = None
    if len(x) < 3:
        why = f"only {len(x)} points (3 needed)"
    else:
        flat = [f"{n} is constant ({v[0]:g}) over all {len(v)} points"
                for n, v in zip(names, (x, y)) if min(v) == max(v)]
        why = " and ".join(flat) or None
    if why:
        return {"pearson": None, "spearman": None, "undefined": why}
    return {"pearson": pearson(x, y), "spearman": spearman(x, y)}


def ranks(x: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(ranks(x), ranks(y))


def log_trend(steps: list[int], ys: list[float]) -> dict:
    """Least squares y = a + b ln(step) -> {"a", "b", "r2"}."""
    if len(steps) < 3:
        return {"a": float("nan"), "b": float("nan"), "r2": float("nan")}
    xs = [math.log(s) for s in steps]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"a": a, "b": b, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")}


def analyse(rows: list[dict]) -> dict:
    """Correlations of code ratio, accuracy and response length with each other and with the step, over
    the training steps (step 0, an evaluation before training, has none of them), and log-step trends."""
    keys = ("code_ratio", "accuracy", "response_length")
    aligned = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in keys)]
    col = {k: [float(r[k]) for r in aligned] for k in keys}
    col["step"] = [float(r["step"]) for r in aligned]
    pairs = [("code_ratio", "accuracy"), ("code_ratio", "response_length"), ("response_length", "accuracy"),
             ("step", "code_ratio"), ("step", "response_length"), ("step", "accuracy")]
    return {"steps": len(aligned),
            "corr": {f"{a}~{b}": correlation(col[a], col[b], (a, b)) for a, b in pairs},
            "trend_vs_log_step": {k: log_trend(*series([r for r in rows if r["step"] > 0], k)) for k in METRICS
                                  if series([r for r in rows if r["step"] > 0], k)[0]}}


def scaling_figure(runs: dict[str, list[dict]], path: Path) -> Path:
    """One figure, a panel each for code ratio, response length and accuracy against step (integer ticks),
    runs overlaid: the training batches' values solid, the held-out evaluations' (where logged) dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    titles = {"code_ratio": "code ratio (responses with code)", "response_length": "response length (policy tokens)",
              "accuracy": "accuracy"}
    for ax, key in zip(axes, titles):
        for i, (name, rows) in enumerate(runs.items()):
            xs, ys = series(rows, key)
            ax.plot(xs, ys, color=f"C{i}", marker="o", markersize=3, linewidth=1.5, label=f"{name} (training)")
            ex, ey = series(rows, f"eval/{key}")
            if ex:
                ax.plot(ex, ey, color=f"C{i}", linestyle="--", marker="s", markersize=4, label=f"{name} (held-out)")
        ax.set_title(titles[key])
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if key != "response_length":
            ax.set_ylim(-0.03, 1.03)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_scaling(run_dir: str | Path) -> tuple[Path, Path]:
    """run_dir/scaling.png and run_dir/scaling.json from its metrics.jsonl."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    (run_dir / "scaling.json").write_text(json.dumps(analyse(rows), indent=2))
    return scaling_figure({run_dir.name: rows}, run_dir / "scaling.png"), run_dir / "scaling.json"


def plot_runs(runs: dict[str, list[dict]], out: Path, smooth: float) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for key, label in METRICS.items():
        if not any(series(rows, key)[0] for rows in runs.values()):
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, (name, rows) in enumerate(runs.items()):
            xs, ys = series(rows, key)
            if not xs:
                continue
            color = f"C{i}"
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1)
            ax.plot(xs, ema(ys, smooth), color=color, linewidth=2, label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    ap.add_argument("--out", default="", help="output directory (default: the first run's plots/)")
    ap.add_argument("--smooth", type=float, default=0.9, help="EMA weight for the smoothed curves")
    a = ap.parse_args(argv)
    try:
        runs = {}
        for r in a.runs:
            name = Path(r).name if Path(r).is_dir() else Path(r).parent.name
            runs[name if name not in runs else r] = read_metrics(r)
    except MetricsError as e:
        raise SystemExit(f"minitir.plot: {e}")
    out = Path(a.out) if a.out else (Path(a.runs[0]) if Path(a.runs[0]).is_dir() else Path(a.runs[0]).parent) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    figures = [scaling_figure(runs, out / "scaling.png")] + plot_runs(runs, out, a.smooth)
    summary = {name: analyse(rows) for name, rows in runs.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, s in summary.items():
        print(f"{name}: {s['steps']} steps")
        for pair, c in s["corr"].items():
            print(f"  {pair:28s} " + (f"undefined: {c['undefined']}" if "undefined" in c else
                                      f"pearson {c['pearson']:+.3f}  spearman {c['spearman']:+.3f}"))
        for k, t in s["trend_vs_log_step"].items():
            print(f"  {k:28s} = {t['a']:.3f} + {t['b']:.3f} ln(step)   R^2 {t['r2']:.3f}")
    print(f"figures: {', '.join(str(p) for p in figures)}\nsummary: {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
