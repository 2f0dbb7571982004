"""The GPU check: every CUDA path of minitir exercised and measured by one command, for a GPU machine that is
lent briefly (one H200, torch 2.11, transformers 5.17, no flash-attn, no network, no model downloads).

    python benchmarks/gpu_check.py                    # on the GPU machine: under 8 minutes on an H200
    python benchmarks/gpu_check.py --dry              # anywhere: every section with tiny sizes (the suite runs this)

Sections, each recorded even when another fails (an exception is a result too):
  1. environment  torch, CUDA, device, transformers; which attention backend runs; what this torch lacks
  2. tests        the suite's GPU-capable tests (attention kernels, the CUDA-graph decode), their output kept
  3. parity       random-weight Qwen2- and Llama-shaped models (the test fixtures' shapes and Qwen2.5-1.5B's cut
                  to 4 layers) against transformers in bfloat16: logits, packed forward, cached decode
  4. decode       a Qwen2.5-1.5B-shaped model, random weights, EOS ignored: batch 1, 16, 64 x 256 new tokens,
                  CUDA graphs on and off, against transformers' generate in the same run; capture seconds
  5. engine       one engine across a rollout, an in-place weight update, an evaluation and a refill round:
                  one CUDA-graph capture for all, each call's tokens equal to a fresh engine's
  6. train step   the qwen2.5-1.5b-grpo preset with 4 layers of Qwen2.5-1.5B's shape, bfloat16 recipe: seconds,
                  peak memory, the generator/trainer log-prob gap and the share of tokens truncated importance
                  sampling capped
  7. invariance   that step twice with batch invariance (the same metrics and weights? a gap of exactly 0?)
                  and once without (its gap, its seconds): the CUDA half of "same seed, same run"
Everything goes to one JSON file (--out) and a printed table.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minitir import attention  # noqa: E402
from minitir.checkpoint import load_model  # noqa: E402
from minitir.generate import generate  # noqa: E402
from minitir.model import KVCache  # noqa: E402

QWEN15 = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
              vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
              max_position_embeddings=4096)
FIXTURES = {"qwen2-gqa-untied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2)),
            "llama-gqa-tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True))}


class ByteTokenizer:
    """Bytes as tokens (ids 0-255, EOS 256): a tokenizer that needs no download."""
    eos_token_id, eos_token, chat_template = 256, "<eos>", None

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def __call__(self, text):
        return SimpleNamespace(input_ids=self.encode(text))

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __len__(self):
        return 257

    def save_pretrained(self, path):
        Path(path, "byte_tokenizer.txt").write_text("utf-8 bytes, EOS 256\n")


def hf_model(kind: str, layers: int, device, dtype, **shape):
    """A random-weight transformers model and the same weights loaded by minitir."""
    import transformers
    cls = getattr(transformers, kind)
    cfg = cls(num_hidden_layers=layers, **shape)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(torch.float32)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as d:   # up to GBs a model: not left behind
        hf.save_pretrained(d)
        ours = load_model(d, dtype=dtype, device=device)
    return hf.to(device, dtype).eval(), ours


# ------------------------------------------------------------------------------------------------
def environment(dev) -> dict:
    import transformers
    probe = torch.empty(0, dtype=torch.bfloat16, device=dev)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
            "attention_backend": attention.backend(probe), "flash_attn_package": attention._flash_varlen is not None,
            "torch_varlen_attn": attention._torch_varlen is not None,
            "torch_varlen_paged_cache": attention.TORCH_VARLEN_PAGED,
            "cuda_graph_decode": attention.flash_available(probe)}


def gpu_tests(dry: bool) -> dict:
    """The suite's GPU-capable tests (skipped without CUDA: in the dry run they report as skipped)."""
    sel = "flash or torch_varlen or cuda or gpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_attention.py", "tests/test_generate.py", "-k", sel]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120 if dry else 300)
    tail = (r.stdout + r.stderr)[-4000:]
    summary = next((line for line in reversed(tail.splitlines()) if " in " in line and ("passed" in line or
                                                                                      "skipped" in line)), "")
    return {"returncode": r.returncode, "summary": summary.strip("= "), "output_tail": tail}


def parity(dev, dtype, dry: bool) -> dict:
    """Max |logits difference| against transformers: padded forward, packed forward, cached decode."""
    shapes = {k: (cls, dict(hidden_size=64, intermediate_size=96, vocab_size=97, **kw), 2) for k, (cls, kw) in FIXTURES.items()}
    shapes["qwen2.5-1.5b-4-layers"] = ("Qwen2Config", dict(QWEN15) if not dry else
                                       dict(QWEN15, hidden_size=96, intermediate_size=160, num_attention_heads=6,
                                            vocab_size=1000), 4)
    out = {}
    for name, (cls, shape, layers) in shapes.items():
        hf, m = hf_model(cls, layers, dev, dtype, **shape)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, shape["vocab_size"], (2, 24), generator=g).to(dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"):
            ref = hf(ids).logits.float()
            padded = m(ids).float()
            cu = torch.tensor([0, 24, 48], dtype=torch.int32, device=dev)
            packed = torch.nn.functional.linear(m.hidden_packed(ids.flatten(), cu), m.lm_head.weight).float().view(2, 24, -1)
            cache = KVCache(m.config, 2, attention.cache_length(64, ids.to(dtype) if dev.type == "cuda" else ids.float()),
                            dtype=dtype, device=dev)
            first = m.forward_cached(ids[:, :20], cache, torch.arange(2, device=dev), all_logits=True).float()
            steps = [m.forward_cached(ids[:, t:t + 1], cache, torch.arange(2, device=dev)).float() for t in range(20, 24)]
            cached = torch.cat([first, torch.stack(steps, 1)], 1)
        scale = float(ref.abs().max())
        out[name] = {k: round(float((v - ref).abs().max()) / scale, 5) for k, v in
                     (("padded", padded), ("packed", packed), ("cached", cached))}
        out[name]["greedy_agree"] = round(float((cached.argmax(-1) == ref.argmax(-1)).float().mean()), 4)
        del hf, m
    return out


def decode(dev, dtype, dry: bool) -> list[dict]:
    """tokens/s of minitir (CUDA graphs on and off) and transformers' generate, same weights and prompts."""
    import minitir.generate as G
    shape = dict(QWEN15) if not dry else dict(QWEN15, hidden_size=96, intermediate_size=160, num_attention_heads=6,
                                               vocab_size=1000)
    hf, m = hf_model("Qwen2Config", 28 if not dry else 2, dev, dtype, **shape)
    new = 256 if not dry else 8
    tok = ByteTokenizer()
    captured = []
    init = G.DecodeGraphs.__init__

    def timed(self, *a, **kw):
        t = time.perf_counter()
        init(self, *a, **kw)
        captured.append(time.perf_counter() - t)

    G.DecodeGraphs.__init__ = timed
    rows = []
    try:
        for batch in ((1, 16, 64) if not dry else (1, 2)):
            g = torch.Generator().manual_seed(batch)
            prompts = [torch.randint(0, shape["vocab_size"], (int(n),), generator=g).tolist()
                       for n in torch.randint(64, 192, (batch,), generator=g)]
            row = {"batch": batch, "new_tokens": new}
            for graphs in (True, False):
                captured.clear()
                kw = dict(max_new_tokens=new, temperature=0.0, ignore_eos=True, max_batch=batch, cuda_graphs=graphs)
                with torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"):
                    generate(m, tok, prompts[:1], **{**kw, "max_new_tokens": 4})   # warm-up
                    _sync(dev)
                    t = time.perf_counter()
                    outs = generate(m, tok, prompts, **kw)
                    _sync(dev)
                dt = time.perf_counter() - t
                key = "graphs" if graphs else "eager"
                row[f"minitir_{key}_tok_s"] = round(batch * new / dt, 1)
                row[f"capture_{key}_s"] = round(sum(captured), 2)
                row[f"{key}_tokens"] = [o.tokens for o in outs]
            row["graphs_equal_eager"] = row.pop("graphs_tokens") == row.pop("eager_tokens")
            row["transformers_tok_s"] = round(batch * new / _hf_generate(hf, prompts, new, dev), 1)
            row["speedup_graphs"] = round(row["minitir_graphs_tok_s"] / row["transformers_tok_s"], 2)
            rows.append(row)
    finally:
        G.DecodeGraphs.__init__ = init
    return rows


def engine_reuse(dev, dtype, dry: bool) -> dict:
    """A training run's use of one engine: a rollout, the weights updated in place (as Learner.decoder refreshes
    its copy), a greedy evaluation, a smaller refill round. One capture must serve all three, and each call's
    tokens must equal those of a fresh engine on the same weights (graphs replaying the updated weights)."""
    import minitir.generate as G
    shape = dict(QWEN15) if not dry else dict(QWEN15, hidden_size=96, intermediate_size=160, num_attention_heads=6,
                                               vocab_size=1000)
    _, m = hf_model("Qwen2Config", 4 if not dry else 2, dev, dtype, **shape)
    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(16, 96, (16,), generator=g)]
    calls = [dict(max_new_tokens=32, temperature=1.0, seed=1, max_batch=16, ignore_eos=True),
             dict(max_new_tokens=16, temperature=0.0, max_batch=16, ignore_eos=True),
             dict(max_new_tokens=32, temperature=1.0, seed=2, max_batch=8, ignore_eos=True)]
    engine, out = G.Engine(m, tok), {"calls_equal_fresh_engine": [], "seconds": []}
    with torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"):
        for i, kw in enumerate(calls):
            if i == 1:
                with torch.no_grad():
                    for p in m.parameters():
                        p.mul_(1.01)
            t = time.perf_counter()
            kept = engine.generate(prompts, G.GenerationConfig(**kw))
            _sync(dev)
            out["seconds"].append(round(time.perf_counter() - t, 2))
            fresh = G.Engine(m, tok).generate(prompts, G.GenerationConfig(**kw))
            out["calls_equal_fresh_engine"].append([o.tokens for o in kept] == [o.tokens for o in fresh])
    out.update(captures=engine.captures, graphs=engine.graphs is not None, graphs_failed=engine.graphs_failed)
    return out


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _hf_generate(hf, prompts, new, dev) -> float:
    """Seconds for transformers' greedy generate of `new` tokens on left-padded prompts."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(dev), mask.to(dev)
    kw = dict(do_sample=False, min_new_tokens=new, max_new_tokens=new, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        hf.generate(ids[:1], attention_mask=mask[:1], **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})
        _sync(dev)
        t = time.perf_counter()
        hf.generate(ids, attention_mask=mask, **kw)
        _sync(dev)
    return time.perf_counter() - t


def _train(dev, dry: bool, invariant: bool = True) -> dict:
    """One step of the qwen2.5-1.5b-grpo preset, scaled down: 4 layers of the 1.5B shape, 2 prompts x 4
    -> its metrics, seconds, peak memory and a digest of the weights after it."""
    import hashlib
    import train
    from minitir.tasks import miniature_problems
    from minitir.trainer import Trainer
    shape = dict(QWEN15) if not dry else dict(QWEN15, hidden_size=96, intermediate_size=160, num_attention_heads=6,
                                               vocab_size=1000)
    _, m = hf_model("Qwen2Config", 4 if not dry else 2, dev, torch.float32, **shape)
    m.config.eos_token_id = ByteTokenizer.eos_token_id
    with tempfile.TemporaryDirectory() as d:
        cfg, _ = train.parse(["--config", "qwen2.5-1.5b-grpo", "--prompts-per-step", "2", "--n-samples", "4",
                              "--max-new-tokens", "64" if not dry else "16", "--max-prompt-tokens", "1024",
                              "--eval-size", "0", "--run-dir", d, "--run-name", "gpu", "--no-tensorboard",
                              "--save-every", "0", "--steps", "1", "--sandbox-workers", "2",
                              "--device", dev.type, "--dtype", "bfloat16",   # the GPU recipe, on a CPU too
                              "--batch-invariant" if invariant else "--no-batch-invariant"])
        cfg.filter_groups = False
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        trainer = Trainer(cfg, model=m, tokenizer=ByteTokenizer(), problems=miniature_problems(64, seed=0),
                          eval_problems=[])
        try:
            metrics = trainer.train_step()
            digest = hashlib.sha256(b"".join(p.detach().float().cpu().numpy().tobytes()
                                             for p in trainer.learner.model.parameters())).hexdigest()
        finally:
            trainer.close()
        seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None
    return {"seconds": round(seconds, 1), "peak_gb": None if peak is None else round(peak, 2), "weights": digest,
            "metrics": {k: v for k, v in metrics.items() if not k.startswith("time/") and k != "tokens_per_s"},
            **{k: metrics.get(k) for k in ("time/generate_s", "time/train_s")}}


@functools.cache
def _first_train(dev, dry: bool) -> dict:
    """The default step, run once for both sections below (a step less of the machine's few minutes)."""
    return _train(dev, dry)


def train_step(dev, dry: bool) -> dict:
    """The train step in the default (batch invariant): seconds, peak memory, its log-prob gap and TIS share."""
    r = _first_train(dev, dry)
    return {k: r[k] for k in ("seconds", "peak_gb", "time/generate_s", "time/train_s")} | {
        k: r["metrics"].get(k) for k in ("logprob_gap_mean", "logprob_gap_max", "tis_capped", "grad_norm", "loss",
                                         "response_length_all")}


def invariance(dev, dry: bool) -> dict:
    """"Same seed, same run" on this device: the train step twice with batch invariance (the same metrics and
    weights, a generator/trainer log-prob gap of exactly 0), and once without (the gap it closes, the time
    it costs)."""
    a, b, c = _first_train(dev, dry), _train(dev, dry), _train(dev, dry, invariant=False)
    return {"same_run": a["metrics"] == b["metrics"] and a["weights"] == b["weights"],
            "gap_max_invariant": a["metrics"].get("logprob_gap_max"), "gap_max_default": c["metrics"].get(
                "logprob_gap_max"), "seconds_invariant": [a["seconds"], b["seconds"]], "seconds_default": c["seconds"],
            "train_s_invariant": b["time/train_s"], "train_s_default": c["time/train_s"],
            "generate_s_invariant": b["time/generate_s"], "generate_s_default": c["time/generate_s"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="tiny sizes, CPU allowed: checks the script itself")
    ap.add_argument("--out", default=str(ROOT / "gpu_check.json"))
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out "
                                               "(tests,parity,decode,engine,train,invariance)")
    a = ap.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # read once, when cuBLAS starts: the invariance section needs it
    cuda = torch.cuda.is_available()
    if not cuda and not a.dry:
        raise SystemExit("gpu_check.py: no CUDA device here; run with --dry to check the script on CPU")
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry": a.dry, "environment": environment(dev)}
    sections = {"tests": lambda: gpu_tests(a.dry), "parity": lambda: parity(dev, dtype, a.dry),
                "decode": lambda: decode(dev, dtype, a.dry), "engine": lambda: engine_reuse(dev, dtype, a.dry),
                "train": lambda: train_step(dev, a.dry), "invariance": lambda: invariance(dev, a.dry)}
    for name, run in sections.items():
        if name in a.skip.split(","):
            continue
        t = time.perf_counter()
        try:
            report[name] = run()
        except Exception as e:   # recorded, and the next section still runs
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        report[f"{name}_s"] = round(time.perf_counter() - t, 1)
        Path(a.out).write_text(json.dumps(report, indent=2, default=str))
    print_table(report)
    print(f"report: {a.out}")
    return report


def print_table(r: dict):
    env = r["environment"]
    print(f"{env['device']}  torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}; "
          f"attention: {env['attention_backend']}, paged cache {env['torch_varlen_paged_cache']}, "
          f"CUDA-graph decode {env['cuda_graph_decode']}")
    if "tests" in r:
        print(f"tests: {r['tests'].get('summary') or r['tests'].get('error')}")
    if isinstance(r.get("parity"), dict) and "error" not in r["parity"]:
        print("| model | padded | packed | cached decode | greedy agreement |\n|---|---|---|---|---|")
        for k, v in r["parity"].items():
            print(f"| {k} | {v['padded']} | {v['packed']} | {v['cached']} | {v['greedy_agree']} |")
    elif "parity" in r:
        print(f"parity: {r['parity']['error']}")
    if isinstance(r.get("decode"), list):
        print("| batch | transformers tok/s | minitir eager tok/s | minitir graphs tok/s | capture s | speed-up | "
              "graphs = eager |\n|---|---|---|---|---|---|---|")
        for row in r["decode"]:
            print(f"| {row['batch']} | {row['transformers_tok_s']} | {row['minitir_eager_tok_s']} | "
                  f"{row['minitir_graphs_tok_s']} | {row['capture_graphs_s']} | {row['speedup_graphs']}x | "
                  f"{row['graphs_equal_eager']} |")
    elif "decode" in r:
        print(f"decode: {r['decode']['error']}")
    if "engine" in r:
        print(f"one engine across calls: {json.dumps(r['engine'])[:300]}")
    if "train" in r:
        print(f"train step: {json.dumps(r['train'])[:400]}")
    if "invariance" in r:
        print(f"same seed, same run: {json.dumps(r['invariance'])[:400]}")


if __name__ == "__main__":
    main()
