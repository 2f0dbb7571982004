"""Per-token log-probs + backward on 8 x 512 tokens, SmolLM2-135M: minitir vs transformers, in float32 and
as the bfloat16 recipe trains (float32 weights, forward under bfloat16 autocast: --dtype bfloat16 of train.py).

Each variant runs in its own process so peak RSS (VmHWM) is its own. Usage:
    python benchmarks/bench_logprobs.py [--threads 2] [--batch 8] [--seqlen 512] [--repeats 2] [--rounds 2]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def worker(variant: str, threads: int, batch: int, seqlen: int, repeats: int, checkpointing: str, amp: bool):
    import torch
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(threads)
    from minitir.checkpoint import embedded_checkpoint, load_model
    from minitir.ops import keep_freed_memory
    keep_freed_memory()   # as the Learner does on a CPU, for both variants
    path = embedded_checkpoint()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (batch, seqlen), generator=g)
    times = []
    if variant == "transformers":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.train()
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            times.append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
    else:
        from minitir.logprobs import token_loss
        model = load_model(path)
        model.train()
        model.checkpointing = checkpointing
        cu = torch.arange(0, batch * seqlen + 1, seqlen, dtype=torch.int32)
        flat = ids.flatten()
        sel = torch.arange(batch * seqlen).view(batch, seqlen)[:, :-1].flatten()   # positions with a next token
        n = sel.numel()
        for _ in range(repeats):
            t = time.perf_counter()
            # what the trainer does: the mean next-token NLL (transformers' loss with labels), fused into the head
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                hidden = model.hidden_packed(flat, cu)
                loss, _, _ = token_loss(hidden[sel], model.lm_head.weight, flat[sel + 1],
                                        lambda lp, ent, rows: -lp.sum() / n, chunk_size=1024)
            loss.backward()
            times.append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
    name = variant + (f" checkpointing={checkpointing}" if variant == "minitir" else "") + (", bf16 autocast" if amp else "")
    print(json.dumps({"variant": name, "seconds": min(times),
                      "peak_rss_gb": peak_rss_gb()}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--checkpointing", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--amp", action="store_true", help="(worker) under bfloat16 autocast")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.threads, a.batch, a.seqlen, a.repeats, a.checkpointing, a.amp)
    variants = [(v, ck, amp) for amp in (False, True) for v, ck in
                (("transformers", "none"), ("minitir", "none"), ("minitir", "selective"), ("minitir", "full"))]
    best: dict[str, dict] = {}
    # rounds interleave the variants, so a machine that speeds up or slows down over minutes biases none
    for _ in range(a.rounds):
        for variant, ck, amp in variants:
            cmd = [sys.executable, __file__, "--worker", variant, "--threads", str(a.threads), "--batch",
                   str(a.batch), "--seqlen", str(a.seqlen), "--repeats", str(a.repeats), "--checkpointing", ck]
            cmd += ["--amp"] if amp else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            old = best.get(r["variant"])
            best[r["variant"]] = r if old is None else {"variant": r["variant"],
                                                         "seconds": min(old["seconds"], r["seconds"]),
                                                         "peak_rss_gb": max(old["peak_rss_gb"], r["peak_rss_gb"])}
    rows = list(best.values())
    base = rows[0]   # transformers in float32
    print(f"{a.batch}x{a.seqlen} tokens, float32 weights, {a.threads} threads, best time of {a.rounds} interleaved rounds "
          f"x {a.repeats} repeats, highest peak RSS")
    print("| variant | forward+backward s | peak RSS GB | time vs transformers | memory vs transformers |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['seconds'] / base['seconds']:.2f}x "
              f"| {r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x |")


if __name__ == "__main__":
    main()
