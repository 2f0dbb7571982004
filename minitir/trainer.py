"""The RL loop. One step, in call order (`Trainer.train_step`):

    collect   rollouts of n responses per problem (generator + sandbox), graded; group baselines; the paper's
              filters; refilled up to one batch (rollout.py, filters.py, reward.py)
    prepare   behaviour and reference log-probs, old values, then per-token advantages (rl.py)
    update    ppo_epochs x mini_batches optimizer steps; each mini-batch packed into micro-batches whose
              objective (rl.token_objective) is differentiated inside the chunked head (logprobs.py)
    log       metrics, rollouts, checkpoints (run_state.py)

Data parallelism (torchrun) changes nothing here but a few reductions: each rank holds whole groups, token
weights are normalised over the global mini-batch, and distributed.py keeps the collectives in step.
"""
from __future__ import annotations

import os
import random
import sys
import time

import torch
from tqdm import tqdm

from minitir import distributed, rl, roc, run_state
from minitir.config import ConfigError, TrainConfig, validate
from minitir.filters import drop_reason, mask_reason
from minitir.generate import Engine
from minitir.learner import Learner
from minitir.reward import Grader, RewardConfig
from minitir.rollout import (TimedTool, generate_groups, generation_config, grade, make_tool,
                             rollout_metrics, sample_row, within_prompt_budget)
from minitir.sample import Sample
from minitir.tasks import Problem, ProblemStream, get_template, training_problems


class Trainer:
    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, problems: list[Problem] | None = None,
                 eval_problems: list[Problem] | None = None, tool=None, reward_fn=None, resume: str = ""):
        self.cfg = cfg
        if cfg.batch_invariant:   # CUDA: cuBLAS's deterministic workspaces (read when cuBLAS starts: before the model)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.dist, self.device = distributed.init(cfg.device)   # under torchrun: this process's rank and device
        if cfg.batch_invariant and self.device.type == "cuda":   # and deterministic kernels where torch has them
            torch.use_deterministic_algorithms(True, warn_only=True)
        validate(cfg)
        torch.manual_seed(cfg.seed)
        self.template, self.step, self.carry, self.shown = get_template(cfg.prompt), 0, [], ""
        say = print if self.dist.main else (lambda *a, **k: None)
        if problems is None:   # data first: a bad file fails in seconds, not after loading a model
            problems, held_out = training_problems(cfg, say)
            eval_problems = held_out if eval_problems is None else eval_problems
        # the sandbox before the model too: where nothing isolates model-written code, the run stops here
        if tool is None and self.template.tools and cfg.max_tool_calls > 0:
            self.tool = make_tool(cfg.sandbox_url, cfg.sandbox_timeout_s, cfg.sandbox_memory_mb,
                                  cfg.sandbox_workers, cfg.sandbox_allow_unisolated)
            say(f"sandbox: {getattr(self.tool.tool, 'report', 'remote ' + cfg.sandbox_url)}")
        else:
            self.tool = TimedTool(tool) if tool is not None else None
        self.run_dir, ckpt = run_state.open_run(cfg, self.dist, resume)
        self.log = run_state.RunLog(self.run_dir, cfg.tensorboard, self.dist.main)
        self.learner = Learner(cfg, self.dist, self.device, model, tokenizer)
        self.tok = self.learner.tok   # the prompt budget needs the model's tokenizer
        problems, self.prompts_too_long = within_prompt_budget(problems, self.tok, self.template,
                                                               cfg.max_prompt_tokens, say)
        self.data, self.eval_problems = ProblemStream(problems, cfg.seed), eval_problems or []
        if self.dist.main and self.eval_problems:
            run_state.save_heldout(self.run_dir, self.eval_problems)
        state = run_state.load_weights(self.learner, ckpt, self.device) if ckpt else None
        self.learner.shard()
        self.learner.build_optimizers()
        if state is not None:
            self._restore(state)
        self.grader, self.reward_fn, self.engine = Grader(workers=2), reward_fn, None
        self.reward_cfg = RewardConfig(kind=cfg.reward, format_penalty=cfg.format_penalty,
                                       truncation_penalty=cfg.truncation_penalty)

    # --- one step -------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """rollouts -> rewards -> advantages -> update -> metrics, one optimizer step per mini-batch."""
        cfg, d = self.cfg, self.dist
        clock = {"generate": 0.0, "grade": 0.0, "train": 0.0, "score": 0.0}   # score: the part of train before update
        tools_before = self.tool.seconds if self.tool else 0.0
        grade_timeouts = self.grader.timeouts
        batch, sampled, stats = self.collect(clock)                   # graded, baselined, filtered, carried in
        m = {"step": self.step + 1, **stats, **rollout_metrics(sum(d.gather([sample_row(s) for s in sampled]), []))}
        if self.step == 0:   # once per run: training problems skipped for their prompt's length
            m["prompts_too_long"] = self.prompts_too_long
        if self.engine is not None:
            self.engine.release()                                     # the update needs the cache's memory
        t = time.perf_counter()
        if stats["batch_size"]:
            self.prepare(batch)                                       # behaviour/ref log-probs, values, advantages
            clock["score"] = time.perf_counter() - t
            m.update(self.learner.update(batch, self.step))           # the objective and optimizer steps
        clock["train"] = time.perf_counter() - t
        self.step += 1
        m.update({f"time/{k}_s": v for k, v in clock.items()})       # rank 0's
        m["time/tools_s"] = (self.tool.seconds - tools_before) if self.tool else 0.0
        m["tokens_per_s"] = d.sum(sum(len(s.completion.tokens) for s in sampled)) / max(d.max(clock["generate"]), 1e-9)
        m["grade_timeouts"] = int(d.sum(self.grader.timeouts - grade_timeouts))   # math-verify's wall-clock limit
        if self.eval_problems and ((cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps):
            m.update(self.evaluate())
        self.log.metrics(m)
        self.shown = self.log.samples(sampled, self.step, cfg.log_samples) or self.shown
        if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps:
            self.save_checkpoint()
        return m

    # --- collection -----------------------------------------------------------------------------
    def _rollouts(self, problems: list[Problem], per_problem: int, temperature: float, seed: int, first: int = 0,
                  progress=None) -> list[Sample]:
        """per_problem responses to each problem (n_samples; K x n_samples for GRPO-RoC; 1 to evaluate), not
        graded yet, each with the whole max_new_tokens. first: the index of problems[0] in the global batch.
        One engine serves every call: its KV cache and CUDA graphs are kept across refill rounds and
        evaluations, and released before the update (train_step)."""
        cfg = self.cfg
        gen = generation_config(self.template, max_tool_calls=cfg.max_tool_calls, max_new_tokens=cfg.max_new_tokens,
                                temperature=temperature, top_p=cfg.top_p, seed=seed, seed_offset=first * per_problem,
                                max_tool_output_tokens=cfg.max_tool_output_tokens,
                                tool_output_overflow=cfg.tool_output_overflow, max_batch=cfg.max_batch)
        model = self.learner.decoder()   # refreshed in place after each update: the engine's graphs stay valid
        if self.engine is None or self.engine.model is not model:
            self.engine = Engine(model, self.tok, self.tool)
        return generate_groups(self.engine, self.template, problems, per_problem, gen, self.learner.autocast_on,
                               progress)

    def collect(self, clock: dict) -> tuple[list[Sample], list[Sample], dict]:
        """-> (this rank's samples for the update, every sample it generated, global statistics). The samples
        carried over from the last step come first; then rounds of whole groups, each rank its contiguous
        share of a round's problems, graded and baselined per group before anything is filtered (as the paper
        does); with roc_oversample K, K x n responses per problem, down-sampled to n before that (GRPO-RoC);
        groups outside the accuracy range (filter_groups) and responses the paper's filters drop leave
        the batch, and rounds refill it up to prompts_per_step x n_samples responses (all ranks together).
        With carry_over the surplus waits for the next step, holding the log-probs of the weights that made it."""
        cfg, d, n = self.cfg, self.dist, self.cfg.n_samples
        target, buffer = cfg.prompts_per_step * n, list(self.carry)
        stats = {"groups_sampled": 0, "groups_kept": 0, "carried_in": int(d.sum(len(buffer))), "dropped_overlong": 0,
                 "dropped_repetitive": 0, "masked_truncated": 0, "masked_void": 0}
        refills = cfg.filter_groups or cfg.filter_overlong or cfg.filter_repetition > 0
        sampled = []
        for rnd in range(cfg.max_refill_rounds if refills else 1):
            have = int(d.sum(len(buffer)))
            if have >= target:
                break
            want = -(-(target - have) // n)
            lo, hi = distributed.split(want, d)
            t = time.perf_counter()
            seed, k = cfg.seed * 1_000_003 + self.step * 101 + rnd, n * cfg.roc_oversample
            batch = self._rollouts(self.data.next(want)[lo:hi], k, cfg.temperature, seed=seed, first=lo)
            clock["generate"] += time.perf_counter() - t
            t = time.perf_counter()
            self.reward(batch)
            clock["grade"] += time.perf_counter() - t
            sampled += batch
            stats["groups_sampled"] += want
            for i in range(0, len(batch), k):
                group = batch[i:i + k] if k == n else resample_on_correct(batch[i:i + k], n, seed, lo + i // k)
                buffer += keep_group(group, cfg, stats)
        for k in ("groups_kept", "dropped_overlong", "dropped_repetitive", "masked_truncated", "masked_void"):
            stats[k] = int(d.sum(stats[k]))
        kept, self.carry = self._one_batch(buffer, target) if cfg.carry_over else (buffer, [])
        self.learner.behaviour_logprobs(self.carry)     # the weights that made them, before this step's update
        for s in self.carry:
            s.carried = True
        size = int(d.sum(len(kept)))
        stats.update(carried_out=int(d.sum(len(self.carry))), batch_size=size, batch_short=max(target - size, 0),
                     carried_share=d.sum(sum(s.carried for s in kept)) / max(size, 1))
        return kept, sampled, stats

    def reward(self, batch: list[Sample]):
        """The one reward path (rollout.grade: reward.judge, then reward.outcome_reward); a custom reward_fn
        replaces the reward it computed."""
        grade(batch, self.grader, self.reward_cfg, self.tok)
        if self.reward_fn is not None:
            for s in batch:
                c = s.completion
                s.reward = float(self.reward_fn(c.text, s.gold, {"correct": s.correct, "finish_reason": c.finish_reason,
                                                                 "num_tool_calls": c.num_tool_calls}))

    def _one_batch(self, buffer: list[Sample], target: int) -> tuple[list[Sample], list[Sample]]:
        """carry_over: -> (exactly one batch over all ranks, the rest), the last ranks' tails carried first."""
        counts = self.dist.gather(len(buffer))
        surplus, later = max(sum(counts) - target, 0), sum(counts[self.dist.rank + 1:])
        mine = min(max(surplus - later, 0), len(buffer))
        return buffer[:len(buffer) - mine], buffer[len(buffer) - mine:]

    # --- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, samples: list[Sample]):
        """Before any update: behaviour log-probs where the update's own cannot stand in (several updates per
        step, or KL in the reward; carried samples hold theirs already), reference log-probs and old values;
        then per-token advantages, with KL in the reward per token (rl.kl_reward_to_go, or GAE's rewards)."""
        cfg = self.cfg
        if cfg.ppo_epochs * cfg.mini_batches > 1 or (cfg.kl_coef > 0 and cfg.kl_in_reward):
            self.learner.behaviour_logprobs(samples)
        self.learner.score(samples)
        kl = [torch.zeros(sum(s.loss_mask)) for s in samples]                              # [L] per sample
        if cfg.kl_coef > 0 and cfg.kl_in_reward:
            kl = [cfg.kl_coef * rl.kl_estimate(torch.tensor(s.old_logp), torch.tensor(s.ref_logp), cfg.kl_estimator)
                  for s in samples]
        if cfg.algo == "ppo":
            gae_advantages(samples, kl, cfg, self.dist.all_reduce)
        else:
            outcome_advantages(samples, kl, cfg.algo, self.dist.all_reduce)

    # --- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy, one response per held-out problem; ranks split the problems."""
        lo, hi = distributed.split(len(self.eval_problems), self.dist)
        with tqdm(total=hi - lo, desc=f"eval, step {self.step}", leave=False, dynamic_ncols=True, file=sys.stdout,
                  disable=not self.dist.main) as bar:
            samples = self._rollouts(self.eval_problems[lo:hi], 1, 0.0, seed=self.cfg.seed, progress=bar.update)
        grade(samples, self.grader, self.reward_cfg, self.tok)
        r = rollout_metrics(sum(self.dist.gather([sample_row(s) for s in samples]), []))
        return {"eval/accuracy": r["accuracy"], "eval/code_ratio": r["code_ratio"],
                "eval/response_length": r["response_length"], "eval/format_failure_rate": r["format_failure_rate"]}

    def train(self):
        """Steps until cfg.steps, with a held-out evaluation first (step 0) when evaluations are due; at the
        end, also when interrupted, the run's scaling figure and statistics (scaling.png, scaling.json).
        SIGTERM or SIGINT: the step under way finishes, a checkpoint is saved and run_state.Stopped raised
        (under torchrun every rank stops after the same step)."""
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stdout,
                   disable=not self.dist.main)
        try:
            with run_state.StopSignals() as stop:
                if self.step == 0 and self.eval_problems and self.cfg.eval_every:
                    self.log.metrics({"step": 0, **self.evaluate()})
                while self.step < self.cfg.steps:
                    self._one_step(bar)
                    if self.dist.max(stop.signum) and self.step < self.cfg.steps:
                        raise run_state.Stopped(int(self.dist.max(stop.signum)), self.step, self.cfg.steps,
                                                self._saved(), self.run_dir)
        finally:
            bar.close()
            self.log.close()
            if self.dist.main and self.log.metrics_path.exists():
                from minitir.plot import write_scaling
                print(f"scaling figure: {write_scaling(self.run_dir)[0]}")
        return self.run_dir

    def _saved(self):
        """This step's checkpoint, written now unless it was due anyway (every rank agrees: saving is collective)."""
        done = self.run_dir / "checkpoints" / f"step-{self.step:06d}"
        return self.save_checkpoint() if self.dist.max(int(not (done / "trainer_state.pt").exists())) else done

    def _one_step(self, bar):
        m = self.train_step()
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}", code=f"{m['code_ratio']:.2f}",
                        len=f"{m['response_length']:.0f}")
        if self.cfg.print_every and self.dist.main and self.step % self.cfg.print_every == 0:
            bar.write(self.shown)

    def save_checkpoint(self):
        """The weights, the optimizer and the trainer's place: step, data order and every rank's carried samples
        (with their behaviour log-probs)."""
        state = {"step": self.step, "data_epoch": self.data.epoch, "data_pos": self.data.pos,
                 "carry": self.dist.gather(self.carry)}
        return run_state.save_checkpoint(self.run_dir, self.learner, self.dist, state, self.cfg.keep_checkpoints)

    def _restore(self, state: dict):
        """After sharding: the optimizer, schedule and random streams, then the trainer's place; the carried
        samples are shared out over however many ranks run now; logs written after the checkpoint are cut."""
        run_state.load_state(self.learner, self.dist, state)
        self.step, self.data.epoch, self.data.pos = state["step"], state["data_epoch"], state["data_pos"]
        carried = sum(state["carry"], [])
        if any("outcome_adv" not in vars(s) or (any(s.loss_mask) and not s.old_logp) for s in carried):
            raise ConfigError("--resume: the checkpoint's carried samples were saved by an older minitir, without "
                              "their behaviour log-probs; resume from a checkpoint written by this version")
        lo, hi = distributed.split(len(carried), self.dist)
        self.carry = carried[lo:hi]
        self.log.truncate(self.step)

    def close(self):
        if self.cfg.batch_invariant and self.device.type == "cuda":
            torch.use_deterministic_algorithms(False)
        if self.engine is not None:
            self.engine.release()
        self.grader.close()
        if self.tool is not None:
            self.tool.close()   # not the process group: the process leaves it (train.py), a next Trainer reuses it


# --- a group's and a batch's advantages, pure functions of the samples -----------------------------
def keep_group(group: list[Sample], cfg: TrainConfig, stats: dict) -> list[Sample]:
    """A group's responses that stay in the batch: none when dynamic sampling drops the group; else its
    outcome advantages are computed over the whole group, the paper's filters drop single responses
    (counted by reason), and each kept response gets its loss mask: its policy tokens, or none when
    mask_truncated / mask_void_turns mask it (counted too)."""
    graded = [s for s in group if s.graded]
    acc = sum(s.correct for s in graded) / max(len(graded), 1)
    if not graded or (cfg.filter_groups and not cfg.filter_min_acc <= acc <= cfg.filter_max_acc):
        return []
    stats["groups_kept"] += 1
    if cfg.algo != "ppo":   # PPO's advantages come from GAE
        r = torch.tensor([[s.reward for s in group]], dtype=torch.float32)               # [1, n]
        adv = rl.group_advantages(r, cfg.algo, torch.tensor([[s.graded for s in group]]))[0]
        for s, a in zip(group, adv.tolist()):
            s.outcome_adv = a
    kept = []
    for s in group:
        c = s.completion
        why = drop_reason(c.finish_reason, c.text, s.correct, cfg.filter_overlong, cfg.filter_repetition)
        if why:
            stats[f"dropped_{why}"] += 1
        if why or not s.graded:   # ungraded ones are counted in the rollout metrics
            continue
        masked = mask_reason(c.finish_reason, c.policy_text, c.num_tool_calls, s.answer is not None,
                             cfg.mask_truncated, cfg.mask_void_turns)
        if masked:
            stats[f"masked_{masked}"] += 1
        s.loss_mask = [0] * len(c.tokens) if masked else list(c.policy_mask)
        kept.append(s)
    return kept


def resample_on_correct(group: list[Sample], n: int, seed: int, index: int) -> list[Sample]:
    """GRPO-RoC: n of the group's graded responses (roc.downsample), in their order; index: the group's place
    in the step's round over all ranks, so the draw does not depend on how many ranks share it."""
    graded = [s for s in group if s.graded]
    pen = [roc.penalty(s.completion.num_tool_calls, s.completion.num_tool_errors, s.format_ok) for s in graded]
    keep = roc.downsample([s.correct for s in graded], pen, n,
                          random.Random(seed * 1_000_033 + index))
    return [graded[i] for i in keep]


def gae_advantages(samples: list[Sample], kl: list[torch.Tensor], cfg: TrainConfig, all_reduce):
    """PPO: per-token rewards -kl_t and the outcome reward at each response's last policy token, GAE over
    its policy tokens, advantages whitened over the global batch."""
    T = max([len(s.old_values) for s in samples] + [1])
    R, V, M = (torch.zeros(len(samples), T) for _ in range(3))                    # [B, T] each
    for k, s in enumerate(samples):
        L = len(s.old_values)
        if L:
            V[k, :L], M[k, :L], R[k, :L] = torch.tensor(s.old_values), 1, -kl[k]
            R[k, L - 1] += s.reward
    adv, ret = rl.gae(R, V, M, cfg.gamma, cfg.lam)
    adv = rl.whiten(adv.flatten(), M.flatten(), all_reduce=all_reduce).view_as(adv)
    for k, s in enumerate(samples):
        L = len(s.old_values)
        s.adv, s.returns = adv[k, :L].tolist(), ret[k, :L].tolist()


def outcome_advantages(samples: list[Sample], kl: list[torch.Tensor], algo: str, all_reduce):
    """A group estimator's outcome advantage on every policy token, less the KL to come (kl_reward_to_go);
    reinforce_pp whitens them over the global batch's tokens."""
    tok = [s.outcome_adv - rl.kl_reward_to_go(k) for s, k in zip(samples, kl)]       # [L] per sample
    if algo == "reinforce_pp":
        flat = torch.cat([torch.zeros(0)] + tok)
        flat = rl.whiten(flat, torch.ones_like(flat), all_reduce=all_reduce)
        tok = list(flat.split([len(t) for t in tok]))
    for s, a in zip(samples, tok):
        s.adv = a.tolist()
