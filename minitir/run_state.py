"""A run's directory: its configuration, metrics and sample logs, checkpoints, and exact resume.

    runs/NAME/config.json            the full TrainConfig
    runs/NAME/metrics.jsonl          one line per step (and step 0: the held-out evaluation before training)
    runs/NAME/samples.jsonl          a few whole rollouts per step
    runs/NAME/scaling.png, .json     written when the run ends
    runs/NAME/checkpoints/step-N/    a model directory transformers and vLLM load (with --lora-rank: the
                                     adapter as PEFT saves it, on its base), plus trainer_state.pt
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minitir import distributed, lora
from minitir.checkpoint import CheckpointError, load_model, save_pretrained
from minitir.config import ConfigError


def open_run(cfg, dist, resume: str) -> tuple[Path, Path | None]:
    """-> (the run directory, the checkpoint to resume from or None). A new run is named by rank 0 and gets
    config.json; a resumed one must hold a complete checkpoint."""
    if resume:
        return Path(resume), latest_checkpoint(Path(resume))
    run_dir = Path(cfg.run_dir) / dist.broadcast(cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return run_dir, None


def save_heldout(run_dir: Path, problems: list) -> Path:
    """run_dir/heldout.jsonl: the run's held-out problems, for `eval.py --benchmarks heldout` (each seed's own)."""
    path = run_dir / "heldout.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "problem": p.question, "answer": p.answer}) + "\n"
                            for p in problems))
    return path


def latest_checkpoint(run_dir: Path) -> Path:
    ck = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "trainer_state.pt").exists())
    if not ck:
        raise ConfigError(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
    return ck[-1]


class RunLog:
    """metrics.jsonl (and TensorBoard when installed) and samples.jsonl, written by rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool, main: bool):
        self.run_dir, self.main, self.tb = run_dir, main, None
        self.metrics_path, self.samples_path = run_dir / "metrics.jsonl", run_dir / "samples.jsonl"
        if tensorboard and main:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional
                pass

    def metrics(self, m: dict):
        if not self.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
        self._scalars(m)

    def _scalars(self, m: dict):
        if self.tb is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, m["step"])

    def samples(self, samples: list, step: int, n: int) -> str:
        """The first n rollouts of the step, whole (tool blocks included) -> the first one, for the console."""
        rows = [{"step": step, "question": s.question, "gold": s.gold, "response": s.completion.text,
                 "answer": s.answer, "reward": s.reward, "correct": s.correct, "graded": s.graded,
                 "format_ok": s.format_ok, "tool_calls": s.completion.num_tool_calls,
                 "tool_errors": s.completion.num_tool_errors, "tool_failures": s.completion.num_tool_failures,
                 "finish_reason": s.completion.finish_reason}
                for s in samples[:n]]
        if not (rows and self.main):
            return ""
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        r = rows[0]
        return (f"--- step {step}: {r['question']}  (gold {r['gold']}; reward {r['reward']:g}, "
                f"{r['tool_calls']} tool call(s), {r['finish_reason']})\n{r['response']}\n---")

    def truncate(self, step: int):
        """On resume: every log as an uninterrupted run would have written it up to `step`. Rows after the
        checkpoint belong to the abandoned run: they leave metrics.jsonl and samples.jsonl, and TensorBoard's
        events are written anew from the metrics kept (its event files cannot be cut)."""
        if not self.main:
            return
        repair_logs(self.run_dir)
        for path in (self.metrics_path, self.samples_path):
            if path.exists():
                lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
                path.write_text("".join(ln + "\n" for ln in lines))
        if self.tb is not None:
            self.tb.close()
            shutil.rmtree(self.run_dir / "tb", ignore_errors=True)
            self.tb = type(self.tb)(str(self.run_dir / "tb"))
            for ln in self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []:
                self._scalars(json.loads(ln))

    def close(self):
        if self.tb is not None:
            self.tb.close()


class Stopped(Exception):
    """The run stopped at a signal, its work saved: `python train.py --resume RUN_DIR` goes on."""

    def __init__(self, signum: int, step: int, steps: int, checkpoint: Path, run_dir: Path):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} of {steps}; checkpoint "
                         f"{checkpoint}; go on with: python train.py --resume {run_dir}")


class StopSignals:
    """While entered (in the main thread): SIGTERM, SIGINT and SIGUSR2, what a cluster's time limit,
    preemption, SLURM's warning before it or Ctrl-C send, are noted, not acted on, so the step under way
    finishes and the trainer saves before it stops. Repeats are the same request (torchrun and the terminal
    both pass on a Ctrl-C; a SLURM job's wrapper passes on its warning), except a Ctrl-C more than REPEAT_S
    after the first: that one interrupts at once."""
    REPEAT_S = 2.0

    def __init__(self):
        self.signum, self.first, self._old = 0, 0.0, {}

    def _note(self, signum, frame):
        if not self.signum:
            self.signum, self.first = signum, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self.first > self.REPEAT_S:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._note) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def repair_logs(run_dir: Path, cut: bool = True) -> list[dict]:
    """Cut a partial last line (a crash mid-write) from metrics.jsonl and samples.jsonl -> the metrics rows
    (cut=False: only read, past such a line: the run may still be writing it). A line that does not parse
    anywhere else is not a crash's: CheckpointError names it."""
    rows = []
    for path in (run_dir / "metrics.jsonl", run_dir / "samples.jsonl"):
        if not path.exists():
            continue
        data = path.read_bytes()
        lines, parsed = data.decode(errors="replace").splitlines(), []
        for n, line in enumerate(lines, 1):
            try:
                parsed.append(json.loads(line))
            except ValueError:
                if n < len(lines):
                    raise CheckpointError(f"{path}:{n}: not a JSON line (only a last line can be cut short)") from None
                if cut:   # in place, so a crash now loses nothing more
                    os.truncate(path, data.rfind(b"\n") + 1)
        rows = parsed if path.name == "metrics.jsonl" else rows
    return rows


def save_checkpoint(run_dir: Path, learner, dist, trainer_state: dict, keep: int) -> Path:
    """run_dir/checkpoints/step-N/{model files, trainer_state.pt}: the learner's weights, optimizer and schedule,
    the random streams and `trainer_state` (its "step", and what the trainer needs to go on), written by rank 0
    under a temporary name and renamed, so a crash mid-write leaves the previous checkpoint as the latest
    complete one. Model and optimizer state are full (unsharded), so any number of ranks can resume from them.
    Every rank calls it (the full state is gathered)."""
    L, step, lora_rank = learner, trainer_state["step"], learner.cfg.lora_rank
    if lora_rank:   # the adapter alone, PEFT's format, naming its base
        adapter = lora.adapter_state(L.model, distributed.full_tensor)
        config = lora.adapter_config(L.base_path, lora_rank, L.cfg.lora_alpha, L.cfg.lora_targets.split(","))
    else:
        model = distributed.model_state(L.model, dist)
    state = {**trainer_state, "optimizer": distributed.optimizer_state(L.model, L.opt, dist),
             "scheduler": L.sched.state_dict(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if L.critic is not None:   # with LoRA its adapters and value head (its frozen base is the policy's base)
        critic = distributed.model_state(L.critic, dist)
        trained = {n for n, p in L.critic.named_parameters() if p.requires_grad}
        state["critic"] = {k: v for k, v in critic.items() if k in trained} if lora_rank else critic
        state["critic_optimizer"] = distributed.optimizer_state(L.critic, L.critic_opt, dist)
    ck = run_dir / "checkpoints"
    final = ck / f"step-{step:06d}"
    if dist.main:
        ck.mkdir(parents=True, exist_ok=True)
        tmp = ck / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        if lora_rank:
            lora.save_adapter(tmp, adapter, config)
            if L.tok is not None:
                L.tok.save_pretrained(str(tmp))
        else:
            save_pretrained(L.model, L.tok, tmp, state_dict=model)
        torch.save(state, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(ck.glob("step-*"))[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_weights(learner, path: Path, device) -> dict:
    """Model (and critic) weights from a checkpoint into the learner's unsharded models -> the saved state."""
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    cfg = learner.cfg
    if cfg.lora_rank:   # the base came from its model; the adapter from here, if it is this run's kind
        try:
            config, adapter = lora.read_adapter(path)
            if (config["r"], config["lora_alpha"], sorted(lora.targets_of(config))) != \
                    (cfg.lora_rank, cfg.lora_alpha, sorted(cfg.lora_targets.split(","))):
                raise ValueError(f"its adapter has rank {config['r']}, alpha {config['lora_alpha']}, targets "
                                 f"{','.join(lora.targets_of(config))}")
            lora.load_adapter_state(learner.model, adapter)
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"--resume {path}: {e}; resume with the run's own --lora-rank, --lora-alpha and "
                              f"--lora-targets") from None
    else:
        learner.model.load_state_dict(load_model(path, dtype=learner.model.dtype, device=device).state_dict())
    if learner.critic is not None:
        learner.critic.load_state_dict(state["critic"], strict=not learner.cfg.lora_rank)
    return state


def load_state(learner, dist, state: dict):
    """Optimizer, schedule and random streams; after sharding (the optimizer state is resharded)."""
    distributed.load_optimizer_state(learner.model, learner.opt, state["optimizer"], dist)
    learner.sched.load_state_dict(state["scheduler"])
    if learner.critic is not None:
        distributed.load_optimizer_state(learner.critic, learner.critic_opt, state["critic_optimizer"], dist)
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
