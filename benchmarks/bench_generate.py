"""Rollout speed on CPU with SmolLM2-135M, float32 or bfloat16 (--dtype, both models), against transformers'
`generate` in the same run.

1. The RL workload (the headline): the paper's zero_tir prompt around MATH-500 problems (prompts of different
   lengths, ~180-560 tokens), sampled at temperature 1 as GRPO groups, 2 prompts x 8 (batch 16) and 8 x 8
   (batch 64), 512 new tokens, EOS ignored. transformers' generate gets the same prompts with
   num_return_sequences=8 (it prefills every copy; minitir prefills a group's prompt once). Reported:
   tokens/s, the ratio, time to the first token and ms per decode step; best of interleaved rounds.
   Beside it, 16 different problems (MATH-500's last 16) decoded greedily: no prompt is shared, so the
   group prefill does not help (a headline must hold on inputs it was not tuned on).
   Each row also gets its roofline: the bytes one decode step must read (the weights once, every row's KV
   cache at its real length, halfway through the decode on average) over the machine's read bandwidth
   measured in this process (the sum of a 1 GiB tensor, best of 5), and the step's arithmetic (2 flops per
   weight and row, 4 per cached key, head dimension and query head) over the machine's peak measured in this
   process (a 2048^3 oneDNN product in the run's dtype, best of 5); the limit is the larger of the two, and
   minitir's share of it is reported. (At batch 16 the arithmetic is not free on 2 cores: SmolLM2's 4.85
   GFLOP per step take ~21 ms at float32's ~227 GFLOP/s, nearly the ~25 ms its 905 MB take at ~36 GB/s.)
2. Per-call overhead: time to the first token for 16 short prompts (the second call: weights already packed).
3. Secondary rows: greedy decoding of short equal-length prompts at batch 1 and 16 (the easy case).
4. A tool-interleaved rollout: 16 responses, each making 2 tool calls with a fixed tool latency, against
   - re-prefill: the same engine, but after each tool call the row's cache is dropped and the whole prefix
     is prefilled again (what a framework does when it sends the prefix back to an inference server);
   - rounds: the multi-turn loop of the peer frameworks: generate until every response closes a code
     block, run the tools, then start generation again on each whole prefix.
   Every variant produces the same tokens: the model's real forward passes run, but each response is
   forced to a fixed script (filler text around two code blocks), so only the engine differs.

    python benchmarks/bench_generate.py [--dtype float32|bfloat16] [--threads 2] [--new-tokens 512] [--rounds 2]
                                        [--groups 2,8] [--latency 0.2] [--skip-tools] [--only-workloads]
"""
import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minitir import load_pretrained  # noqa: E402
from minitir.checkpoint import embedded_checkpoint  # noqa: E402
from minitir.generate import generate  # noqa: E402
from minitir.tool_protocol import OUTPUT_TAIL, ToolOutput  # noqa: E402
from minitir.tasks import TEMPLATES, load_benchmark, render_prompt, synthetic_problems  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def workload(model, tok, hf, probs, group, temperature, new_tokens, rounds):
    """-> ({ours, theirs: (tokens/s, seconds to the first token, ms per decode step)}, prompt lengths) for
    `group` responses to each problem in the zero_tir prompt (T=0: greedy); best of `rounds` interleaved rounds."""
    texts = [render_prompt(TEMPLATES["zero_tir"], p.question) for p in probs]
    ids = [tok.encode(t) for t in texts]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    sampled = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)

    def ours(n):
        generate(model, tok, [i for i in ids for _ in range(group)], max_new_tokens=n, temperature=temperature, seed=0,
                 ignore_eos=True)

    def theirs(n):
        with torch.no_grad():
            hf.generate(**enc, max_new_tokens=n, min_new_tokens=n, num_return_sequences=group,
                        pad_token_id=tok.eos_token_id, **sampled)

    best = {}
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("theirs", theirs)):
            first, total = timed(lambda: fn(1)), timed(lambda: fn(new_tokens))
            row = (len(probs) * group * new_tokens / total, first, 1000 * (total - first) / (new_tokens - 1))
            best[name] = max(best.get(name, row), row)
    return best, [len(i) for i in ids]


def read_bandwidth(threads: int) -> float:
    """Bytes per second this process reads from memory: the sum of a 1 GiB float32 tensor, best of 5."""
    x = torch.ones(1 << 28)
    x.sum()
    return x.numel() * 4 / min(timed(lambda: x.sum()) for _ in range(5))


def peak_flops(dtype: torch.dtype) -> float:
    """Flops per second this process reaches on a large product: 2048^3 through oneDNN with a packed weight
    (the kernel minitir's products use; MKL's sgemm reached half of it here), best of 5."""
    x, w = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        fn = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    else:
        fn = lambda: x @ w.t()
    fn()
    return 2 * 2048 ** 3 / min(timed(fn) for _ in range(5))


def step_flops(model, lens: list[int], group: int, new_tokens: int) -> float:
    """Flops of one decode step on average: 2 per weight and row (the embedding's lookup is not arithmetic;
    a tied one is the head) and 4 per cached key, head dimension and query head (scores and values)."""
    c = model.config
    params = {id(p): p for n, p in model.named_parameters() if "embed_tokens" not in n or c.tie_word_embeddings}
    rows = group * len(lens)
    keys = sum(group * (n + new_tokens / 2) for n in lens)
    return 2 * rows * sum(p.numel() for p in params.values()) + \
        4 * keys * c.num_hidden_layers * c.num_attention_heads * c.head_dim


def step_bytes(model, lens: list[int], group: int, new_tokens: int) -> float:
    """Bytes one decode step reads on average: every weight once (an untied embedding only at the rows' tokens:
    left out; a tied one is the head) and each row's keys and values at its prompt's length plus half the new
    tokens."""
    c, size = model.config, next(model.parameters()).element_size()
    weights = sum(p.numel() for n, p in model.named_parameters()
                  if "embed_tokens" not in n or c.tie_word_embeddings) * size
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * size
    return weights + sum(group * (n + new_tokens / 2) * per_token for n in lens)


def overhead(model, tok) -> float:
    """Seconds to the first token for 16 short prompts of three lengths, weights already packed."""
    short = [tok.encode(t) for t in ("What is 2+2?", "Name a prime number larger than ten.", "Hello")]
    prompts = [short[i % 3] for i in range(16)]
    generate(model, tok, prompts, max_new_tokens=1, temperature=1.0, seed=0)
    return min(timed(lambda: generate(model, tok, prompts, max_new_tokens=1, temperature=1.0, seed=0)) for _ in range(3))


def bench_decode(model, tok, hf, batch, new_tokens):
    prompts = [tok.encode(f"Story number {i}: once upon a time, in a land far away,") for i in range(batch)]
    t = time.perf_counter()
    outs = generate(model, tok, prompts, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    ours = sum(len(o.tokens) for o in outs) / (time.perf_counter() - t)
    tok.padding_side = "left"
    enc = tok([tok.decode(p) for p in prompts], return_tensors="pt", padding=True)
    t = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=tok.eos_token_id)
    theirs = batch * (out.shape[1] - enc.input_ids.shape[1]) / (time.perf_counter() - t)
    return ours, theirs


class Forced(torch.nn.Module):
    """Real forward passes, forced choices: response k of prompt id i emits script[k]."""

    def __init__(self, model, script, eos):
        super().__init__()
        self.m, self.script, self.eos, self.config = model, script, eos, model.config
        self.k, self.seq_of_row = {}, {}

    dtype = property(lambda self: self.m.dtype)
    device = property(lambda self: self.m.device)

    def forward_cached(self, ids, cache, rows, n_new=None, all_logits=False):
        fresh = [int(cache.seqlens[r]) == 0 for r in rows.tolist()]
        logits = self.m.forward_cached(ids, cache, rows, n_new)
        for b, r in enumerate(rows.tolist()):
            if fresh[b]:
                self.seq_of_row[r] = int(ids[b, 0])      # prompts start with a unique id token
            sid = self.seq_of_row[r]
            k = self.k.get(sid, 0)
            self.k[sid] = k + 1                          # one forward call = one choice (no chunked prefill)
            logits[b, self.script[k] if k < len(self.script) else self.eos] += 1e4
        return logits


def tool_rollout(model, tok, latency, batch=16, mode="keep"):
    block = tok.encode(" ```python\nprint(sum(range(10)))\n```", add_special_tokens=False)
    filler = tok.encode(" and so on", add_special_tokens=False)
    script = (filler * 30)[:80] + block + (filler * 30)[:60] + block + (filler * 30)[:70]
    probs = synthetic_problems(batch, seed=0)
    prompts = [[1000 + i] + tok.encode(render_prompt(TEMPLATES["zero_tir"], p.question)) for i, p in enumerate(probs)]
    forced = Forced(model, script, tok.eos_token_id)

    def tool(code):
        time.sleep(latency)
        return ToolOutput("45")

    max_new = 400
    kw = dict(max_new_tokens=max_new, temperature=0, prefill_tokens=1 << 16)
    t = time.perf_counter()
    if mode in ("keep", "reprefill"):
        outs = generate(forced, tok, prompts, tool=tool, max_tool_calls=2, reprefill_after_tool=mode == "reprefill", **kw)
        tokens = [o.tokens for o in outs]
    else:  # rounds: stop at each closed block, run the tools together, restart on the whole prefix
        responses = [[] for _ in prompts]
        active = list(range(len(prompts)))
        for _ in range(3):
            outs = generate(forced, tok, [prompts[i] + responses[i] for i in active], stop=["\n```"],
                            **{**kw, "max_new_tokens": max_new - min(len(responses[i]) for i in active)})
            calls = []
            for i, o in zip(active, outs):
                responses[i] += o.tokens
                if o.finish_reason == "stop" and tok.decode(responses[i]).rstrip().endswith("```"):
                    calls.append(i)
            with ThreadPoolExecutor(len(calls) or 1) as pool:
                results = list(pool.map(lambda i: tool("x"), calls))
            for i, r in zip(calls, results):
                responses[i] += tok.encode("\n```output\n" + r.text + OUTPUT_TAIL, add_special_tokens=False)
            active = calls
            if not active:
                break
        tokens = responses
    dt = time.perf_counter() - t
    return dt, sum(len(x) for x in tokens), tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both models' weights")
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--groups", default="2,8", help="prompts per RL-workload row (x 8 responses each)")
    ap.add_argument("--skip-tools", action="store_true", help="leave out the tool-interleaved rollout")
    ap.add_argument("--only-workloads", action="store_true", help="the two decoding workloads alone")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    model, tok = load_pretrained("smollm2-135m", dtype=dtype)
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(embedded_checkpoint(), dtype=dtype).eval()
    generate(model, tok, [tok.encode("warm up")], max_new_tokens=8, temperature=0)
    math500, _ = load_benchmark("math500", ROOT / "data")
    bandwidth, peak = read_bandwidth(a.threads), peak_flops(dtype)
    limit = lambda lens, group, new: max(step_bytes(model, lens, group, new) / bandwidth,
                                         step_flops(model, lens, group, new) / peak)   # seconds per step
    print(f"SmolLM2-135M, {a.dtype}, {a.threads} threads, {a.new_tokens} new tokens (EOS ignored), best of {a.rounds} "
          f"interleaved rounds. MATH-500 problems in the zero_tir prompt: the RL workload (GRPO groups of 8 sampled at "
          f"T=1, problems 1-{max(int(x) for x in a.groups.split(','))}) and 16 different problems greedy (the last 16)")
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s (the sum of a 1 GiB tensor, {a.threads} threads); "
          f"peak: {peak / 1e9:.0f} GFLOP/s (a 2048^3 {a.dtype} product)")
    print("| workload | prompt tokens | transformers tok/s | minitir tok/s | speed-up | first token s (tf / minitir) | "
          "ms per decode step (tf / minitir) | MB read per step | GFLOP per step | limit ms per step (read / "
          "arithmetic) | minitir's share of the limit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [(f"{n} x 8 at T=1 (batch {n * 8})", math500[:n], 8, 1.0) for n in (int(x) for x in a.groups.split(","))]
    rows.append(("16 different, greedy (batch 16)", math500[-16:], 1, 0.0))
    for label, probs, group, temperature in rows:
        best, lens = workload(model, tok, hf, probs, group, temperature, a.new_tokens, a.rounds)
        (o, o1, od), (t, t1, td) = best["ours"], best["theirs"]
        need, work = step_bytes(model, lens, group, a.new_tokens), step_flops(model, lens, group, a.new_tokens)
        print(f"| {label} | {min(lens)}-{max(lens)} | {t:.1f} | {o:.1f} | {o / t:.2f}x | "
              f"{t1:.2f} / {o1:.2f} | {td:.0f} / {od:.0f} | {need / 1e6:.0f} | {work / 1e9:.2f} | "
              f"{1000 * need / bandwidth:.1f} / {1000 * work / peak:.1f} | "
              f"{100 * limit(lens, group, a.new_tokens) / (od / 1000):.0f}% |")
    if a.only_workloads:
        return
    print(f"\nper-call overhead: first token for 16 short prompts in {overhead(model, tok):.3f} s")
    print(f"\nsecondary: greedy, short prompts of one length, {a.new_tokens // 2} new tokens")
    print("| batch | transformers tok/s | minitir tok/s | speed-up | minitir's share of the limit |")
    print("|---|---|---|---|---|")
    for batch in (1, 16):
        ours, theirs = bench_decode(model, tok, hf, batch, a.new_tokens // 2)
        step = limit([14] * batch, 1, a.new_tokens // 2)   # ~14 prompt tokens
        print(f"| {batch} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.2f}x | {100 * step * ours / batch:.0f}% |")
    if a.skip_tools:
        return
    print(f"\ntool-interleaved rollout: 16 responses x 2 tool calls, tool latency {a.latency * 1000:.0f} ms")
    print("| engine | seconds | tokens | tokens/s | minitir speed-up |")
    print("|---|---|---|---|---|")
    res = {m: tool_rollout(model, tok, a.latency, mode=m) for m in ("keep", "reprefill", "rounds")}
    assert res["keep"][2] == res["reprefill"][2] == res["rounds"][2], "the engines must produce the same tokens"
    for m, label in (("keep", "minitir (KV cache kept)"), ("reprefill", "re-prefill after each call"),
                     ("rounds", "rounds, restart on the prefix")):
        dt, n, _ = res[m]
        print(f"| {label} | {dt:.1f} | {n} | {n / dt:.1f} | {dt / res['keep'][0]:.2f}x |")


if __name__ == "__main__":
    main()
