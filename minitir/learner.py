"""The policy and what learns with it: the models (policy, reference, critic, the generator's copy), the
optimizers, forward passes over packed samples, and the update.

The update makes ppo_epochs passes over a step's samples in mini_batches optimizer steps. Each mini-batch is
packed into micro-batches under a token budget; each micro-batch's objective (rl.token_objective) is
differentiated chunk by chunk inside the log-prob head (logprobs.token_loss), and gradients accumulate.
Token weights are normalised over the global mini-batch, so micro-batch losses add up and the sum over ranks
is the one-process loss; FSDP averages gradients over ranks, hence each backward is scaled by their number.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from minitir import batching, distributed, lora, ops, rl
from minitir.checkpoint import load_pretrained
from minitir.config import compute_dtype
from minitir.logprobs import token_logprobs, token_loss
from minitir.sample import Sample


class Critic(nn.Module):
    """A copy of the policy with a scalar value head (PPO)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.body = copy.deepcopy(policy)
        # float32 whatever the body's dtype (a LoRA base is bfloat16): the head's weights are trained masters
        self.value_head = nn.Linear(policy.config.hidden_size, 1, dtype=torch.float32, device=policy.device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)


def clip_grad_norm(module: nn.Module, max_norm: float, sharded: bool) -> float:
    """torch.nn.utils.clip_grad_norm_ -> the norm before clipping. On one process the squares are summed by
    ops.tree_sum and the tensors' sums in order, so the norm (and a clipped step's weights) is the same
    bits on any thread count; sharded (FSDP), torch's, which reduces across ranks."""
    if sharded:
        return float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)))
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    total = math.sqrt(sum(float(ops.tree_sum(g.detach().float().pow(2))) for g in grads))
    coef = min(max_norm / (total + 1e-6), 1.0)
    for g in grads:
        g.mul_(coef)
    return total


class Learner:
    def __init__(self, cfg, dist, device, model=None, tokenizer=None):
        """Policy (with LoRA adapters when lora_rank > 0), reference (kl_coef > 0: the starting policy, also when
        resuming; with LoRA the policy with its adapters off), critic (ppo), and the copy the generator
        decodes with when the trained weights are sharded, float32 masters under autocast (casting every
        weight at every decode step would dominate decoding) or adapted by LoRA (merged once per update).
        In bfloat16 (config.compute_dtype), weights stay float32 and compute runs in bfloat16 on CPU and CUDA
        alike: AdamW steps at lr 1e-6 would round away in bfloat16 weights; a LoRA run's frozen base is
        stored in bfloat16, its adapters in float32."""
        self.cfg, self.dist, self.device = cfg, dist, device
        if device.type == "cpu":
            ops.keep_freed_memory()
        self.autocast_on = compute_dtype(cfg.dtype, device) == "bfloat16"
        if model is None:
            low = cfg.lora_rank > 0 and self.autocast_on
            model, tokenizer = load_pretrained(cfg.model, dtype=torch.bfloat16 if low else torch.float32,
                                               device=device)
        # what a LoRA checkpoint names as its base: where the model was read from (checkpoint.base_name), or
        # None for one built in memory or merged from an adapter
        self.base_path: str | None = getattr(model, "source", None)
        self.model, self.tok = model, tokenizer
        if cfg.lora_rank:
            lora.add_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","), seed=cfg.seed)
        self.model.checkpointing, self.model.batch_invariant = cfg.checkpointing, cfg.batch_invariant
        self.ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 and not cfg.lora_rank else None
        self.critic = Critic(model) if cfg.algo == "ppo" else None
        self.gen_model, self.gen_version, self.version = None, -1, 0
        if dist.enabled or self.autocast_on or cfg.lora_rank:
            self.gen_model = lora.merged_copy(model).requires_grad_(False)
            self.gen_model.batch_invariant = cfg.batch_invariant
            if self.autocast_on:
                self.gen_model.to(torch.bfloat16)

    def shard(self):
        """FSDP2 over the ranks (after any checkpoint weights are loaded into the whole models)."""
        if not self.dist.enabled:
            return
        for m in (self.model, self.ref, self.critic.body if self.critic else None):   # (LoRA: frozen base sharded too)
            if m is not None:
                distributed.shard(m, bf16=self.autocast_on)
        if self.critic is not None:
            from torch.distributed.fsdp import fully_shard
            fully_shard(self.critic.value_head)

    def build_optimizers(self):
        cfg = self.cfg
        trained = lambda m: [p for p in m.parameters() if p.requires_grad]   # with LoRA: the adapters alone
        self.opt = torch.optim.AdamW(trained(self.model), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                     weight_decay=cfg.weight_decay)
        self.critic_opt = torch.optim.AdamW(trained(self.critic), lr=cfg.critic_lr) if self.critic else None
        total = max(1, cfg.steps * cfg.ppo_epochs * cfg.mini_batches)

        def schedule(i):
            warm = min(1.0, (i + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
            return warm * 0.5 * (1 + math.cos(math.pi * min(i, total) / total)) if cfg.lr_schedule == "cosine" else warm

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)

    def decoder(self) -> nn.Module:
        """The model the generator runs: the policy itself, or its plain copy refreshed after each update
        (gathered from the shards, adapters merged; every rank calls this)."""
        if self.gen_model is None:
            return self.model
        if self.gen_version != self.version:
            with torch.no_grad():
                params = dict(self.gen_model.named_parameters(remove_duplicate=False))
                for name, w in lora.merged_weights(self.model, distributed.full_tensor):   # one tensor at a time
                    params[name].copy_(w)
            self.gen_version = self.version
        return self.gen_model

    @contextmanager
    def reference(self):
        """The starting policy for KL: its frozen copy, or with LoRA the policy with its adapters off."""
        if self.ref is not None:
            try:
                yield self.ref
            finally:
                distributed.reshard(self.ref)
        else:
            with lora.disabled(self.model):
                yield self.model

    # --- precision and scoring ------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast_on)

    def micro_batches(self, samples: list[Sample]) -> list[list[Sample]]:
        mbs = batching.micro_batches(samples, self.cfg.micro_batch_tokens)
        return mbs + [[] for _ in range(int(self.dist.max(len(mbs))) - len(mbs))]   # FSDP: equal counts

    def _states(self, model: nn.Module, samples: list[Sample]):
        """Packed forward -> for each policy token the final hidden state before it [M, D], the token [M] and
        its sequence's index [M]. An empty list runs a one-token placeholder (see batching.placeholder)."""
        p = batching.pack(samples or batching.placeholder(self.tok.eos_token_id or 0), self.device)
        with self.autocast():
            hidden = model.hidden_packed(p.ids, p.cu_seqlens, p.continues)             # [N, D]
        return hidden.index_select(0, p.pred), p.targets, p.seq_index   # its gradient: in order (not by thread)

    def logprobs(self, model: nn.Module, samples: list[Sample], with_entropy: bool = False):
        """-> per policy token: log-probs [M], entropy [M] or None, sequence index [M]."""
        h, targets, seq = self._states(model, samples)
        with self.autocast():
            logp, ent = token_logprobs(h, model.lm_head.weight, targets, temperature=self.cfg.temperature,
                                       with_entropy=with_entropy, invariant=self.cfg.batch_invariant)
        return logp, ent, seq

    def values(self, samples: list[Sample]):
        """-> the critic's value at each policy token [M], sequence index [M]."""
        h, _, seq = self._states(self.critic.body, samples)
        with self.autocast():
            return self.critic.value_head(h.float()).squeeze(-1).float(), seq

    def _per_sample(self, samples: list[Sample], field: str, forward):
        """forward(micro-batch) -> (per-token values [M], ..., sequence index [M]); the values stored per
        sample in `field`."""
        for mb in self.micro_batches(samples):
            out = forward(mb)
            for s, v in zip(mb, batching.per_sample(out[0], mb, out[-1])):
                setattr(s, field, v)

    @torch.no_grad()
    def behaviour_logprobs(self, samples: list[Sample]):
        """old_logp: the log-probs of the policy as it is now, which must be the weights that generated the
        samples, for each sample that does not hold them yet (a carried sample keeps those of the weights that
        made it)."""
        self.model.eval()
        self._per_sample([s for s in samples if not s.old_logp], "old_logp", lambda mb: self.logprobs(self.model, mb))

    @torch.no_grad()
    def score(self, samples: list[Sample]):
        """Before any update of the step: reference log-probs (kl_coef > 0) and old values (ppo) of every
        sample; neither depends on which weights generated it."""
        if self.cfg.kl_coef > 0:
            with self.reference() as ref:
                self._per_sample(samples, "ref_logp", lambda mb: self.logprobs(ref, mb))
        if self.critic is not None:
            self._per_sample(samples, "old_values", self.values)

    # --- the update -----------------------------------------------------------------------------
    def update(self, samples: list[Sample], step: int) -> dict:
        """ppo_epochs passes over the samples in mini_batches optimizer steps -> metrics (means over steps),
        with the first pass's drift (see Drift)."""
        cfg, d = self.cfg, self.dist
        order_gen = torch.Generator().manual_seed(cfg.seed * 7_777 + step + 1_000_003 * d.rank)
        steps, drift = [], Drift()
        self.model.train()
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(samples), generator=order_gen).tolist()
            for b in range(cfg.mini_batches):
                part = order[b * len(samples) // cfg.mini_batches:(b + 1) * len(samples) // cfg.mini_batches]
                part.sort()   # the shuffle picks each step's samples; in step order, a group's prompt is packed once
                m = self._optimizer_step([samples[i] for i in part], drift if epoch == 0 else None)
                steps += [m] if m else []
        out = {k: sum(m[k] for m in steps) / len(steps) for k in (steps[0] if steps else {})}
        out.update(drift.metrics(d))
        out["lr"] = self.sched.get_last_lr()[0]
        return out

    def _optimizer_step(self, mini: list[Sample], drift: "Drift | None") -> dict | None:
        """One mini-batch: its token weights, gradients accumulated over its micro-batches, one optimizer step.
        A sample without loss tokens (masked) is not a sequence of the loss: seq_mean_* averages over the others."""
        cfg, d = self.cfg, self.dist
        local = sum(sum(s.loss_mask) for s in mini)
        seqs = sum(1 for s in mini if any(s.loss_mask))
        total = d.all_reduce(torch.tensor([float(local), float(seqs)]))   # global loss tokens, sequences holding any
        if total[0] == 0:
            return None
        seq = torch.cat([torch.zeros(0, dtype=torch.long)] +
                        [torch.full((sum(s.loss_mask),), i, dtype=torch.long) for i, s in enumerate(mini)])
        weights = rl.token_weights(torch.ones(local), seq, int(total[1]), cfg.loss_agg, cfg.max_new_tokens,
                                   total_tokens=float(total[0])).to(self.device)           # [local tokens]
        self.opt.zero_grad(set_to_none=True)
        if self.critic_opt is not None:
            self.critic_opt.zero_grad(set_to_none=True)
        stats, value_loss, offset = rl.ObjectiveStats(), 0.0, 0
        for mb in self.micro_batches(mini):
            if not mb:   # a placeholder: keeps this rank in step with the others' collectives
                self._placeholder_backward()
                continue
            w = weights[offset:offset + sum(sum(s.loss_mask) for s in mb)]                # [M]
            offset += w.shape[0]
            stats = stats + self._policy_backward(mb, w, drift)
            if self.critic is not None:
                value_loss += self._critic_backward(mb, w)
        gn = clip_grad_norm(self.model, cfg.grad_clip, d.enabled)
        self.opt.step()
        self.sched.step()
        self.version += 1
        if self.critic_opt is not None:
            clip_grad_norm(self.critic, cfg.grad_clip, d.enabled)
            self.critic_opt.step()
        out = {**vars(stats.all_reduce(d.all_reduce)), "grad_norm": float(gn)}
        if not cfg.kl_coef:
            out.pop("kl")
        if not cfg.tis_cap:
            out.pop("tis_capped")
        if self.critic is not None:
            out["value_loss"] = d.sum(value_loss)
        return out

    def _policy_backward(self, mb: list[Sample], w: torch.Tensor, drift: "Drift | None") -> rl.ObjectiveStats:
        """The objective over one micro-batch's policy tokens, its gradient taken chunk by chunk inside the
        head's forward (token_loss), then backward through the model."""
        cfg, dev = self.cfg, self.device
        h, targets, _ = self._states(self.model, mb)                                    # [M, D], [M]
        adv = batching.per_token(mb, "adv", dev)                                        # [M]
        old, held = batching.behaviour_logprobs(mb, dev)                                # [M], [M] bool
        ref = batching.per_token(mb, "ref_logp", dev) if cfg.kl_coef > 0 else None
        gen = batching.generator_logprobs(mb, dev)                                      # [M]
        stats = [rl.ObjectiveStats()]

        def objective(lp, ent, rows):   # lp, ent [C]: the micro-batch's tokens `rows`
            behaviour = torch.where(held[rows], old[rows], lp.detach())   # stand-ins: ratio 1, its gradient kept
            loss, s = rl.token_objective(
                lp, ent, behaviour, adv[rows], w[rows], clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                dual_clip=cfg.dual_clip or None, ref_logp=None if ref is None else ref[rows],
                kl_coef=0.0 if cfg.kl_in_reward else cfg.kl_coef, kl_estimator=cfg.kl_estimator,
                entropy_coef=cfg.entropy_coef, gen_logp=gen[rows], tis_cap=cfg.tis_cap)
            stats[0] = stats[0] + s
            return loss

        with self.autocast():
            loss, logp, _ = token_loss(h, self.model.lm_head.weight, targets, objective, temperature=cfg.temperature,
                                       with_entropy=True, invariant=cfg.batch_invariant)
        (loss * self.dist.world).backward()
        if drift is not None:
            carried = torch.tensor([s.carried for s in mb for _ in range(sum(s.loss_mask))], dtype=torch.bool)
            drift.add(gen, logp.detach().float(), old, carried.to(dev))
        return stats[0]

    def _critic_backward(self, mb: list[Sample], w: torch.Tensor) -> float:
        vals, _ = self.values(mb)
        old_v, ret = batching.per_token(mb, "old_values", self.device), batching.per_token(mb, "returns", self.device)
        vloss = (rl.value_loss(vals, old_v, ret, self.cfg.value_clip) * w).sum()
        (vloss * self.dist.world).backward()
        return float(vloss.detach())

    def _placeholder_backward(self):
        (self.logprobs(self.model, [])[0].sum() * 0).backward()
        if self.critic is not None:
            (self.values([])[0].sum() * 0).backward()


class Drift:
    """How far the policy being trained is from the ones that sampled, over the first pass of an update:
    the generator/trainer log-prob gap |log pi_generator - log pi_theta| over the tokens of samples made in
    this step (0 up to rounding when they share weights, precision and an untruncated distribution), and the
    ratio pi_theta / pi_behaviour over the carried samples' tokens (made by the weights before an update)."""

    def __init__(self):
        self.sums = torch.zeros(4, dtype=torch.float64)   # gap sum, tokens, carried ratio sum, carried tokens
        self.gap_max = torch.zeros(1, dtype=torch.float64)

    def add(self, gen: torch.Tensor, logp: torch.Tensor, old: torch.Tensor, carried: torch.Tensor):
        """gen, logp, old [M]; carried [M] bool: tokens of carried samples (old is their behaviour log-prob)."""
        gap = (gen - logp)[~carried].abs()
        ratio = (logp - old)[carried].exp()
        self.sums += torch.tensor([float(gap.sum()), len(gap), float(ratio.sum()), len(ratio)], dtype=torch.float64)
        self.gap_max = torch.maximum(self.gap_max, gap.max().cpu().double().view(1)) if len(gap) else self.gap_max

    def metrics(self, d) -> dict:
        sums, gap_max = d.all_reduce(self.sums.clone()), d.all_reduce(self.gap_max.clone(), "max")
        out = {}
        if sums[1] > 0:
            out["logprob_gap_mean"], out["logprob_gap_max"] = float(sums[0] / sums[1]), float(gap_max[0])
        if sums[3] > 0:
            out["carried_ratio_mean"] = float(sums[2] / sums[3])
        return out
