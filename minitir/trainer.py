"""The RL loop: prompts -> rollouts (generator + sandbox) -> rewards -> advantages -> clipped policy loss
over packed micro-batches -> AdamW step -> metrics, checkpoints and exact resume.

One step, in order (each a method below):
  _sample_groups   n responses for each of `prompts_per_step` problems, refilled while groups are filtered
  _score           rewards from the grader (+ optional KL-in-reward), per-token advantages
  _update          ppo_epochs x mini_batches; each mini-batch is packed into micro-batches under a token
                   budget, gradients accumulate, then one optimizer step
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn

from minitir import distributed, miniature, rl
from minitir.checkpoint import load_model, load_pretrained, save_pretrained
from minitir.generate import Completion, GenerationConfig, Generator
from minitir.filters import drop_reason, is_void
from minitir.logprobs import token_logprobs, token_loss
from minitir.reward import Grader, RewardConfig, answer_to_grade, outcome_reward
from minitir.tasks import (Problem, get_template, load_benchmark, load_problems, render_prompt,
                           synthetic_problems)


ROOT = Path(__file__).resolve().parents[1]

@dataclass
class TrainConfig:
    # --- model ---
    model: str = "smollm2-135m"         # local dir, hub id, short name (Qwen2.5-1.5B) or smollm2-135m
    dtype: str = "auto"                 # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    device: str = "auto"                # auto | cpu | cuda
    checkpointing: str = "selective"    # activation checkpointing: none | selective | full
    # --- data ---
    data: str = "miniature"             # miniature | synthetic | a benchmark name (math_train, gsm8k, ...) | a file path
    data_dir: str = str(ROOT / "data")  # where benchmark files are looked up (then the Hugging Face hub)
    question_field: str | None = None
    answer_field: str | None = None
    synthetic_size: int = 2000          # problems generated for --data miniature or synthetic
    synthetic_difficulty: int = 1
    eval_data: str = ""                 # "" = held-out problems of the training source
    eval_size: int = 32
    eval_every: int = 0                 # steps between evaluations (0 = only at the end if eval_size > 0)
    prompt: str = "zero_tir"            # zero_tir | zero_rl | chat_tir | a template text with {question}
    max_prompt_tokens: int = 1024
    # --- rollout ---
    prompts_per_step: int = 8
    n_samples: int = 8                  # responses per prompt (the group)
    max_new_tokens: int = 1024          # response budget, tool output included
    temperature: float = 1.0
    top_p: float = 1.0
    max_tool_calls: int = 2
    max_tool_output_tokens: int = 256   # an output block over this many tokens (whole block) is replaced
    tool_output_overflow: str = "replace"   # replace: the paper's "too long" message | truncate
    max_batch: int = 64                 # sequences decoded at once (KV-cache rows)
    sandbox_url: str = ""               # use a remote `sandbox.py serve` instead of local workers
    sandbox_timeout_s: float = 5.0
    sandbox_memory_mb: int = 1024
    sandbox_workers: int = 2
    # --- reward ---
    reward: str = "strict"              # strict: the paper's gates (format, ended normally, answer after
                                        # </think>) | lenient: any \\boxed answer counts
    format_penalty: float = 0.0         # lenient only
    truncation_penalty: float = 0.0     # lenient only
    # --- algorithm ---
    algo: str = "grpo"                  # grpo | dr_grpo | rloo | reinforce_pp | ppo (GAE with a critic)
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 0.0              # 0 = off; e.g. 3.0
    loss_agg: str = "token_mean"        # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    kl_coef: float = 0.0                # 0 = no reference model in memory
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    filter_groups: bool = False         # dynamic sampling: keep groups with accuracy in [min, max]
    filter_min_acc: float = 0.01
    filter_max_acc: float = 0.8
    max_refill_rounds: int = 3
    mask_truncated: bool = False        # drop responses cut at the length limit from the loss
    filter_overlong: bool = False       # paper: drop responses cut at the length limit (not correct) from the batch
    filter_repetition: float = 0.0      # paper (0.05): drop correct responses whose repeatness exceeds this; 0 = off
    carry_over: bool = False            # paper: filter survivors fill the batch; the surplus waits for the next step
    mask_void_turns: bool = False       # beyond the paper: mask responses with code that never ran or no answer
    tis_cap: float = 0.0                # beyond the paper: truncated importance sampling cap (e.g. 2.0); 0 = off
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_tokens: int = 8192
    # --- optimiser ---
    lr: float = 1e-6
    adam_betas: tuple[float, float] = (0.9, 0.999)   # the paper: (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"       # constant | cosine
    # --- critic (ppo) ---
    critic_lr: float = 1e-5
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 1.0
    # --- run ---
    steps: int = 100
    seed: int = 0
    run_dir: str = "runs"
    run_name: str = ""                  # "" = a timestamp
    save_every: int = 50
    keep_checkpoints: int = 2
    tensorboard: bool = True
    log_samples: int = 4                # rollouts per step written to runs/NAME/samples.jsonl (full text)
    print_every: int = 5                # print one rollout every this many steps (0 = never)


class ConfigError(ValueError):
    pass


def validate(cfg: TrainConfig, device: torch.device):
    """Mistakes a user can make, reported before anything heavy runs, with what to change."""
    def bad(msg):
        raise ConfigError(msg)
    if cfg.algo not in ("grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo"):
        bad(f"--algo {cfg.algo!r}: choose grpo, dr_grpo, rloo, reinforce_pp or ppo")
    if cfg.loss_agg not in rl.AGGREGATIONS:
        bad(f"--loss-agg {cfg.loss_agg!r}: choose from {rl.AGGREGATIONS}")
    if cfg.kl_estimator not in ("k1", "k2", "k3"):
        bad(f"--kl-estimator {cfg.kl_estimator!r}: choose k1, k2 or k3")
    if cfg.dtype == "bfloat16" and device.type != "cuda":
        bad("--dtype bfloat16 needs a CUDA GPU (none found); use --dtype float32 (or auto) on CPU")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        bad(f"--dtype {cfg.dtype!r}: choose auto, float32 or bfloat16")
    need = cfg.max_prompt_tokens + cfg.max_new_tokens
    if cfg.micro_batch_tokens < need:
        bad(f"--micro-batch-tokens {cfg.micro_batch_tokens} cannot hold one sequence of up to {need} tokens "
            f"(--max-prompt-tokens + --max-new-tokens): raise it to at least {need} or lower those")
    if cfg.algo == "rloo" and cfg.n_samples < 2:
        bad("--algo rloo needs --n-samples >= 2")
    if cfg.prompts_per_step * cfg.n_samples < cfg.mini_batches:
        bad(f"--mini-batches {cfg.mini_batches} exceeds the {cfg.prompts_per_step * cfg.n_samples} responses per step")
    if not 0 <= cfg.filter_min_acc <= cfg.filter_max_acc <= 1:
        bad("--filter-min-acc / --filter-max-acc must satisfy 0 <= min <= max <= 1")
    if cfg.lr_schedule not in ("constant", "cosine"):
        bad(f"--lr-schedule {cfg.lr_schedule!r}: choose constant or cosine")
    if cfg.reward not in ("strict", "lenient"):
        bad(f"--reward {cfg.reward!r}: choose strict or lenient")
    if cfg.tool_output_overflow not in ("replace", "truncate"):
        bad(f"--tool-output-overflow {cfg.tool_output_overflow!r}: choose replace or truncate")
    if cfg.tis_cap < 0 or (0 < cfg.tis_cap < 1):
        bad(f"--tis-cap {cfg.tis_cap}: use 0 (off) or a cap >= 1 (e.g. 2)")


@dataclass
class Sample:
    """One response and everything the update needs about it."""
    prompt_ids: list[int]
    completion: Completion
    gold: str
    question: str = ""
    correct: bool = False
    graded: bool = True            # False: the grader could not check it (counted, kept out of the statistics)
    format_ok: bool = False
    reward: float = 0.0
    score: float = 0.0             # outcome advantage from the group baseline, before the token broadcast
    loss_mask: list[int] = field(default_factory=list)  # over completion tokens
    adv: list[float] = field(default_factory=list)      # per policy token (compacted)
    old_logp: list[float] = field(default_factory=list)
    ref_logp: list[float] = field(default_factory=list)
    old_values: list[float] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)


class Critic(nn.Module):
    """A copy of the policy with a scalar value head (PPO)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.body = copy.deepcopy(policy)
        self.value_head = nn.Linear(policy.config.hidden_size, 1, dtype=policy.dtype, device=policy.device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)


class _TimedTool:
    """Wraps the sandbox to add up the time spent executing code (it overlaps with decoding)."""

    def __init__(self, tool):
        self.tool, self.seconds = tool, 0.0

    def run(self, code):
        t = time.perf_counter()
        try:
            return self.tool.run(code)
        finally:
            self.seconds += time.perf_counter() - t


class Trainer:
    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, problems: list[Problem] | None = None,
                 eval_problems: list[Problem] | None = None, tool=None, reward_fn=None, resume: str = ""):
        self.cfg = cfg
        # under torchrun: one process per GPU (or CPU process with gloo), each with its share of the prompts
        self.dist, self.device = distributed.init(cfg.device)
        validate(cfg, self.device)
        torch.manual_seed(cfg.seed)
        self.template = get_template(cfg.prompt)
        self.step = 0
        self.data_epoch, self.data_pos = 0, 0
        # --- data first: a bad file fails in seconds, not after loading a model ---
        self.problems, self.eval_problems = self._load_data(problems, eval_problems)
        # --- run directory (rank 0 names it) ---
        if resume:
            self.run_dir = Path(resume)
            ckpt = self._latest_checkpoint()
        else:
            name = self.dist.broadcast(cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))
            self.run_dir = Path(cfg.run_dir) / name
            ckpt = None
            if self.dist.main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        # --- models ---
        # on CUDA, "auto" keeps float32 master weights and computes in bfloat16 under autocast: with
        # lr 1e-6, AdamW updates to bfloat16 weights would round away
        self.autocast = cfg.dtype == "auto" and self.device.type == "cuda"
        dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        if model is None:
            model, tokenizer = load_pretrained(cfg.model, dtype=dtype, device=self.device)
        self.model, self.tok = model, tokenizer
        self.model.checkpointing = cfg.checkpointing
        self.ref = None
        if cfg.kl_coef > 0:  # the starting policy, also when resuming
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.critic = Critic(self.model) if cfg.algo == "ppo" else None
        state = self._load_weights(ckpt) if ckpt else None
        # the generator decodes with a plain copy when the trained weights are sharded (FSDP) or float32
        # masters under autocast (casting every weight at every decode step would dominate decoding)
        self.gen_model, self.gen_version, self.version = None, -1, 0
        if self.dist.enabled or self.autocast:
            self.gen_model = copy.deepcopy(self.model).requires_grad_(False).eval()
            if self.autocast:
                self.gen_model.to(torch.bfloat16)
        if self.dist.enabled:
            for m in (self.model, self.ref, self.critic.body if self.critic else None):
                if m is not None:
                    distributed.shard(m, bf16=self.autocast)
            if self.critic is not None:
                from torch.distributed.fsdp import fully_shard
                fully_shard(self.critic.value_head)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                     weight_decay=cfg.weight_decay)
        self.critic_opt = (torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr)
                           if self.critic is not None else None)
        total = max(1, cfg.steps * cfg.ppo_epochs * cfg.mini_batches)

        def schedule(i):
            warm = min(1.0, (i + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
            if cfg.lr_schedule == "cosine":
                return warm * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
            return warm

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        if state is not None:
            self._load_state(state)
        # --- tools, grader, reward ---
        if tool is None and self.template.tools and cfg.max_tool_calls > 0:
            from minitir.sandbox import RemoteSandbox, Sandbox
            tool = (RemoteSandbox(cfg.sandbox_url, timeout_s=cfg.sandbox_timeout_s) if cfg.sandbox_url
                    else Sandbox(cfg.sandbox_timeout_s, cfg.sandbox_memory_mb, workers=cfg.sandbox_workers))
        self.tool = _TimedTool(tool) if tool is not None else None
        self.grader = Grader(workers=2)
        self.reward_cfg = RewardConfig(kind=cfg.reward, format_penalty=cfg.format_penalty,
                                       truncation_penalty=cfg.truncation_penalty)
        self.carry: list[Sample] = []   # filter survivors beyond one batch (carry_over), used next step
        self._shown = ""                 # the last rollout written to samples.jsonl, for the console
        self.reward_fn = reward_fn
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tb = None
        if cfg.tensorboard and self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # tensorboard is optional
                pass

    # --------------------------------------------------------------------------------------------
    def _load_data(self, problems, eval_problems):
        cfg = self.cfg
        if problems is None:
            if cfg.data == "miniature":   # problems the miniature base model never trained on (another seed)
                problems = miniature.problems(cfg.synthetic_size + cfg.eval_size, seed=cfg.seed + 1)
            elif cfg.data == "synthetic":
                problems = synthetic_problems(cfg.synthetic_size + cfg.eval_size, seed=cfg.seed,
                                              difficulty=cfg.synthetic_difficulty)
            elif Path(cfg.data).exists():
                problems, report = load_problems(cfg.data, cfg.question_field, cfg.answer_field)
                self._report_skips(cfg.data, report)
            else:
                problems, report = load_benchmark(cfg.data, cfg.data_dir)
                self._report_skips(cfg.data, report)
        if eval_problems is None and cfg.eval_size > 0:
            if cfg.eval_data:
                eval_problems, report = load_benchmark(cfg.eval_data, cfg.data_dir, limit=cfg.eval_size)
                self._report_skips(cfg.eval_data, report)
            else:  # hold out the tail of the training source
                if len(problems) <= cfg.eval_size:
                    raise ConfigError(f"--eval-size {cfg.eval_size} leaves no training problems out of {len(problems)}")
                problems, eval_problems = problems[:-cfg.eval_size], problems[-cfg.eval_size:]
        if not problems:
            raise ConfigError(f"no training problems in {cfg.data!r}")
        return problems, eval_problems or []

    def _report_skips(self, name, report):
        if report.skipped_no_answer and self.dist.main:
            print(f"{name}: skipped {report.skipped_no_answer} records without a gold answer "
                  f"(lines {report.skipped_lines[:10]}{' ...' if len(report.skipped_lines) > 10 else ''})")

    def _next_problems(self, k: int) -> list[Problem]:
        """The next k problems of a seeded permutation per epoch (position saved in checkpoints)."""
        out = []
        while len(out) < k:
            order = list(range(len(self.problems)))
            random.Random(self.cfg.seed * 7919 + self.data_epoch).shuffle(order)
            take = order[self.data_pos:self.data_pos + k - len(out)]
            out += [self.problems[i] for i in take]
            self.data_pos += len(take)
            if self.data_pos >= len(order):
                self.data_epoch, self.data_pos = self.data_epoch + 1, 0
        return out

    def _prompt_ids(self, p: Problem) -> list[int]:
        return self.tok(render_prompt(self.template, p.question, self.tok)).input_ids

    # --------------------------------------------------------------------------------------------
    def _decoder(self) -> nn.Module:
        """The model the generator runs: the policy itself, or its plain copy refreshed after each update."""
        if self.gen_model is None:
            return self.model
        if self.gen_version != self.version:
            distributed.gather_weights(self.model, self.gen_model)
            self.gen_version = self.version
        return self.gen_model

    def _generate(self, problems: list[Problem], n: int, temperature: float, seed: int, first: int = 0):
        """-> (completions grouped per problem [P][n], prompt token ids [P]). `first` is the index of
        problems[0] in the global batch: sampling streams are per sequence and global, so a response does
        not depend on how many ranks share the batch."""
        cfg = self.cfg
        prompts = [self._prompt_ids(p) for p in problems]
        gen_cfg = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p, stop=self.template.stop,
            seed=seed, seed_offset=first * n, max_tool_calls=cfg.max_tool_calls if self.template.tools else 0,
            max_tool_output_tokens=cfg.max_tool_output_tokens, tool_output_overflow=cfg.tool_output_overflow,
            max_batch=cfg.max_batch,
            max_len=cfg.max_prompt_tokens + cfg.max_new_tokens)
        model = self._decoder()
        model.eval()
        with self._autocast():
            outs = Generator(model, self.tok, gen_cfg, self.tool).generate([p for p in prompts for _ in range(n)])
        return [outs[i * n:(i + 1) * n] for i in range(len(problems))], prompts

    def _sample_groups(self, timing: dict):
        """-> (this rank's samples for the update, every sample it generated, global statistics).
        Each rank generates whole groups for its contiguous share of each round's problems. Groups outside
        the accuracy range (filter_groups) and responses the paper's filters drop leave the batch; rounds
        refill it up to prompts_per_step * n_samples responses (all ranks together). With carry_over the
        surplus of the last round waits for the next step, as the paper's replay buffer does."""
        cfg, d, n = self.cfg, self.dist, self.cfg.n_samples
        target = cfg.prompts_per_step * n
        buffer, self.carry = self.carry, []
        stats = {"groups_sampled": 0, "groups_kept": 0, "carried_in": int(d.sum(len(buffer))),
                 "dropped_overlong": 0, "dropped_repetitive": 0}
        refills = cfg.filter_groups or cfg.filter_overlong or cfg.filter_repetition > 0
        all_samples = []
        for rnd in range(cfg.max_refill_rounds if refills else 1):
            have = int(d.sum(len(buffer)))
            if have >= target:
                break
            want = -(-(target - have) // n)
            everyone = self._next_problems(want)  # the same on every rank
            lo, hi = distributed.split(want, d)
            problems = everyone[lo:hi]
            t = time.perf_counter()
            groups, prompts = self._generate(problems, n, cfg.temperature,
                                             seed=cfg.seed * 1_000_003 + self.step * 101 + rnd, first=lo)
            timing["generate"] += time.perf_counter() - t
            t = time.perf_counter()
            batch = [Sample(prompt_ids=ids, completion=c, gold=p.answer, question=p.question)
                     for p, ids, comps in zip(problems, prompts, groups) for c in comps]
            self._grade(batch)
            timing["grade"] += time.perf_counter() - t
            all_samples += batch
            stats["groups_sampled"] += want
            for i in range(0, len(batch), n):
                group = batch[i:i + n]
                graded = [s for s in group if s.graded]
                acc = sum(s.correct for s in graded) / max(len(graded), 1)
                if not graded or (cfg.filter_groups and not cfg.filter_min_acc <= acc <= cfg.filter_max_acc):
                    continue
                stats["groups_kept"] += 1
                self._score_group(group)
                for s in group:
                    c = s.completion
                    why = drop_reason(c.finish_reason, c.text, s.correct, cfg.filter_overlong, cfg.filter_repetition)
                    if why:
                        stats[f"dropped_{why}"] += 1
                    elif s.graded:
                        buffer.append(s)
        for k in ("groups_kept", "dropped_overlong", "dropped_repetitive"):
            stats[k] = int(d.sum(stats[k]))
        kept = buffer
        if cfg.carry_over:  # exactly one batch; the rest (the last ranks' tails first) waits
            counts = d.gather(len(buffer))
            surplus = max(sum(counts) - target, 0)
            later = sum(counts[d.rank + 1:])
            mine = min(max(surplus - later, 0), len(buffer))
            kept, self.carry = buffer[:len(buffer) - mine], buffer[len(buffer) - mine:]
        stats["carried_out"] = int(d.sum(len(self.carry)))
        return kept, all_samples, stats

    def _grade(self, batch: list[Sample]):
        """correct, reward and loss mask of each sample. strict: the paper's reward (format and ended-normally
        gates, the answer after </think>); lenient: any \\boxed answer. A check the grader could not make
        marks the sample ungraded: counted, and kept out of the statistics and the loss."""
        cfg = self.cfg
        count = lambda text: len(self.tok.encode(text, add_special_tokens=False)) if hasattr(self.tok, "encode") else None
        picked = [answer_to_grade(s.completion.policy_text or s.completion.text, s.completion.finish_reason == "stop",
                                  cfg.reward, count) for s in batch]
        verdicts = self.grader.math_equal_many([(a, s.gold) for (a, _), s in zip(picked, batch)])
        for s, (answer, fmt), ok in zip(batch, picked, verdicts):
            c = s.completion
            s.graded, s.correct, s.format_ok = ok is not None, bool(ok), fmt
            truncated = c.finish_reason == "length"
            if self.reward_fn is not None:
                s.reward = float(self.reward_fn(c.text, s.gold, {"correct": s.correct, "finish_reason": c.finish_reason,
                                                                 "num_tool_calls": c.num_tool_calls}))
            else:
                s.reward = outcome_reward(s.correct, c.text, truncated, self.reward_cfg)
            drop = (cfg.mask_truncated and truncated) or not s.graded or \
                (cfg.mask_void_turns and is_void(c.policy_text, c.num_tool_calls, answer is not None))
            s.loss_mask = [0] * len(c.tokens) if drop else list(c.policy_mask)

    def _score_group(self, group: list[Sample]):
        """The group baseline (grpo, dr_grpo, rloo, reinforce_pp) over the graded responses of one group,
        before any response is filtered out, as the paper computes it; PPO's advantages come from GAE."""
        if self.cfg.algo == "ppo":
            return
        r = torch.tensor([[s.reward for s in group]], dtype=torch.float32)               # [1, n]
        valid = torch.tensor([[s.graded for s in group]])
        for s, a in zip(group, rl.group_advantages(r, self.cfg.algo, valid)[0].tolist()):
            s.score = a

    # --------------------------------------------------------------------------------------------
    def _micro_batches(self, samples: list[Sample]) -> list[list[Sample]]:
        """Greedy packing in order under the token budget (validate() made sure one sequence fits); samples
        without loss tokens are left out. Under FSDP every forward is a collective, so ranks with fewer
        micro-batches get empty ones ([]) up to the largest count of any rank."""
        out, cur, used = [], [], 0
        for s in samples:
            if not any(s.loss_mask):
                continue
            n = len(s.prompt_ids) + len(s.completion.tokens)
            if cur and used + n > self.cfg.micro_batch_tokens:
                out.append(cur)
                cur, used = [], 0
            cur.append(s)
            used += n
        out += [cur] if cur else []
        return out + [[] for _ in range(int(self.dist.max(len(out))) - len(out))]

    def _policy_states(self, model: nn.Module, samples: list[Sample]):
        """Packed forward over the samples -> for each policy token (loss_mask == 1, in order) the final
        hidden state before it [M, D], the token [M] and its sequence's index [M].
        An empty list runs a one-token placeholder (this rank's share of a collective step); what is
        computed from it must be multiplied by 0."""
        if not samples:
            eos = self.tok.eos_token_id or 0
            samples = [Sample(prompt_ids=[eos], completion=Completion([eos], [0.0], [1], "", "stop"), gold="",
                              loss_mask=[1])]
        ids, cu, sel, seq_index = [], [0], [], []
        for i, s in enumerate(samples):
            start = cu[-1] + len(s.prompt_ids)
            ids += s.prompt_ids + s.completion.tokens
            sel += [start + j for j, m in enumerate(s.loss_mask) if m]
            seq_index += [i] * sum(s.loss_mask)
            cu.append(len(ids))
        dev = self.device
        ids_t = torch.tensor(ids, device=dev)
        sel_t = torch.tensor(sel, dtype=torch.long, device=dev)
        with self._autocast():
            hidden = model.hidden_packed(ids_t, torch.tensor(cu, dtype=torch.int32, device=dev))   # [N, D]
        return hidden[sel_t - 1], ids_t[sel_t], torch.tensor(seq_index, dtype=torch.long, device=dev)

    def _forward(self, model: nn.Module, samples: list[Sample], with_entropy: bool, value_head=None):
        """-> per policy token (see _policy_states): log-probs [M] (entropy [M]) or, with value_head,
        values [M]; plus seq index [M]."""
        h, targets, seq_t = self._policy_states(model, samples)
        with self._autocast():
            if value_head is not None:
                return value_head(h).squeeze(-1).float(), None, seq_t
            logp, ent = token_logprobs(h, model.lm_head.weight, targets, temperature=self.cfg.temperature,
                                       with_entropy=with_entropy)
        return logp, ent, seq_t

    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.autocast)

    def _per_sample(self, flat: torch.Tensor, samples: list[Sample], seq_t: torch.Tensor) -> list[list[float]]:
        if not samples:  # a placeholder micro-batch
            return []
        out = [[] for _ in samples]
        for v, i in zip(flat.tolist(), seq_t.tolist()):
            out[i].append(v)
        return out

    @torch.no_grad()
    def _prepare(self, samples: list[Sample], metrics: dict):
        """Old log-probs (with several updates per step), reference log-probs and old values before any
        update; then advantages. With one update per step the old log-probs come from the update's own
        forward (detached): the same numbers without a second forward pass."""
        cfg = self.cfg
        self.model.eval()
        need_old = cfg.ppo_epochs * cfg.mini_batches > 1 or (self.ref is not None and cfg.kl_in_reward)
        for mb in self._micro_batches(samples):
            if need_old:
                logp, _, seq_t = self._forward(self.model, mb, False)
                for s, lps in zip(mb, self._per_sample(logp, mb, seq_t)):
                    s.old_logp = lps
            if self.ref is not None:
                ref, _, seq_t = self._forward(self.ref, mb, False)
                for s, lps in zip(mb, self._per_sample(ref, mb, seq_t)):
                    s.ref_logp = lps
            if self.critic is not None:
                vals, _, seq_t = self._forward(self.critic.body, mb, False, self.critic.value_head)
                for s, vs in zip(mb, self._per_sample(vals, mb, seq_t)):
                    s.old_values = vs
        if self.ref is not None:
            distributed.reshard(self.ref)
        # --- rewards -> advantages (group statistics stay on one rank; batch statistics are global) ---
        rewards = [s.reward for s in samples]
        if self.ref is not None and cfg.kl_in_reward:
            for k, s in enumerate(samples):
                kl = rl.kl_estimate(torch.tensor(s.old_logp), torch.tensor(s.ref_logp), cfg.kl_estimator)
                rewards[k] -= cfg.kl_coef * float(kl.sum())
        if cfg.algo == "ppo":
            T = max([len(s.old_values) for s in samples] + [1])
            R, V, M = (torch.zeros(len(samples), T) for _ in range(3))
            for k, s in enumerate(samples):
                L = len(s.old_values)
                if L:
                    V[k, :L] = torch.tensor(s.old_values)
                    M[k, :L] = 1
                    R[k, L - 1] = rewards[k]   # outcome reward at the last policy token
            adv, ret = rl.gae(R, V, M, cfg.gamma, cfg.lam)
            # PPO's usual advantage normalisation, over the global batch
            adv = rl.whiten(adv.flatten(), M.flatten(), all_reduce=self.dist.all_reduce).view_as(adv)
            for k, s in enumerate(samples):
                L = len(s.old_values)
                s.adv, s.returns = adv[k, :L].tolist(), ret[k, :L].tolist()
            return
        scores = [s.score - (s.reward - r) for s, r in zip(samples, rewards)]   # the group baseline's, minus KL
        if cfg.algo == "reinforce_pp":  # whiten over all policy tokens of the (global) batch
            tok = torch.cat([torch.zeros(0)] + [torch.full((sum(s.loss_mask),), a) for s, a in zip(samples, scores)])
            tok = rl.whiten(tok, torch.ones_like(tok), all_reduce=self.dist.all_reduce)
            i = 0
            for s in samples:
                L = sum(s.loss_mask)
                s.adv, i = tok[i:i + L].tolist(), i + L
        else:
            for s, a in zip(samples, scores):
                s.adv = [a] * sum(s.loss_mask)

    # --------------------------------------------------------------------------------------------
    def _update(self, samples: list[Sample], metrics: dict):
        """Each rank holds its share of every mini-batch; token weights are normalised over the global
        mini-batch, so the sum of all ranks' losses is the single-process loss. FSDP averages gradients
        over ranks, hence the loss is scaled by the number of ranks before backward."""
        cfg, d = self.cfg, self.dist
        gen = torch.Generator().manual_seed(cfg.seed * 7_777 + self.step + 1_000_003 * d.rank)
        acc = {"loss": [], "clipfrac": [], "entropy": [], "kl": [], "grad_norm": [], "value_loss": []}
        gap = torch.zeros(3, dtype=torch.float64)  # |generator log-prob - trainer log-prob|: sum, count, max
        self.model.train()
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(samples), generator=gen).tolist()
            for b in range(cfg.mini_batches):
                mini = [samples[i] for i in order[b * len(samples) // cfg.mini_batches:
                                                   (b + 1) * len(samples) // cfg.mini_batches]]
                local_tok = sum(sum(s.loss_mask) for s in mini)
                total = d.all_reduce(torch.tensor([float(local_tok), float(len(mini))]))  # global tokens, sequences
                if total[0] == 0:
                    continue
                # token weights of the whole (global) mini-batch, so micro-batch losses simply add up
                seq_index = torch.cat([torch.zeros(0, dtype=torch.long)] +
                                      [torch.full((sum(s.loss_mask),), i, dtype=torch.long) for i, s in enumerate(mini)])
                weights = rl.token_weights(torch.ones(local_tok), seq_index, int(total[1]), cfg.loss_agg,
                                           cfg.max_new_tokens, total_tokens=float(total[0]))
                self.opt.zero_grad(set_to_none=True)
                if self.critic_opt is not None:
                    self.critic_opt.zero_grad(set_to_none=True)
                # weighted sums over this rank's tokens: loss, clipped, entropy, kl, value loss
                sums = torch.zeros(5, dtype=torch.float64)
                offset = 0
                for mb in self._micro_batches(mini):
                    if not mb:  # placeholder: keeps this rank in step with the others' collectives
                        (self._forward(self.model, mb, False)[0].sum() * 0).backward()
                        if self.critic is not None:
                            (self._forward(self.critic.body, mb, False, self.critic.value_head)[0].sum() * 0).backward()
                        continue
                    h, targets, _ = self._policy_states(self.model, mb)                  # [M, D], [M]
                    M = targets.shape[0]
                    w = weights[offset:offset + M].to(self.device)                         # [M]
                    offset += M
                    adv = torch.tensor([v for s in mb for v in s.adv], device=self.device)
                    # without old log-probs (one update per step) the policy that generated is the current one
                    old = torch.tensor([v for s in mb for v in s.old_logp], device=self.device) if mb[0].old_logp else None
                    ref = (torch.tensor([v for s in mb for v in s.ref_logp], device=self.device)
                           if self.ref is not None else None)

                    gen_lp = torch.tensor([lp for s in mb for lp, k in zip(s.completion.logprobs, s.loss_mask) if k],
                                          device=self.device)                                # [M]

                    def chunk_loss(lp, en, rows):   # lp, en [C]: the micro-batch's tokens `rows`
                        behaviour = lp.detach() if old is None else old[rows]
                        tok_loss, _ = rl.policy_loss(lp, behaviour, adv[rows], cfg.clip_low, cfg.clip_high,
                                                     cfg.dual_clip or None)
                        if cfg.tis_cap:
                            tok_loss = tok_loss * rl.tis_weights(behaviour.float(), gen_lp[rows], cfg.tis_cap)
                        if ref is not None and not cfg.kl_in_reward:
                            tok_loss = tok_loss + cfg.kl_coef * rl.kl_estimate(lp, ref[rows], cfg.kl_estimator)
                        if cfg.entropy_coef:
                            tok_loss = tok_loss - cfg.entropy_coef * en
                        return (tok_loss * w[rows]).sum()

                    # the loss's gradient w.r.t. the logits is taken chunk by chunk inside the head's forward
                    with self._autocast():
                        loss, logp, ent = token_loss(h, self.model.lm_head.weight, targets, chunk_loss,
                                                     temperature=cfg.temperature, with_entropy=True)
                    (loss * d.world).backward()
                    if epoch == 0:
                        g = (gen_lp - logp.float()).abs()
                        gap += torch.tensor([float(g.sum()), len(g), 0.0], dtype=torch.float64)
                        gap[2] = max(gap[2], float(g.max()))
                    _, clipped = rl.policy_loss(logp, logp if old is None else old, adv, cfg.clip_low, cfg.clip_high,
                                                cfg.dual_clip or None)
                    sums[0] += float(loss.detach())
                    sums[1] += float((clipped.float() * w).sum())
                    sums[2] += float((ent * w).sum())
                    if ref is not None:
                        sums[3] += float((rl.kl_estimate(logp, ref, cfg.kl_estimator) * w).sum())
                    if self.critic is not None:
                        vals, _, _ = self._forward(self.critic.body, mb, False, self.critic.value_head)
                        old_v = torch.tensor([v for s in mb for v in s.old_values], device=self.device)
                        ret = torch.tensor([v for s in mb for v in s.returns], device=self.device)
                        vloss = (rl.value_loss(vals, old_v, ret, cfg.value_clip) * w).sum()
                        (vloss * d.world).backward()
                        sums[4] += float(vloss.detach())
                gn = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
                self.opt.step()
                self.sched.step()
                self.version += 1
                if self.critic_opt is not None:
                    torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
                    self.critic_opt.step()
                sums = d.all_reduce(sums)  # the weights sum to 1 over all ranks: these are global means
                acc["loss"].append(float(sums[0]))
                acc["clipfrac"].append(float(sums[1]))
                acc["entropy"].append(float(sums[2]))
                acc["grad_norm"].append(float(gn))
                if self.ref is not None:
                    acc["kl"].append(float(sums[3]))
                if self.critic is not None:
                    acc["value_loss"].append(float(sums[4]))
        for k, v in acc.items():
            if v:
                metrics[k] = sum(v) / len(v)
        gap_sum = d.all_reduce(gap[:2].clone())
        gap_max = d.all_reduce(gap[2:].clone(), "max")
        if gap_sum[1] > 0:
            metrics["logprob_gap_mean"], metrics["logprob_gap_max"] = float(gap_sum[0] / gap_sum[1]), float(gap_max[0])
        metrics["lr"] = self.sched.get_last_lr()[0]

    # --------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, d = self.cfg, self.dist
        timing = {"generate": 0.0, "grade": 0.0, "train": 0.0}
        tool_before = self.tool.seconds if self.tool else 0.0
        kept, sampled, stats = self._sample_groups(timing)
        m = {"step": self.step + 1, **stats}
        m.update(_rollout_metrics(sum(d.gather([_row(s) for s in sampled]), [])))
        t = time.perf_counter()
        if stats["groups_kept"]:
            self._prepare(kept, m)
            self._update(kept, m)
        timing["train"] = time.perf_counter() - t
        self.step += 1
        m.update({f"time/{k}_s": v for k, v in timing.items()})   # rank 0's
        m["time/tools_s"] = (self.tool.seconds - tool_before) if self.tool else 0.0
        gen_tokens = d.sum(sum(len(s.completion.tokens) for s in sampled))
        m["tokens_per_s"] = gen_tokens / max(d.max(timing["generate"]), 1e-9)   # all ranks together
        if self.eval_problems and ((cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps):
            m.update(self.evaluate())
        self._log(m)
        if self.dist.main:
            self._write_samples(sampled, self.step)
        if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps:
            self.save_checkpoint()
        return m

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy, one response per held-out problem; ranks split the problems."""
        lo, hi = distributed.split(len(self.eval_problems), self.dist)
        problems = self.eval_problems[lo:hi]
        groups, _ = self._generate(problems, 1, 0.0, seed=self.cfg.seed)
        samples = [Sample(prompt_ids=[], completion=g[0], gold=p.answer, question=p.question)
                   for p, g in zip(problems, groups)]
        self._grade(samples)
        r = _rollout_metrics(sum(self.dist.gather([_row(s) for s in samples]), []))
        return {"eval/accuracy": r["accuracy"], "eval/code_ratio": r["code_ratio"],
                "eval/response_length": r["response_length"]}

    def train(self):
        """Steps until cfg.steps, with a held-out evaluation first (step 0) when evaluations are due; at the
        end, also when interrupted, the run's scaling figure and statistics (scaling.png, scaling.json)."""
        from tqdm import tqdm
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stdout,
                   disable=not self.dist.main)
        try:
            if self.step == 0 and self.eval_problems and self.cfg.eval_every:
                self._log({"step": 0, **self.evaluate()})
            while self.step < self.cfg.steps:
                m = self.train_step()
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}", code=f"{m['code_ratio']:.2f}",
                                len=f"{m['response_length']:.0f}")
                if self.cfg.print_every and self.dist.main and self.step % self.cfg.print_every == 0:
                    bar.write(self._shown)
        finally:
            bar.close()
            if self.tb is not None:
                self.tb.close()
            if self.dist.main and self.metrics_path.exists():
                from minitir.plot import write_scaling
                png, _ = write_scaling(self.run_dir)
                print(f"scaling figure: {png}")
        return self.run_dir

    def _write_samples(self, samples: list[Sample], step: int):
        """A few rollouts of this step, whole (tool blocks included), to samples.jsonl; one is kept for the
        console."""
        rows = [{"step": step, "question": s.question, "gold": s.gold, "response": s.completion.text,
                 "reward": s.reward, "correct": s.correct, "graded": s.graded, "format_ok": s.format_ok,
                 "tool_calls": s.completion.num_tool_calls, "tool_errors": s.completion.num_tool_errors,
                 "finish_reason": s.completion.finish_reason} for s in samples[:self.cfg.log_samples]]
        if rows:
            with open(self.run_dir / "samples.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            r = rows[0]
            self._shown = (f"--- step {step}: {r['question']}  (gold {r['gold']}; reward {r['reward']:g}, "
                           f"{r['tool_calls']} tool call(s), {r['finish_reason']})\n{r['response']}\n---")

    def _log(self, m: dict):
        if not self.dist.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
        if self.tb is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, m["step"])

    # --------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """run_dir/checkpoints/step-N/{model files, trainer_state.pt}, written by rank 0 under a temporary
        name and renamed, so a crash mid-write leaves the previous checkpoint as the latest complete one.
        Model and optimizer state are full (unsharded), so any number of ranks can resume from them."""
        d = self.dist
        model = distributed.model_state(self.model, d)                 # collectives: every rank takes part
        state = {"step": self.step, "data_epoch": self.data_epoch, "data_pos": self.data_pos,
                 "optimizer": distributed.optimizer_state(self.model, self.opt, d),
                 "scheduler": self.sched.state_dict(),
                 "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                 "carry": d.gather(self.carry)}   # every rank's surplus of filter survivors
        if self.critic is not None:
            state["critic"] = distributed.model_state(self.critic, d)
            state["critic_optimizer"] = distributed.optimizer_state(self.critic, self.critic_opt, d)
        ck = self.run_dir / "checkpoints"
        final = ck / f"step-{self.step:06d}"
        if d.main:
            ck.mkdir(parents=True, exist_ok=True)
            tmp = ck / f".tmp-step-{self.step:06d}"
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(self.model, self.tok, tmp, state_dict=model)
            torch.save(state, tmp / "trainer_state.pt")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(ck.glob("step-*"))[:-max(self.cfg.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
        d.barrier()
        return final

    def _latest_checkpoint(self) -> Path:
        ck = sorted(p for p in (self.run_dir / "checkpoints").glob("step-*") if (p / "trainer_state.pt").exists())
        if not ck:
            raise ConfigError(f"--resume {self.run_dir}: no complete checkpoint under {self.run_dir / 'checkpoints'}")
        return ck[-1]

    def _load_weights(self, path: Path) -> dict:
        """Model (and critic) weights from a checkpoint, into the unsharded models; -> the trainer state."""
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        fresh = load_model(path, dtype=self.model.dtype, device=self.device)
        self.model.load_state_dict(fresh.state_dict())
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
        return state

    def _load_state(self, state: dict):
        """Optimizer, schedule, RNG and data position; after sharding (the optimizer state is resharded)."""
        distributed.load_optimizer_state(self.model, self.opt, state["optimizer"], self.dist)
        self.sched.load_state_dict(state["scheduler"])
        if self.critic is not None:
            distributed.load_optimizer_state(self.critic, self.critic_opt, state["critic_optimizer"], self.dist)
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.step, self.data_epoch, self.data_pos = state["step"], state["data_epoch"], state["data_pos"]
        carried = sum(state.get("carry", []), [])  # on however many ranks now: rank r takes its share
        lo, hi = distributed.split(len(carried), self.dist)
        self.carry = carried[lo:hi]
        # metrics after the checkpoint belong to the abandoned run: drop them so the log stays one history
        mp = self.run_dir / "metrics.jsonl"
        if self.dist.main and mp.exists():
            lines = [l for l in mp.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= self.step]
            mp.write_text("".join(l + "\n" for l in lines))

    def close(self):
        self.grader.close()
        if self.tool is not None and hasattr(self.tool.tool, "close"):
            self.tool.tool.close()
        distributed.shutdown()


def _row(s: Sample) -> dict:
    """What the rollout metrics need about one sample (small: gathered from every rank)."""
    c = s.completion
    return {"reward": s.reward, "correct": s.correct, "graded": s.graded, "format_ok": s.format_ok,
            "calls": c.num_tool_calls, "errors": c.num_tool_errors, "policy_len": sum(c.policy_mask),
            "len": len(c.tokens), "truncated": c.finish_reason == "length"}


def _rollout_metrics(rows: list[dict]) -> dict:
    """The quantities whose growth with training the paper reports. Accuracy is over the responses the
    grader could check; the others are counted in grade_errors."""
    n = max(len(rows), 1)
    graded = [r for r in rows if r["graded"]]
    calls = sum(r["calls"] for r in rows)
    return {
        "reward": sum(r["reward"] for r in graded) / max(len(graded), 1),
        "accuracy": sum(r["correct"] for r in graded) / max(len(graded), 1),
        "grade_errors": len(rows) - len(graded),
        "code_ratio": sum(r["calls"] > 0 for r in rows) / n,
        "tool_calls_per_response": calls / n,
        "tool_error_rate": sum(r["errors"] for r in rows) / max(calls, 1),
        "response_length": sum(r["policy_len"] for r in rows) / n,    # policy tokens only
        "response_length_all": sum(r["len"] for r in rows) / n,
        "truncation_rate": sum(r["truncated"] for r in rows) / n,
        "format_failure_rate": sum(not r["format_ok"] for r in rows) / n,
    }


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
