"""What an ablation concludes from its runs: final held-out metrics per variant with 95% intervals over seeds,
their means over the run (the learning curve's area), differences to the first variant paired by seed,
steps to a threshold, the curves with bands, and a Markdown table that says "no difference" where the
interval contains 0. ablate.py runs the variants; this module only reads their metrics.jsonl files.

The interval is Student's t on the mean over seeds, mean +- t(0.975, n - 1) s / sqrt(n), chosen by measured
coverage (benchmarks/interval_coverage.py, docs/ablations.md): on simulated seeds like the table's it held
the true mean 92-95% of the time at 3, 5 and 10 seeds, where the expanded percentile bootstrap used before
held it 74-89% at 3 and 5 and BCa 72-85%. No method holds it when a fifth of the seeds fail outright (two
clusters: ~73% at 5 seeds, t included). Below MIN_SEEDS seeds there is no interval: the table shows the
values and says "too few seeds". Read an interval that barely excludes 0 as weak evidence.
"""
from __future__ import annotations

import math
from pathlib import Path

from minitir.plot import read_metrics, series

METRICS = ("eval/accuracy", "eval/code_ratio", "eval/response_length", "eval/format_failure_rate")
THRESHOLDS = {"eval/accuracy": 0.5, "eval/code_ratio": 0.5}   # steps_to: the first evaluation at or above
MIN_SEEDS = 3   # fewer: no interval, no verdict


# Student's t, 97.5th percentile, by degrees of freedom (beyond 30: a two-term expansion around the normal's)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    z = 1.959964
    return T975[df - 1] if df <= len(T975) else z + (z ** 3 + z) / (4 * df)


def interval(values: list[float]) -> dict:
    """{"mean", "ci_low", "ci_high", "values"}: the mean and its 95% Student's t interval; with fewer than
    MIN_SEEDS values the bounds are None (too few seeds to say anything but the values)."""
    n = len(values)
    if n == 0:
        raise ValueError("interval: no values")
    mean = sum(values) / n
    if n < MIN_SEEDS:
        return {"mean": mean, "ci_low": None, "ci_high": None, "values": list(values)}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "values": list(values)}


def final(rows: list[dict], metric: str) -> float:
    """The metric at the run's last evaluation."""
    xs, ys = series(rows, metric)
    if not xs:
        raise ValueError(f"no {metric} in the run's metrics (is --eval-size 0?)")
    return ys[-1]


def curve_mean(rows: list[dict], metric: str) -> float:
    """The metric averaged over the run's evaluations, the first (before training) included: the area under
    its learning curve over the run's length, which tells a faster learner from a slower one when both end
    at the same place."""
    ys = series(rows, metric)[1]
    return sum(ys) / len(ys)


def steps_to(rows: list[dict], metric: str, threshold: float) -> int | None:
    """The first evaluated step at which the metric is >= threshold, None if never."""
    return next((s for s, y in zip(*series(rows, metric)) if y >= threshold), None)


def paired_diffs(f, mine: dict, base: dict, seeds: list[int], metrics: list[str]) -> dict:
    """{metric: the interval of f(variant's run) - f(first variant's run), seed by seed, and "pairs"}."""
    return {m: {**interval([f(mine[s], m) - f(base[s], m) for s in seeds]), "pairs": len(seeds)} for m in metrics}


def logged_metrics(runs: list[list[dict]]) -> list[str]:
    """The METRICS every run logged at each of its evaluations (runs made before a metric existed lack it)."""
    return [m for m in METRICS if all(series(r, m)[0] == series(r, METRICS[0])[0] for r in runs)]


def summarise(variants: list[dict]) -> dict:
    """variants: [{"name", "overrides", "steps", "runs": {seed: run_dir}}], the first one the baseline -> the
    ablation.json object. A run that never reaches a threshold counts as its last step in steps_to (the mean
    is then a lower bound; "reached" says how many did)."""
    rows = {v["name"]: {s: read_metrics(d) for s, d in v["runs"].items()} for v in variants}
    base = rows[variants[0]["name"]]
    metrics = logged_metrics([r for runs in rows.values() for r in runs.values()])
    out = []
    for v in variants:
        mine = rows[v["name"]]
        seeds = sorted(mine)
        entry = {"name": v["name"], "overrides": v["overrides"], "seeds": seeds,
                 "runs": [str(v["runs"][s]) for s in seeds],
                 "final": {m: interval([final(mine[s], m) for s in seeds]) for m in metrics},
                 "curve_mean": {m: interval([curve_mean(mine[s], m) for s in seeds]) for m in metrics},
                 "diff_vs_first": {}, "curve_mean_diff_vs_first": {}, "steps_to": {}}
        paired = [s for s in seeds if s in base]
        if v is not variants[0] and paired:
            entry["diff_vs_first"] = paired_diffs(final, mine, base, paired, metrics)
            # a curve mean compares like with like only over the same evaluation steps
            if all(series(mine[s], m)[0] == series(base[s], m)[0] for s in paired for m in metrics):
                entry["curve_mean_diff_vs_first"] = paired_diffs(curve_mean, mine, base, paired, metrics)
        for m, t in THRESHOLDS.items():
            hit = [steps_to(mine[s], m, t) for s in seeds]
            entry["steps_to"][f"{m}>={t:g}"] = {**interval([v["steps"] if h is None else h for h in hit]),
                                                "reached": sum(h is not None for h in hit)}
        out.append(entry)
    return {"variants": out, "interval": f"95% Student's t interval of the mean over seeds (none below {MIN_SEEDS})"}


def contains_zero(ci: dict) -> bool:
    return ci["ci_low"] <= 0 <= ci["ci_high"]


def too_few(ci: dict, sign: str = "") -> str:
    return f"{ci['mean']:{sign}.2f} (values {', '.join(f'{v:{sign}.2f}' for v in ci['values'])}: too few seeds)"


def markdown_table(summary: dict) -> str:
    """One row per variant: final metrics with intervals, their differences to the first variant, and the
    difference in held-out accuracy averaged over the run (who learns faster)."""
    names = {"eval/accuracy": "accuracy", "eval/code_ratio": "code ratio", "eval/response_length": "length",
             "eval/format_failure_rate": "format failures"}
    names = {m: n for m, n in names.items() if m in summary["variants"][0]["final"]}

    def cell(ci, sign=""):
        if ci["ci_low"] is None:
            return too_few(ci, sign)
        return f"{ci['mean']:{sign}.2f} [{ci['ci_low']:{sign}.2f}, {ci['ci_high']:{sign}.2f}]"

    def diff(d, first):
        if d is None:
            return "(first)" if first else "n/a (other evaluation steps)"
        if d["ci_low"] is None:
            return cell(d, "+")
        return f"no difference at {d['pairs']} seeds ({cell(d, '+')})" if contains_zero(d) else cell(d, "+")

    head = (["variant", "seeds"] + list(names.values()) + [f"Δ {n} vs first" for n in names.values()]
            + ["Δ accuracy over the run"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = summary["variants"][0]
    for v in summary["variants"]:
        cells = ([v["name"], str(len(v["runs"]))] + [cell(v["final"][m]) for m in names]
                 + [diff(v["diff_vs_first"].get(m), v is first) for m in names]
                 + [diff(v["curve_mean_diff_vs_first"].get("eval/accuracy"), v is first)])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(variants: list[dict], path: Path) -> Path:
    """The held-out curves against step, per variant the mean over seeds and its interval's band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {v["name"]: [read_metrics(d) for d in v["runs"].values()] for v in variants}
    metrics = logged_metrics(sum(runs.values(), []))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.3 * len(metrics), 3.8), squeeze=False)
    axes = axes[0]   # one row of one or more plots
    for i, v in enumerate(variants):
        for ax, m in zip(axes, metrics):
            by_step: dict[int, list[float]] = {}
            for rows in runs[v["name"]]:
                for s, y in zip(*series(rows, m)):
                    by_step.setdefault(s, []).append(y)
            steps = sorted(by_step)
            cis = [interval(by_step[s]) for s in steps]
            ax.plot(steps, [c["mean"] for c in cis], color=f"C{i}", marker="o", markersize=3,
                    label=f"{v['name']} ({len(runs[v['name']])} seeds)")
            if all(c["ci_low"] is not None for c in cis):   # no band below MIN_SEEDS seeds
                ax.fill_between(steps, [c["ci_low"] for c in cis], [c["ci_high"] for c in cis], color=f"C{i}",
                                alpha=0.2)
    for ax, m in zip(axes, metrics):
        ax.set_title(f"held-out {m.split('/')[1].replace('_', ' ')}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
