"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): train a low-rank update of
each target weight and freeze everything else,

    W = W0 + (alpha / r) B A,      W0 [out, in] frozen,  A [r, in],  B [out, r],

so a linear costs r (in + out) trained numbers instead of in x out. A starts random (Kaiming-uniform, as PEFT
does) and B at zero, so the adapted model starts exactly equal to its base and the first gradient reaches B
(dL/dB = (alpha / r) dL/dW A^T is not zero while dL/dA = (alpha / r) B^T dL/dW is). alpha / r scales the update
so that a change of rank does not change the learning rate that works (LoRA's paper; "LoRA Without Regret",
Thinking Machines 2025, and verl's ppo_lora docs: all linear layers, rank 1-32 is enough for RL, a learning
rate about 10x full fine-tuning's).

`LoRALinear` takes an nn.Linear's place and exposes `.weight` = W computed from its parts: every product in
minitir (ops.linear, the fused norm+linears and MLP) reads `linear.weight`, so all of them train the adapters
without a line of their own, and the gradient of W flows to A and B through the one product B A. (The price:
backward forms dL/dW [out, in] for each target, as full fine-tuning does, where LoRA's own kernels would
stay rank-sized; it is transient, one weight at a time.) Generation never reads these properties: it
decodes with a plain copy holding the merged weights, refreshed after each update (`merged_weights`).

Adapters are saved as PEFT saves them (adapter_config.json, adapter_model.safetensors with PEFT's key names),
so `peft.PeftModel.from_pretrained(base, dir)` loads them, and minitir's `load_pretrained(dir)` too (merged).
    python -m minitir.checkpoint merge CHECKPOINT_DIR OUT_DIR    # merged full weights transformers and vLLM load
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from minitir.model import LINEARS, init_empty

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."   # where PEFT's LoraModel puts the transformers model's own names


class LoRALinear(nn.Module):
    """An nn.Linear with a frozen weight and a trained low-rank update; `weight` is the adapted one."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale, self.enabled = rank, alpha, alpha / rank, True
        out_f, in_f = base.weight.shape
        bound = 1 / math.sqrt(in_f)   # kaiming_uniform_(a=sqrt(5)), nn.Linear's and PEFT's default
        a = torch.empty(rank, in_f, dtype=torch.float32).uniform_(-bound, bound, generator=generator)   # on the CPU:
        self.lora_A = nn.Parameter(a.to(base.weight.device))    # the same numbers on every device and rank
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, dtype=torch.float32, device=base.weight.device))

    @property
    def weight(self) -> torch.Tensor:
        """W0 + (alpha / r) B A in W0's dtype; W0 when disabled. B A is formed in float32 (autocast off), as
        the decode copy's merge forms it, so trainer and generator hold the same W. In bfloat16 an update below
        half of W0's rounding step does not show in W yet, exactly as full fine-tuning's float32 masters do
        not show in its bfloat16 forward until they cross it; the adapters (float32) keep every update."""
        return merge(self.base.weight, self.lora_A, self.lora_B, self.scale) if self.enabled else self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


def merge(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W0 + scale B A in W0's dtype, B A formed in float32 whatever autocast says: the one merge of the trainer
    (LoRALinear.weight) and of the decode copy and exports (merged_weights), so both hold the same W."""
    with torch.autocast(w0.device.type, enabled=False):
        return w0 + (scale * (b.float() @ a.float())).to(w0.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float, targets=LINEARS, seed: int = 0) -> list[str]:
    """Freeze every parameter of a minitir Transformer and put a LoRALinear in place of each target linear of
    its decoder layers. -> the names of the adapted linears."""
    model.requires_grad_(False)
    g, names = torch.Generator().manual_seed(seed), []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, g))
                names.append(f"{name}.{child_name}")
    if not names:
        raise ValueError(f"--lora-targets {','.join(targets)}: no such linear in the model; choose from {LINEARS}")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def disabled(model: nn.Module):
    """The base model, adapters off: the reference policy for KL costs no second copy of the weights."""
    mods = lora_modules(model).values()
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


@torch.no_grad()
def merged_weights(model: nn.Module, full=lambda t: t):
    """(name, tensor) of a plain Transformer's parameters with every adapter merged in: W0 + (alpha/r) B A
    under the linear's own name. full(t): the whole tensor of a sharded parameter (distributed.full_tensor)."""
    mods = lora_modules(model)
    for name, p in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base") and owner[:-5] in mods:
            m, plain = mods[owner[:-5]], owner[:-5] + "." + leaf
            if leaf == "weight":
                yield plain, merge(full(p), full(m.lora_A), full(m.lora_B), m.scale)
            else:
                yield plain, full(p)
        elif not name.endswith(("lora_A", "lora_B")):
            yield name, full(p)


def adapter_state(model: nn.Module, full=lambda t: t) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's key names: base_model.model.<linear>.lora_A.weight [r, in] / lora_B.weight."""
    return {f"{PEFT_PREFIX}{name}.{ab}.weight": full(getattr(m, ab)).detach().float().cpu().contiguous()
            for name, m in lora_modules(model).items() for ab in ("lora_A", "lora_B")}


def check_config(config: dict):
    """What minitir's LoRA is: plain LoRA, alpha / r scaling, one rank and alpha for every target."""
    unsupported = [k for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ValueError(f"adapter options minitir does not implement: {unsupported or config.get('peft_type')}")


def targets_of(config: dict) -> tuple[str, ...]:
    t = config["target_modules"]
    if t == "all-linear":
        return LINEARS
    if isinstance(t, str) or not set(t) <= set(LINEARS):
        raise ValueError(f"target_modules {t!r}: minitir adapts {', '.join(LINEARS)}")
    return tuple(t)


def adapter_config(base_path: str | None, rank: int, alpha: float, targets) -> dict:
    """PEFT's LoraConfig as adapter_config.json holds it; base_path None (a base built in memory) is written as
    null, which load_lora refuses by name, not as a path "None"."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": rank,
            "lora_alpha": alpha, "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None}


def save_adapter(path: Path, state: dict[str, torch.Tensor], config: dict):
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    return json.loads((path / CONFIG_FILE).read_text()), load_file(str(path / WEIGHTS_FILE))


@torch.no_grad()
def merged_copy(model: nn.Module) -> nn.Module:
    """A plain Transformer (no LoRALinear) holding the merged weights: for generation and for export."""
    plain = init_empty(model.config, dtype=model.dtype, device=model.device)
    params = dict(plain.named_parameters(remove_duplicate=False))
    for name, w in merged_weights(model):
        params[name].copy_(w)
    return plain.eval()


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]):
    """Adapters saved by `adapter_state` (or by PEFT) into a model that has them (add_lora)."""
    mods = lora_modules(model)
    want = {f"{PEFT_PREFIX}{name}.{ab}.weight" for name in mods for ab in ("lora_A", "lora_B")}
    if set(state) != want:
        missing, extra = sorted(want - set(state))[:3], sorted(set(state) - want)[:3]
        raise ValueError(f"adapter tensors do not match the model's adapters (missing {missing}, unexpected {extra})")
    for name, m in mods.items():
        for ab in ("lora_A", "lora_B"):
            getattr(m, ab).copy_(state[f"{PEFT_PREFIX}{name}.{ab}.weight"])
