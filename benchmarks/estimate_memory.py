"""Peak GPU memory per rank for a preset on 1..N GPUs, computed from the model's shape (not measured).

    python benchmarks/estimate_memory.py                       # the 1.5B, 7B and zerotir-7b presets, with and
                                                               # without LoRA, on 1-8 GPUs
    python benchmarks/estimate_memory.py --gpus 1,8 --max-batch 64

What each term is (P parameters, N ranks):
  train state   float32 weights + gradients + two AdamW moments, sharded by FSDP2: 16 P / N bytes
                (one process: not sharded). LoRA (lora_rank r): the bfloat16 frozen base, 2 P / N, and the
                adapters' 16 A / N, A = r (in + out) summed over the targets of every layer
  decode copy   the bfloat16 weights the generator runs (full on every rank): 2 P
  gathered      FSDP2 units all-gathered at once in bfloat16: the root (embedding + lm_head) and two layers
                (one computing, one prefetched); one process: none (the weights are already whole)
  KV cache      bfloat16 keys and values for min(max_batch, this rank's responses) rows of
                max_prompt_tokens + max_new_tokens
  activations   what the checkpointing mode keeps per micro-batch of micro_batch_tokens: selective = layer
                input, attention output and middle residual, and with batch invariance (the default) the
                block attention kernel's q, k and v (its layer is not checkpointed); full = layer input (+ one
                layer recomputed); 2 bytes per value (the residual stream is bfloat16 under autocast, as in the
                decode copy). LoRA adds the adapted weights W0 + (alpha/r) B A the products keep for
                backward, in bfloat16: every layer's o, gate, up and down (selective) or one layer's (full)
  log-probs     1024-token chunks of float32 logits over the vocabulary (logits, softmax, gradient)
The KV cache and the training terms are not alive at the same time (the cache is freed after decoding),
so the peak is the larger of the two phases plus what both hold.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# from the models' config.json files (Qwen/Qwen2.5-1.5B, Qwen/Qwen2.5-7B)
MODELS = {
    "Qwen2.5-1.5B": dict(params=1.544e9, layers=28, hidden=1536, intermediate=8960, kv_heads=2, head_dim=128,
                         vocab=151936, tied=True, preset="qwen2.5-1.5b-grpo"),
    "Qwen2.5-7B": dict(params=7.616e9, layers=28, hidden=3584, intermediate=18944, kv_heads=4, head_dim=128,
                       vocab=152064, tied=False, preset="qwen2.5-7b-grpo"),
}
MODELS["Qwen2.5-7B-zerotir"] = dict(MODELS["Qwen2.5-7B"], preset="zerotir-7b")   # the paper's run
MODELS["Qwen2.5-1.5B-lora"] = dict(MODELS["Qwen2.5-1.5B"], preset="qwen2.5-1.5b-lora")
MODELS["Qwen2.5-7B-zerotir-lora"] = dict(MODELS["Qwen2.5-7B"], preset="zerotir-7b-lora")   # on one GPU
HEADS = {"Qwen2.5-1.5B": 12, "Qwen2.5-7B": 28}   # query heads (config.json), for the adapters' shapes
GB = 1e9


def estimate(m: dict, cfg: dict, gpus: int) -> dict:
    P, L, D = m["params"], m["layers"], m["hidden"]
    root = m["vocab"] * D * (1 if m["tied"] else 2)
    layer = (P - root) / L
    r = cfg.get("lora_rank", 0)
    if r:   # frozen bfloat16 base + float32 adapters with their gradients and moments
        q, kv, inter = m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"], m["intermediate"]
        sizes = {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D), "gate_proj": (D, inter),
                 "up_proj": (D, inter), "down_proj": (inter, D)}
        targets = cfg.get("lora_targets", ",".join(sizes)).split(",")
        state = (2 * P + 16 * r * L * sum(sum(sizes[t]) for t in targets)) / gpus
    else:
        state = 16 * P / gpus
    decode_copy = 2 * P
    gathered = 0 if gpus == 1 else 2 * (root + 2 * layer)
    responses = cfg["prompts_per_step"] * cfg["n_samples"] // gpus
    rows = min(cfg["max_batch"], responses)
    kv = rows * (cfg["max_prompt_tokens"] + cfg["max_new_tokens"]) * L * 2 * m["kv_heads"] * m["head_dim"] * 2
    T, b = cfg["micro_batch_tokens"], 2
    if cfg["checkpointing"] == "full":
        acts = L * T * D * b + T * (6 * D + 3 * m["intermediate"]) * b + (2 * layer if r else 0)
    else:  # selective (q/k/v are recomputed: the adapted o, gate, up and down weights are kept)
        kept = m["heads"] * m["head_dim"] * D + 3 * D * m["intermediate"]
        acts = L * T * 3 * D * b + T * (4 * D + 3 * m["intermediate"]) * b + (2 * kept * L if r else 0)
        if cfg.get("batch_invariant", True):   # the block kernel's q, k, v and output (k and v as gathered:
            acts += L * T * (2 * m["heads"] + 2 * m["kv_heads"]) * m["head_dim"] * b   # at least T rows)
    logprobs = 3 * 1024 * m["vocab"] * 4
    train = gathered + acts + logprobs
    peak = state + decode_copy + max(kv, train)
    return {"gpus": gpus, "train state": state, "decode copy": decode_copy, "KV cache": kv, "gathered": gathered,
            "activations": acts, "log-probs": logprobs, "peak": peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--max-batch", type=int, default=None, help="override the preset's max_batch")
    a = ap.parse_args()
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in a.models.split(","):
        m = MODELS[name]
        cfg = json.loads((configs / f"{m['preset']}.json").read_text())
        if a.max_batch:
            cfg["max_batch"] = a.max_batch
        m = dict(m, heads=HEADS[name.split("-zerotir")[0].removesuffix("-lora")])
        lora = f", LoRA rank {cfg['lora_rank']}" if cfg.get("lora_rank") else ""
        print(f"\n{name} ({m['params'] / 1e9:.2f} B parameters), preset {m['preset']}{lora}: max_batch {cfg['max_batch']}, "
              f"{cfg['prompts_per_step']}x{cfg['n_samples']} responses of <= {cfg['max_prompt_tokens']}+"
              f"{cfg['max_new_tokens']} tokens, micro-batch {cfg['micro_batch_tokens']} tokens, "
              f"{cfg['checkpointing']} checkpointing")
        cols = ["gpus", "train state", "decode copy", "KV cache", "gathered", "activations", "log-probs", "peak"]
        print("| " + " | ".join(c if c == "gpus" else c + " GB" for c in cols) + " |")
        print("|" + "---|" * len(cols))
        for g in [int(x) for x in a.gpus.split(",")]:
            e = estimate(m, cfg, g)
            print("| " + " | ".join(str(e[c]) if c == "gpus" else f"{e[c] / GB:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
