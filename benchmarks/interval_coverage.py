"""How often a 95% interval over seeds covers the true mean, by method, seeds and kind of data.

    python benchmarks/interval_coverage.py [--trials 4000]

An ablation's table puts an interval on the mean of a few seeds' final metrics; this simulates what such
values look like and counts how often each method's interval holds the mean they were drawn around:

  normal      N(0.6, 0.05): the textbook case
  accuracy    a held-out accuracy near the ceiling: each seed's true accuracy p ~ Beta(18, 2.2) (mean 0.89,
              skewed left), graded on 64 problems: Binomial(64, p) / 64, as the miniature's table
  one fails   a run that sometimes never takes off: with probability 0.2 a seed ends at ~0.03, else ~0.89
              (both with the accuracy's noise): two clusters, as seeds that never cross 0.5 give

Methods: the expanded percentile bootstrap (Hesterberg; ablation.py before 2026-12-06), Student's t on
the mean, and the bias-corrected and accelerated bootstrap (BCa, Efron; jackknife acceleration), each
with B = 2,000 resamples. Prints a Markdown table (coverage and median width) for docs/ablations.md.
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minitir.ablation import t975  # noqa: E402

Z975 = 1.959964


def normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def normal_ppf(p):
    lo, hi = -10.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if normal_cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def draw(kind: str, n: int, rng) -> np.ndarray:
    if kind == "normal":
        return rng.normal(0.6, 0.05, n)
    p = rng.beta(18, 2.2, n)
    if kind == "one fails":
        p = np.where(rng.random(n) < 0.2, rng.beta(1.5, 48, n), p)
    return rng.binomial(64, p) / 64


TRUE = {"normal": 0.6, "accuracy": 18 / 20.2, "one fails": 0.8 * 18 / 20.2 + 0.2 * 1.5 / 49.5}


def tail(n: int) -> float:
    """Hesterberg's expanded tail probability a / 2 for n values (0.025 in the limit)."""
    return normal_cdf(-math.sqrt(n / (n - 1)) * t975(n - 1))


def t_interval(x):
    n, m = len(x), x.mean()
    h = t975(n - 1) * x.std(ddof=1) / math.sqrt(n)
    return m - h, m + h


def boot_means(x, rng, b=2000):
    return x[rng.integers(0, len(x), (b, len(x)))].mean(1)


def expanded_percentile(x, rng):
    means, a = np.sort(boot_means(x, rng)), 100 * tail(len(x))
    return np.percentile(means, a), np.percentile(means, 100 - a)


def bca(x, rng):
    n, m = len(x), x.mean()
    means = boot_means(x, rng)
    frac = ((means < m).sum() + 0.5 * (means == m).sum()) / len(means)
    z0 = normal_ppf(min(max(frac, 1e-6), 1 - 1e-6))
    jack = np.array([np.delete(x, i).mean() for i in range(n)])
    d = jack.mean() - jack
    den = 6 * (d ** 2).sum() ** 1.5
    acc = (d ** 3).sum() / den if den > 0 else 0.0
    out = []
    for z in (-Z975, Z975):
        q = normal_cdf(z0 + (z0 + z) / (1 - acc * (z0 + z)))
        out.append(np.percentile(means, 100 * q))
    return tuple(out)


METHODS = {"expanded percentile bootstrap": expanded_percentile, "Student's t": lambda x, rng: t_interval(x),
           "BCa bootstrap": bca}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4000)
    a = ap.parse_args()
    print("| data | seeds | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for kind in TRUE:
        for n in (3, 5, 10):
            rng = np.random.default_rng(0)
            hits, widths = {k: 0 for k in METHODS}, {k: [] for k in METHODS}
            for _ in range(a.trials):
                x = draw(kind, n, rng)
                for name, f in METHODS.items():
                    lo, hi = f(x, rng)
                    hits[name] += lo <= TRUE[kind] <= hi
                    widths[name].append(hi - lo)
            cells = [f"{100 * hits[k] / a.trials:.1f}% ({np.median(widths[k]):.3f})" for k in METHODS]
            print(f"| {kind} | {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
