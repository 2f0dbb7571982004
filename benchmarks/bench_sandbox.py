"""Sandbox latency and throughput against the naive `subprocess.run([python, "-c", code])`.

    python benchmarks/bench_sandbox.py [--n 50] [--as-user 65534] [--container]

--as-user (as root): the fork servers run as that uid and isolate themselves in a user namespace, the path a
normal user's runs take. --container: inside the emulated container of the tests (tests/container.py:
namespaces refused as Docker's default seccomp profile refuses them), where Landlock and seccomp isolate.
The table's first line says which isolation was measured.
"""
import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minitir.sandbox import Sandbox  # noqa: E402

SNIPPETS = {"print(1+1)": "print(1+1)",
            "sympy": "import sympy\nx = sympy.symbols('x')\nprint(sympy.factor(x**4 - 1))"}


def naive(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout


def p50_ms(fn, code, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn(code)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--as-user", type=int, default=None)
    ap.add_argument("--container", action="store_true")
    a = ap.parse_args()
    if a.container:
        from tests.container import emulate
        emulate()
    with Sandbox(workers=a.workers, as_user=a.as_user) as sb:
        print(f"mode {sb.isolation['mode']}, {sb.report}")
        sb.run_many(["1"] * 10)  # warm
        print("| snippet | naive p50 ms | sandbox p50 ms | speed-up |")
        print("|---|---|---|---|")
        for name, code in SNIPPETS.items():
            assert sb.run(code).stdout == naive(code)
            nv, ours = p50_ms(naive, code, max(a.n // 5, 5)), p50_ms(sb.run, code, a.n)
            print(f"| {name} | {nv:.1f} | {ours:.1f} | {nv / ours:.0f}x |")
        total = 20 * a.n
        t = time.perf_counter()
        sb.run_many(["print(1+1)"] * total)
        ours = total / (time.perf_counter() - t)
        t = time.perf_counter()
        with ThreadPoolExecutor(a.workers) as pool:
            list(pool.map(naive, ["print(1+1)"] * (total // 10)))
        nv = (total // 10) / (time.perf_counter() - t)
        print(f"| throughput, {a.workers} workers, runs/s | {nv:.0f} | {ours:.0f} | {ours / nv:.0f}x |")


if __name__ == "__main__":
    main()
