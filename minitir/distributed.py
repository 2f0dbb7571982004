"""Data parallelism under torchrun, on PyTorch's own engine: FSDP2 (`fully_shard`) for the trained models,
plain collectives for everything else. With one process every helper is a no-op, so the trainer reads
the same with and without it.

    torchrun --nproc_per_node 8 train.py --model Qwen2.5-7B

What is sharded and what is not:
  - policy, reference and critic: every decoder layer is its own FSDP unit (all-gathered for its forward
    and backward, then freed), the root unit holds the embedding, final norm and lm_head;
  - gradients are reduce-scattered as a mean over ranks; the trainer scales each rank's loss by the number
    of ranks, so with token weights normalised over the global batch the gradient is exactly the one a
    single process would compute on the combined batch;
  - decoding does not go through FSDP (a collective per decode step would lock ranks that decode different
    numbers of tokens together): each rank decodes with a plain copy of the full weights, gathered once per
    optimizer step (Learner.decoder, with `full_tensor`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # --- collectives (no-ops with one process) ------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place, on whatever device t lives (NCCL reduces CUDA tensors only, gloo CPU ones); op: sum | max."""
        if self.enabled:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            x = t.to(dev)
            dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
            if x is not t:
                t.copy_(x)
        return t

    def sum(self, x: float) -> float:
        return float(self.all_reduce(torch.tensor([float(x)], dtype=torch.float64)))

    def max(self, x: float) -> float:
        return float(self.all_reduce(torch.tensor([float(x)], dtype=torch.float64), "max"))

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.enabled:
            dist.barrier()


def init(device: str = "auto") -> tuple[Dist, torch.device]:
    """Join the torchrun job if there is one (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU. -> (Dist, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if world == 1:
        return Dist(), torch.device(("cuda" if cuda else "cpu") if device == "auto" else device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device("cuda", local) if cuda else None)
    return Dist(rank, world), torch.device("cuda", local) if cuda else torch.device("cpu")


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(model: nn.Module, bf16: bool = False) -> nn.Module:
    """FSDP2 over a minitir Transformer (in place): one unit per decoder layer plus the root.

    bf16: gather and compute with bfloat16 copies of the float32 master weights and reduce gradients in
    float32 (--dtype bfloat16, on GPUs and CPUs; what autocast does for one process, at half the all-gather
    traffic; unlike autocast it also casts each unit's inputs, so the residual stream is bfloat16).
    The root keeps its parameters gathered after forward (FSDP2's default for a root, stated here because
    the trainer relies on it): the log-prob head reads `model.lm_head.weight` right after `hidden_packed`.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, reshard_after_forward=False, mp_policy=mp)
    # FSDP hooks run on __call__; the packed path is a separate method, so register it too
    register_fsdp_forward_method(model, "hidden_packed")
    return model


def reshard(model: nn.Module):
    """Free the gathered root parameters a forward-only model keeps (no backward will free them)."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        model.reshard()


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """A parameter's full value (a collective when it is a sharded DTensor)."""
    from torch.distributed.tensor import DTensor
    return p.full_tensor() if isinstance(p, DTensor) else p


def model_state(model: nn.Module, d: Dist) -> dict:
    """Full, CPU state dict of a sharded or plain model, on rank 0 (other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if not d.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, d: Dist) -> dict:
    """Full optimizer state keyed by parameter name (so it loads into any number of ranks), on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=d.enabled))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, d: Dist):
    """Inverse of optimizer_state, whatever the number of ranks that wrote it (rank 0's `state` is used)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if not d.enabled:
        set_optimizer_state_dict(model, opt, state)
    else:
        set_optimizer_state_dict(model, opt, state if d.main else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def split(n: int, d: Dist) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of n items (the first n % world ranks get one more)."""
    base, extra = divmod(n, d.world)
    start = d.rank * base + min(d.rank, extra)
    return start, start + base + (d.rank < extra)
