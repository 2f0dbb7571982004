"""Train a model with agent RL (ZeroTIR): `python train.py` shows tool use emerging, on a laptop, in minutes.

    python train.py                                   # configs/miniature.json: a small base model learns to use code
    python train.py --model smollm2-135m              # configs/smollm2-cpu.json: the embedded real model on CPU
    python train.py --model Qwen2.5-1.5B              # configs/qwen2.5-1.5b-grpo.json (GPU)
    python train.py --config qwen2.5-1.5b-ppo --lr 5e-7
    python train.py --resume runs/NAME                # continue where a run stopped
    python train.py --config zerotir-7b-lora          # the paper's run with LoRA adapters, on one 80 GB GPU
    torchrun --nproc_per_node 8 train.py --model Qwen2.5-7B   # data parallel, FSDP2-sharded (any N)

Every field of minitir.config.TrainConfig is a flag (`python train.py --help` lists them); a preset from
configs/ sets the defaults those flags override.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minitir import cli, distributed, run_state
from minitir.checkpoint import CheckpointError
from minitir.cli import UsageError
from minitir.tasks import DatasetError
from minitir.config import ConfigError, TrainConfig, config_fields
from minitir.sandbox import SandboxUnavailable
from minitir.trainer import Trainer

CONFIGS = Path(__file__).resolve().parent / "configs"


def preset(name: str) -> dict:
    path = Path(name) if name.endswith(".json") else CONFIGS / f"{name}.json"
    if not path.exists():
        names = sorted(p.stem for p in CONFIGS.glob("*.json"))
        raise UsageError(f"--config {name}: no such preset (have {names}, or pass a .json path)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    unknown = [k for k in d if not k.startswith("_") and k not in config_fields()]
    if unknown:
        raise UsageError(f"{path}: unknown fields {unknown}")
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    if "adam_betas" in d:
        d["adam_betas"] = tuple(d["adam_betas"])
    return d


def preset_for_model(model: str) -> str:
    m = model.lower()
    if "7b" in m:
        return "qwen2.5-7b-grpo"
    if "1.5b" in m:
        return "qwen2.5-1.5b-grpo"
    if "smollm2" in m:
        return "smollm2-cpu"
    return "miniature"


def parse(argv: list[str]) -> tuple[TrainConfig, str]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--resume")
    pre.add_argument("--model")
    known, rest = pre.parse_known_args(argv)
    if known.resume:
        cfg_file = Path(known.resume) / "config.json"
        if not cfg_file.exists():
            raise UsageError(f"--resume {known.resume}: {cfg_file} not found (is this a run directory?)")
        base = json.loads(cfg_file.read_text())
        base["adam_betas"] = tuple(base.get("adam_betas", TrainConfig.adam_betas))
    else:
        base = preset(known.config or preset_for_model(known.model or "miniature"))
    if known.model:
        rest = ["--model", known.model] + rest
    cfg = cli.parse(TrainConfig, rest, default=TrainConfig(**base),
                    description="minitir: agent RL with tool-integrated reasoning. Flags override the preset "
                                "chosen with --config (or from --model); --resume RUN_DIR continues a run.")
    return cfg, known.resume or ""


def train(argv: list[str]):
    cfg, resume = parse(argv)
    trainer = Trainer(cfg, resume=resume)
    main_rank = trainer.dist.main
    if main_rank:
        ranks = f", {trainer.dist.world} ranks" if trainer.dist.enabled else ""
        print(f"run: {trainer.run_dir}  ({cfg.model}, {cfg.algo}, {cfg.steps} steps, "
              f"{cfg.prompts_per_step} prompts x {cfg.n_samples} responses per step{ranks})")
    try:
        run_dir, stopped = trainer.train(), None
    except run_state.Stopped as e:   # its work saved
        stopped = e
    finally:
        trainer.close()
        distributed.shutdown()   # a second rendezvous on torchrun's store would hang: one group per process
    if stopped is not None:   # one line, and the signal's exit status
        if main_rank:
            print(f"train.py: {stopped}", file=sys.stderr)
        raise SystemExit(128 + stopped.signum)
    if not main_rank:
        return
    last = sorted((run_dir / "checkpoints").glob("step-*"))
    print(f"done. metrics: {run_dir / 'metrics.jsonl'}")
    if last and cfg.lora_rank:
        print(f"checkpoint (a LoRA adapter on its base: PEFT and eval.py load it; `python -m minitir.checkpoint merge "
              f"{last[-1]} OUT` writes the merged model): {last[-1]}")
    elif last:
        print(f"checkpoint (loads with transformers' from_pretrained and eval.py): {last[-1]}")


def main(argv=None):
    """From Python, main([...]) raises input errors; as a command they print one line and exit with 2."""
    if argv is not None:
        return train(argv)
    return cli.run(train, "train.py", (ConfigError, DatasetError, CheckpointError, SandboxUnavailable), sys.argv[1:])


if __name__ == "__main__":
    main()
