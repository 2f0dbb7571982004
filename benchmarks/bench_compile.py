"""What torch.compile could take off a decode step on this CPU (issue 38), and what bounds the step without it.

SmolLM2-135M (or the miniature: --model miniature), one decode step of B rows with L cached tokens each, timed
in one process, interleaved, best of --rounds:
  minitir   the engine's step, `model.forward_cached` (batch invariant, the block attention kernel);
  eager     a static-shape step written for the compiler: the same packed oneDNN products, SDPA over a static
            cache with a mask (a float32 cache, as minitir's on CPUs), plain PyTorch between them;
  compiled  that step through torch.compile (inductor, fullgraph): the products, the attention and the cache
            write stay opaque calls (custom ops: inductor cannot lower oneDNN's packed product), everything
            between them (norms, RoPE, SwiGLU, residuals, casts) is fused into generated C++;
  products  the step's products alone (shapes as in the step), and
  attention the step's attention alone: together the step's floor if everything else cost nothing.
Each is also shown against its own limit: max(bytes it must read / read bandwidth, flops / peak), both measured
in this process (the bandwidth in every round) and counted as bench_generate counts them. The compiled step
computes other bits than the eager one (fused float32 intermediates): it is a measurement, not a path minitir
runs (issue 35's guarantee needs the trainer's forward to compute the same bits). Inductor's compiled code is
cached under /tmp/torchinductor_$USER (torch's default), which makes a second run's compile 2.6-4.3 s.

    python benchmarks/bench_compile.py [--model smollm2-135m|miniature] [--dtype float32|bfloat16] [--batch 16]
                                       [--cached 400] [--rounds 5]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_generate import peak_flops, read_bandwidth  # noqa: E402
from minitir import load_pretrained, ops  # noqa: E402
from minitir.attention import cache_dtype, cache_length  # noqa: E402
from minitir.model import KVCache  # noqa: E402

PACKED = []   # (packed weight, out features): opaque oneDNN tensors the custom op looks up by index


@torch.library.custom_op("bench::linear", mutates_args=())
def packed_linear(x: torch.Tensor, i: int) -> torch.Tensor:
    w, n = PACKED[i]
    M = x.shape[0]
    x = F.pad(x, (0, 0, 0, -M % ops.ROW_TILE))   # whole row tiles, as minitir's products
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")[:M].contiguous()


@packed_linear.register_fake
def _(x, i):
    return x.new_empty(x.shape[0], PACKED[i][1])


@torch.library.custom_op("bench::write", mutates_args=("kc", "vc"))
def write(kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
    rows = torch.arange(k.shape[0])
    kc[rows, :, pos] = k.to(kc.dtype)
    vc[rows, :, pos] = v.to(vc.dtype)


@write.register_fake
def _(kc, vc, k, v, pos):
    return None


@torch.library.custom_op("bench::attend", mutates_args=())
def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    o = F.scaled_dot_product_attention(q[:, :, None].to(kc.dtype), kc, vc, attn_mask=mask[:, None, None],
                                       enable_gqa=True)
    return o[:, :, 0].to(q.dtype)


@attend.register_fake
def _(q, kc, vc, mask):
    return torch.empty_like(q)


def pack(*linears) -> int:
    """The linears' weights packed as minitir packs them when decoding (the same copy, kept on linears[0])."""
    w, _ = ops._packed(linears[0], [m.weight for m in linears], [None] * len(linears), linears[0].weight.dtype)
    PACKED.append((w, sum(m.out_features for m in linears)))
    return len(PACKED) - 1


class StaticStep:
    """One decode step with static shapes: ids [B], pos [B] (where each row's new key goes), a cache
    [layers, B, kv_heads, S, head_dim]; -> logits [B, V]. A Llama without biases (SmolLM2, the miniature)."""

    def __init__(self, model):
        self.m, c = model, model.config
        if c.attention_bias or c.mlp_bias:
            sys.exit("bench_compile.py: the static step is written for a Llama without biases")
        self.H, self.KV, self.D, self.eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
        self.inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, self.D, 2, dtype=torch.float32) / self.D))
        self.idx = [(pack(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj), pack(l.self_attn.o_proj),
                     pack(l.mlp.gate_proj, l.mlp.up_proj), pack(l.mlp.down_proj)) for l in model.model.layers]
        self.head = pack(model.lm_head)

    def rms(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    @staticmethod
    def rope(x, cos, sin):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat((-x2, x1), -1) * sin

    @torch.no_grad()
    def __call__(self, ids, pos, kc, vc):
        H, KV, D, m = self.H, self.KV, self.D, self.m
        x = m.model.embed_tokens(ids)                                            # [B, hidden]
        f = pos.float()[:, None] * self.inv_freq
        emb = torch.cat((f, f), -1)
        cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]   # [B, 1, D]
        mask = torch.arange(kc.shape[3])[None, :] <= pos[:, None]               # [B, S]
        for i, layer in enumerate(m.model.layers):
            qkv, o, gate_up, down = self.idx[i]
            q, k, v = packed_linear(self.rms(x, layer.input_layernorm.weight), qkv).split([H * D, KV * D, KV * D], -1)
            q, k = self.rope(q.view(-1, H, D), cos, sin), self.rope(k.view(-1, KV, D), cos, sin)
            write(kc[i], vc[i], k, v.view(-1, KV, D), pos)
            x = x + packed_linear(attend(q, kc[i], vc[i], mask).reshape(-1, H * D), o)
            g, u = packed_linear(self.rms(x, layer.post_attention_layernorm.weight), gate_up).chunk(2, -1)
            x = x + packed_linear(F.silu(g) * u, down)
        return packed_linear(self.rms(x, m.model.norm.weight), self.head)

    @torch.no_grad()
    def products(self, B: int, dtype):
        c = self.m.config
        x, mid = torch.randn(B, c.hidden_size, dtype=dtype), torch.randn(B, c.intermediate_size, dtype=dtype)
        attn = torch.randn(B, self.H * self.D, dtype=dtype)
        for qkv, o, gate_up, down in self.idx:
            packed_linear(x, qkv), packed_linear(attn, o), packed_linear(x, gate_up), packed_linear(mid, down)
        packed_linear(x, self.head)

    @torch.no_grad()
    def attention(self, pos, kc, vc, dtype):
        q = torch.randn(kc.shape[1], self.H, self.D, dtype=dtype)
        mask = torch.arange(kc.shape[3])[None, :] <= pos[:, None]
        for i in range(kc.shape[0]):
            attend(q, kc[i], vc[i], mask)


def per_step(fn, n=10) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m or miniature")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cached", type=int, default=400, help="tokens in each row's cache")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype, B, L = getattr(torch, a.dtype), a.batch, a.cached
    model, _ = load_pretrained(a.model, dtype=dtype)
    c, static = model.config, StaticStep(model)
    kc = torch.randn(c.num_hidden_layers, B, c.num_key_value_heads, L + 1, c.head_dim, dtype=cache_dtype(dtype, "cpu"))
    vc, ids, pos = torch.randn_like(kc), torch.randint(0, min(1000, c.vocab_size), (B,)), torch.full((B,), L)
    # minitir's cache is as long as the engine makes it: whole key blocks, which the block kernel reads in place
    cache, rows = KVCache(c, B, cache_length(L + 1, kc), dtype=kc.dtype), torch.arange(B)
    cache.k[:, :, :L + 1].copy_(kc.transpose(2, 3)), cache.v[:, :, :L + 1].copy_(vc.transpose(2, 3))
    model.batch_invariant = True

    def ours():
        cache.seqlens.fill_(L)
        with torch.no_grad():
            model.forward_cached(ids[:, None], cache, rows)

    t = time.perf_counter()
    compiled = torch.compile(static.__call__, fullgraph=True, dynamic=False)
    out = compiled(ids, pos, kc, vc).float()
    ref = static(ids, pos, kc, vc).float()
    print(f"compile: {time.perf_counter() - t:.1f} s; compiled vs eager logits: max |diff| "
          f"{(out - ref).abs().max():.2g} (max |logit| {ref.abs().max():.3g}), the same argmax in "
          f"{int((out.argmax(-1) == ref.argmax(-1)).sum())} of {B} rows")
    steps = {"minitir": ours, "eager": lambda: static(ids, pos, kc, vc), "compiled": lambda: compiled(ids, pos, kc, vc),
             "products": lambda: static.products(B, dtype), "attention": lambda: static.attention(pos, kc, vc, dtype)}
    times, bws = {name: [] for name in steps}, []
    for _ in range(a.rounds):   # the bandwidth moves from minute to minute here: measured in every round
        bws.append(read_bandwidth(a.threads))
        for name, fn in steps.items():
            times[name].append(per_step(fn))
    peak = peak_flops(dtype)
    # bytes and flops as bench_generate counts them: the weights once (a tied embedding is the head), keys and
    # values in the run's dtype (minitir's CPU cache is float32 under bfloat16: the limit is what a cache in
    # the run's dtype would allow), the attention's flops at the run's dtype's peak
    params = [p for n, p in model.named_parameters() if "embed_tokens" not in n or c.tie_word_embeddings]
    weights = sum(p.numel() for p in params) * model.lm_head.weight.element_size()
    kv = 2 * kc[:, :, :, :L].numel() * model.lm_head.weight.element_size()
    w_flops = 2 * B * sum(p.numel() for p in params)
    a_flops = 4 * B * L * c.num_hidden_layers * c.num_attention_heads * c.head_dim
    own = {"products": (weights, w_flops), "attention": (kv, a_flops)}
    own["minitir"] = own["eager"] = own["compiled"] = (weights + kv, w_flops + a_flops)
    limit = lambda name, bw: max(own[name][0] / bw, own[name][1] / peak)
    print(f"{a.model} {a.dtype}, batch {B}, {L} cached tokens per row, {a.threads} threads: read "
          f"{min(bws) / 1e9:.1f}-{max(bws) / 1e9:.1f} GB/s over the rounds, peak {peak / 1e9:.0f} GFLOP/s; the step "
          f"reads {(weights + kv) / 1e6:.1f} MB ({kv / 1e6:.1f} of keys and values) and computes "
          f"{(w_flops + a_flops) / 1e9:.2f} GFLOP")
    print("| what | ms per step (best) | rounds | its own limit, ms (at the rounds' bandwidths) | share of it, "
          "each round's time against its own limit |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        lims = [limit(name, bw) for bw in bws]
        shares = [lim / t for lim, t in zip(lims, ts)]
        print(f"| {name} | {1000 * min(ts):.1f} | {' '.join(f'{1000 * t:.1f}' for t in ts)} | "
              f"{1000 * min(lims):.1f}-{1000 * max(lims):.1f} | {min(shares):.0%}-{max(shares):.0%} |")


if __name__ == "__main__":
    main()
