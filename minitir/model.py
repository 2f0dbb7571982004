"""One decoder for the Qwen2/Qwen2.5 and Llama (SmolLM2) families, with three forward paths:

- `model(input_ids, attention_mask=None)`: a padded batch [B, T] -> logits [B, T, V];
- `model.hidden_packed(input_ids, cu_seqlens, continues=None)`: packed sequences [N] -> final hidden states
  [N, D], for training and scoring (pair it with `minitir.logprobs.token_logprobs`); a group's responses
  can continue one packed copy of their prompt;
- `model.forward_cached(input_ids, cache, rows, n_new)`: append tokens to a `KVCache` and return logits,
  for decoding and chunked prefill.

Module names mirror Hugging Face's, so a checkpoint's state dict loads without renaming.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from minitir.attention import KERNEL_OPS, CachePlan, PackedPlan, kvcache_attention, varlen_attention
from minitir.ops import compute_dtype, linear, mlp, norm_linears, rms_norm

SUPPORTED = ("llama", "qwen2")
# a decoder layer's linears, by their checkpoint names (those LoRA may adapt)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False   # q/k/v bias (always on in Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hf_config: dict = field(default_factory=dict, repr=False)  # the original config.json, written back on save

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"{source}: model_type {mt!r} is not supported; minitir implements {SUPPORTED}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ValueError(f"{source}: required field {key!r} is missing")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only the default RoPE)")
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
        heads = d["num_attention_heads"]
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            attention_bias=True if mt == "qwen2" else bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), hf_config=dict(d))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)[0]   # the fused layers' own: the same bits


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos/sin [*positions.shape, head_dim] for the half-split (rotate_half) RoPE layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [..., T, H, D]; cos/sin [..., T, D] broadcast over heads."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # keeps autocast's dtype
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=b)
        # Llama's attention_bias covers o_proj too; Qwen2 has q/k/v bias only
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=b and cfg.model_type == "llama")

    def forward(self, x, norm, cos, sin, attend, selective=False, invariant=False):
        """norm(x) [..., T, hidden] -> attention output; attend(q, k, v) gets [..., T, heads, head_dim] after RoPE.
        selective (checkpointing): q/k/v are not stored: norm, projections and RoPE rerun in backward; the
        attention kernel's output and logsumexp are kept, so the kernel itself runs once. invariant: batch-
        invariant products on CUDA too (ops._products); the block kernel keeps q/k/v itself (its recompute
        under selective checkpointing is not replayable op for op), so its layer is not checkpointed."""
        if selective and not invariant:
            out = checkpoint(self._core, x, norm, cos, sin, attend, invariant, use_reentrant=False,
                             context_fn=lambda: create_selective_checkpoint_contexts(KERNEL_OPS))
        else:
            out = self._core(x, norm, cos, sin, attend, invariant)
        return linear(out, self.o_proj.weight, self.o_proj.bias, self.o_proj, invariant)

    def _core(self, x, norm, cos, sin, attend, invariant):
        shape = x.shape[:-1]
        q, k, v = norm_linears(x, norm, (self.q_proj, self.k_proj, self.v_proj), invariant)
        q = apply_rope(q.view(*shape, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(*shape, self.n_kv, self.head_dim), cos, sin)
        return attend(q, k, v.view(*shape, self.n_kv, self.head_dim)).reshape(*shape, -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x, norm, selective=False, invariant=False):
        """selective (checkpointing): gate/up are recomputed in backward instead of stored."""
        return mlp(x, norm, self.gate_proj, self.up_proj, self.down_proj, selective, invariant)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attend, selective=False, invariant=False):
        x = x + self.self_attn(x, self.input_layernorm, cos, sin, attend, selective, invariant)
        return x + self.mlp(x, self.post_attention_layernorm, selective, invariant)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class KVCache:
    """Preallocated keys/values for `rows` sequences of up to `max_len` tokens, with a length per row.

    k, v: [layers, rows, max_len, kv_heads, head_dim], the shape flash-attn's kernels take per layer. On a
    GPU that is also the memory layout; on a CPU the memory is [layers, rows, kv_heads, max_len, head_dim]
    and k, v are its transposed views: each head's keys are then contiguous, which made the CPU attention
    kernel 1.3-1.75x faster at decoding (a row's keys stay in one cache-friendly run per head).
    """

    def __init__(self, cfg: ModelConfig, rows: int, max_len: int, dtype=torch.float32, device="cpu"):
        heads_first = torch.device(device).type == "cpu"
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, cfg.head_dim) if heads_first else \
            (cfg.num_hidden_layers, rows, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        if heads_first:
            self.k, self.v = self.k.transpose(2, 3), self.v.transpose(2, 3)
        self.seqlens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.max_len = max_len


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # activation memory vs time in training: "none" stores every activation; "selective" stores per
        # layer only its input, its attention output (with the kernel's logsumexp) and its middle residual,
        # and recomputes the rest in backward (the q/k/v and gate/up products) but never the o/down
        # products or the attention kernel; "full" stores only layer inputs and reruns each layer's forward
        self.checkpointing = "none"
        # batch invariance: attention in the trainer's packed forward through the kernel decoding uses, and on
        # CUDA every kernel batch invariant, so a sequence's logits are the same bits whichever path, batch or
        # thread count computes them (the generator's log-probs then equal the trainer's); on CPUs the
        # products and the cache's attention are batch invariant always (ops._products, attention.py)
        self.batch_invariant = False

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random initialisation (for tests and toy runs); pretrained weights come from minitir.checkpoint."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def _embed(self, ids):
        """Token embeddings in the compute dtype: under autocast the residual stream is autocast's dtype, as in
        the decode copy that generated the tokens (its weights are that dtype)."""
        x = self.model.embed_tokens(ids)
        return x.to(compute_dtype(x))

    def _layers(self, x, cos, sin, attend):
        if self.checkpointing not in ("none", "selective", "full"):
            raise ValueError(f"checkpointing must be 'none', 'selective' or 'full', not {self.checkpointing!r}")
        training = self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if training and self.checkpointing == "full":
                x = checkpoint(layer, x, cos, sin, attend, False, self.batch_invariant, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attend, training and self.checkpointing == "selective", self.batch_invariant)
        return self.model.norm(x)

    def _rope(self, positions):
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.dtype)

    # --- path 1: padded batch -------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] (attention_mask [B, T], 1 = token, 0 = padding on either side) -> logits [B, T, V]."""
        B, T = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            mask = None
        else:
            attention_mask = attention_mask.to(torch.bool)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = (causal[None] & attention_mask[:, None, :]).unsqueeze(1)  # [B, 1, T, T]
            mask = mask | torch.eye(T, dtype=torch.bool, device=input_ids.device)  # padding rows attend to themselves
        gqa = self.config.num_attention_heads != self.config.num_key_value_heads

        def attend(q, k, v):  # [B, T, H, D]
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
            return o.transpose(1, 2)

        cos, sin = self._rope(positions)
        return linear(self._layers(self._embed(input_ids), cos, sin, attend), self.lm_head.weight, None, self.lm_head)

    # --- path 2: packed variable-length sequences -----------------------------------------------
    def hidden_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                      continues: list[int] | None = None) -> torch.Tensor:
        """input_ids [N] holding sequences back to back, cu_seqlens [S+1] int32 (0, len0, len0+len1, ...)
        -> final-norm hidden states [N, hidden]. No padding, no cross-sequence attention, except that
        with continues, sequence s continues sequence continues[s] (-1: none), packed once for all that
        continue it: s's positions start after it and s attends to its tokens, then causally to its own.
        That is how a group's responses share their prompt in training (computed once, not n times)."""
        dev = input_ids.device
        cu = cu_seqlens.to(device=dev, dtype=torch.int32)
        lengths = cu[1:] - cu[:-1]
        max_len = int(lengths.max()) if len(lengths) else 0
        starts = torch.repeat_interleave(cu[:-1].long(), lengths.long())
        positions = torch.arange(input_ids.shape[0], device=dev) - starts
        if not continues or max(continues) < 0:
            keys = cu_k = max_k = None
        else:
            bounds = cu.tolist()
            span = lambda s: list(range(bounds[s], bounds[s + 1]))
            keys = [span(p) + span(s) if p >= 0 else span(s) for s, p in enumerate(continues)]
            cu_k = torch.tensor([0] + [len(x) for x in keys], device=dev).cumsum(0).to(torch.int32)   # [S+1]
            max_k = max(len(x) for x in keys)
            before = torch.tensor([bounds[p + 1] - bounds[p] if p >= 0 else 0 for p in continues], device=dev)
            positions = positions + torch.repeat_interleave(before, lengths.long())
            keys = torch.tensor([i for x in keys for i in x], device=dev)                        # [N_k]
        cos, sin = self._rope(positions)
        plan = PackedPlan(cu.tolist(), (cu if cu_k is None else cu_k).tolist(), dev) if self.batch_invariant else None

        def attend(q, k, v):  # [N, H, D]
            if keys is not None:   # index_select: its gradient adds up in index order (k[keys]'s, by thread)
                k, v = k.index_select(0, keys), v.index_select(0, keys)
            return varlen_attention(q, k, v, cu, max_len, True, cu_k, max_k, plan)

        return self._layers(self._embed(input_ids), cos, sin, attend)

    # --- path 3: KV-cached decoding and chunked prefill -----------------------------------------
    @torch.no_grad()
    def forward_cached(self, input_ids: torch.Tensor, cache: KVCache, rows: torch.Tensor,
                       n_new: torch.Tensor | None = None, all_logits: bool = False,
                       check: bool = True) -> torch.Tensor:
        """Append input_ids [B, T] (right-padded; row b holds n_new[b] real tokens) to cache rows `rows` [B].

        Returns logits at each row's last real token [B, V] (or at every position [B, T, V] with
        all_logits) and advances cache.seqlens. Padding is written past a row's length and overwritten later.
        check=False skips the overflow check, which reads the lengths on the host (a CUDA graph cannot).
        """
        B, T = input_ids.shape
        rows = rows.to(device=input_ids.device, dtype=torch.int32)
        if n_new is None:
            n_new = torch.full((B,), T, dtype=torch.int32, device=input_ids.device)
        n_new = n_new.to(device=input_ids.device, dtype=torch.int32)
        start = cache.seqlens[rows]  # [B] int32
        if check and int((start + T).max()) > cache.max_len:
            raise ValueError(f"KV cache overflow: a row would reach {int((start + T).max())} tokens "
                             f"but the cache holds {cache.max_len}")
        positions = start[:, None].long() + torch.arange(T, device=input_ids.device)
        cos, sin = self._rope(positions)
        x, plan, inv = self._embed(input_ids), CachePlan(start, rows, T), self.batch_invariant   # plan: every layer's
        for i, layer in enumerate(self.model.layers):
            def attend(q, k, v, i=i):  # [B, T, H, D]
                return kvcache_attention(q, cache.k[i], cache.v[i], k, v, plan, inv)
            x = layer(x, cos, sin, attend, False, inv)
        x = self.model.norm(x)
        cache.seqlens[rows] = start + n_new
        if not all_logits:
            x = x[torch.arange(B, device=x.device), (n_new.long() - 1).clamp(min=0)]
        return linear(x, self.lm_head.weight, None, self.lm_head, inv)


def init_empty(cfg: ModelConfig, dtype=torch.float32, device="cpu") -> Transformer:
    """A model with uninitialised storage, to be filled by a checkpoint (skips random init of big weights)."""
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:  # to_empty breaks the tie
        m.lm_head.weight = m.model.embed_tokens.weight
    return m
