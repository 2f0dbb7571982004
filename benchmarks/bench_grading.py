"""Grading throughput on MATH-500: gold vs gold and gold vs perturbed answers, time limit active.

    python benchmarks/bench_grading.py [--workers 2]
"""
import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minitir.reward import Grader  # noqa: E402
from minitir.tasks import load_problems  # noqa: E402


def perturb(ans: str) -> str:
    """Change the first number of an answer (or append '+1'), so the pair is almost always unequal."""
    m = re.search(r"\d+", ans)
    return ans[:m.start()] + str(int(m.group()) + 1) + ans[m.end():] if m else ans + "+1"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", default=str(ROOT / "data" / "math500.jsonl"))
    a = ap.parse_args()
    problems, _ = load_problems(a.data)
    golds = [p.answer for p in problems]
    g = Grader(workers=a.workers, timeout_s=5)
    g.math_equal_many([("1", "2")] * 4)  # start the workers
    print("| pairs | checks | seconds | checks/s | equal |")
    print("|---|---|---|---|---|")
    # gold vs gold is mostly answered by the normalised-string shortcut, as in training; gold vs perturbed
    # goes through math-verify's parse and verify in the worker processes for every pair
    for name, pairs in (("gold vs gold", [(f"${x}$", x) for x in golds]),
                        ("gold vs perturbed", [(perturb(x), x) for x in golds])):
        t = time.perf_counter()
        res = g.math_equal_many(pairs)
        dt = time.perf_counter() - t
        print(f"| {name} | {len(pairs)} | {dt:.2f} | {len(pairs) / dt:.0f} | {sum(res)} |")
    g.close()


if __name__ == "__main__":
    main()
