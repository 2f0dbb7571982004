"""Quick ablations: variants x seeds of train.py, each run a separate process, then intervals over seeds.

    python ablate.py --vary prompt=zero_tir,zero_rl --seeds 5 --out runs/ablate-tools
    python ablate.py --vary algo=grpo,rloo --vary lr=3e-4,1e-3 --seeds 3 --out runs/grid --steps 30   # 4 variants
    python ablate.py --config smollm2-cpu --vary roc_oversample=1,2 --seeds 3 --out runs/roc

--vary FIELD=V1,V2,... takes any TrainConfig field (booleans: true,false) and may repeat (a grid; the first
value of each is the baseline every variant is compared with); any other flag goes to every run as train.py
reads it. Runs go to OUT/runs/VARIANT-seedS (logs in OUT/logs), as many at once as there are cores (one
thread each) or GPUs (one each). A finished run is never run again: re-running the same command continues
an interrupted ablation (a run with a checkpoint resumes from it; one without, or one made with other flags,
starts over). Values are separated by commas, so a value cannot hold one (lora_targets, adam_betas: set them
for every run instead). SIGTERM stops the runs as Ctrl-C does. At the end:
OUT/ablation.json (final held-out metrics with 95% bootstrap intervals over seeds, their means over the run,
differences to the first variant paired by seed, steps to 0.5), OUT/ablation.png (the curves, mean and band)
and a Markdown table.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from minitir import ablation, cli
from minitir.cli import UsageError
from minitir.config import ConfigError, TrainConfig, config_fields, validate
from minitir.plot import read_metrics

import train

ROOT = Path(__file__).resolve().parent
RESERVED = ("seed", "run_dir", "run_name", "resume")   # ablate.py sets these for each run
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class AblateConfig:
    out: str                            # the ablation's directory: runs/, logs/, ablation.json, ablation.png
    config: str = ""                    # the train.py preset every run starts from ("": as train.py picks it
                                        # from --model, miniature without one)
    vary: tuple[str, ...] = ()          # FIELD=V1,V2,...; repeat --vary for a grid of every combination
    seeds: int = 5                      # runs per variant, seeds seed_base .. seed_base + seeds - 1
    seed_base: int = 0                  # the first seed
    jobs: int = 0                       # runs at once (0: one per CPU core, one thread each, or one per GPU)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """-> (ablate.py's own flags, with every --vary value gathered under one --vary; the flags for train.py)."""
    own_flags = {"--" + f.name.replace("_", "-") for f in fields(AblateConfig)}
    own, vary, rest, i = [], [], [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0].replace("_", "-")
        if flag in own_flags | {"-h", "--help"}:
            value = argv[i].split("=", 1)[1:] or argv[i + 1:i + 2]
            step = 1 if "=" in argv[i] or flag in ("-h", "--help") else 2
            if flag == "--vary":
                vary += value
            else:
                own += [flag] + (value if flag not in ("-h", "--help") else [])
            i += step
        else:
            rest.append(argv[i])
            i += 1
    return own + (["--vary", *vary] if vary else []), rest


def train_flags(field: str, value: str) -> list[str]:
    """One TrainConfig value as train.py's flags."""
    flag = "--" + field.replace("_", "-")
    if isinstance(getattr(TrainConfig, field), bool):
        if value.lower() not in ("true", "false"):
            raise UsageError(f"--vary {field}: a boolean takes true or false, not {value!r}")
        return [flag if value.lower() == "true" else "--no-" + field.replace("_", "-")]
    return [flag, value]


def variants(vary: tuple[str, ...]) -> list[dict]:
    """The grid: [{"name", "overrides": {field: value}}], the first values first."""
    axes = []
    for spec in vary:
        field, _, values = spec.partition("=")
        field = field.strip().lstrip("-").replace("-", "_")
        if field not in config_fields() or field in RESERVED:
            raise UsageError(f"--vary {spec}: {field!r} is not a TrainConfig field ablate.py can vary "
                             f"(see python train.py --help; {', '.join(RESERVED)} are set per run)")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if len(vals) < 1 or len(set(vals)) < len(vals):
            raise UsageError(f"--vary {spec}: give distinct values, e.g. {field}=A,B")
        axes.append([(field, v) for v in vals])
    grid = [dict(c) for c in itertools.product(*axes)] if axes else [{}]
    return [{"name": ",".join(f"{k}={v}" for k, v in o.items()) or "base", "overrides": o} for o in grid]


def flag_field(arg: str) -> str | None:
    """The TrainConfig field a command-line token sets (--max-tool-calls, --no-carry-over), else None."""
    if not arg.startswith("--"):
        return None
    name = arg[2:].split("=")[0].replace("-", "_")
    return name[3:] if name.startswith("no_") and name[3:] in config_fields() else name


def parse(argv: list[str]):
    """-> (AblateConfig, the variants with their train.py flags and configuration, the flags common to all
    runs). Every variant's flags are parsed and validated here as train.py will, so a mistake stops before any
    run."""
    import torch
    own, rest = split_argv(argv)
    cfg = cli.parse(AblateConfig, own, description="Variants x seeds of train.py with bootstrap intervals; flags "
                    "other than these go to every run (python train.py --help lists them).")
    set_here = [flag_field(a) for a in rest]
    bad = [a for a, f in zip(rest, set_here) if f in RESERVED]
    if bad:
        raise UsageError(f"{bad[0]}: ablate.py sets {', '.join(RESERVED)} for each run (use --seeds/--seed-base)")
    if cfg.seeds < 1:
        raise UsageError(f"--seeds {cfg.seeds}: must be >= 1")
    out = variants(cfg.vary)
    both = set(out[0]["overrides"]) & set(set_here)
    if both:
        raise UsageError(f"--{sorted(both)[0].replace('_', '-')} is varied and also given to every run: give it once")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for v in out:
        v["flags"] = sum((train_flags(k, x) for k, x in v["overrides"].items()), [])
        v["argv"] = (["--config", cfg.config] if cfg.config else []) + ["--print-every", "0"] + v["flags"] + rest
        tc, _ = train.parse(v["argv"])
        validate(tc, device)
        if tc.eval_size == 0:
            raise UsageError("--eval-size 0: an ablation compares held-out evaluations; keep eval_size > 0")
        v["config"], v["steps"] = tc, tc.steps
    return cfg, out, rest


def run_config(v: dict, seed: int, run_dir: Path) -> tuple[list[str], dict]:
    """-> (train.py's flags for one run, the configuration it will write to its config.json)."""
    where = {"seed": seed, "run_dir": str(run_dir.parent), "run_name": run_dir.name}
    flags = v["argv"] + sum((["--" + k.replace("_", "-"), str(x)] for k, x in where.items()), [])
    return flags, json.loads(json.dumps(asdict(replace(v["config"], **where))))


def state(run_dir: Path, want: dict) -> str:
    """"done" (the run logged its last step with the held-out evaluation that ends every run), "resume" (an
    earlier step's complete checkpoint), else "new"; a run made with another configuration is "new" too."""
    try:
        if not same_config(json.loads((run_dir / "config.json").read_text()), want):
            return "new"
        last = read_metrics(run_dir)[-1]
    except (OSError, ValueError):
        return "new"
    if last["step"] == want["steps"] and "eval/accuracy" in last:
        return "done"
    steps = [int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/trainer_state.pt")]
    return "resume" if steps and max(steps) < want["steps"] else "new"


def same_config(a: dict, b: dict) -> bool:
    """Equal but for where the run lives (an ablation directory can be moved, or hold a copy of a run made
    elsewhere with the same configuration)."""
    where = ("run_dir", "run_name")
    return {k: v for k, v in a.items() if k not in where} == {k: v for k, v in b.items() if k not in where}


def slots(jobs: int) -> tuple[int, list[dict]]:
    """-> (runs at once, the environment of each slot): one of the visible GPUs each, or one CPU thread each
    (so a run's numbers do not depend on how many run beside it)."""
    import torch
    gpus = torch.cuda.device_count()
    if gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")[:gpus]
        n = jobs or gpus
        return n, [{"CUDA_VISIBLE_DEVICES": visible[i % gpus]} for i in range(n)]
    n = jobs or len(os.sched_getaffinity(0))
    return n, [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} for _ in range(n)]


def child_env(slot_env: dict) -> dict:
    """A run's environment: this one's, without torchrun's variables (each run is a process group of one)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC")}
    return {**env, **slot_env}


def stop(running: dict):
    """Interrupted: each run gets Ctrl-C (it closes its sandbox and writes its figure), then is killed after
    30 s. The next invocation resumes or restarts them."""
    for proc, *_ in running.values():
        proc.send_signal(signal.SIGINT)
    for proc, log, *_ in running.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def run_all(cfg: AblateConfig, todo: list[tuple[Path, list[str], dict]]) -> list[str]:
    """Runs every (run_dir, train.py command, its configuration) in todo, `jobs` at a time; -> the failures,
    one line each."""
    n, envs = slots(cfg.jobs)
    logs = Path(cfg.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running, failures, done, t0 = {}, [], 0, time.time()
    print(f"ablate: {len(todo)} runs to do, {n} at a time", flush=True)
    try:
        while todo or running:
            for slot in [s for s in range(n) if s not in running][:len(todo)]:
                run_dir, cmd, want = todo.pop(0)
                log = open(logs / f"{run_dir.name}.log", "a")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(envs[slot]))
                running[slot] = (proc, log, run_dir, want, time.time())
            time.sleep(0.5)
            for slot, (proc, log, run_dir, want, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[slot]
                done += 1
                ok = proc.returncode == 0 and state(run_dir, want) == "done"
                if not ok:
                    failures.append(f"{run_dir.name}: exit {proc.returncode}, see {log.name}")
                print(f"[{done}] {run_dir.name}: {'done' if ok else 'FAILED'} in {time.time() - start:.0f}s "
                      f"({time.time() - t0:.0f}s in all)", flush=True)
    finally:
        stop(running)
    return failures


def ablate(argv: list[str]) -> dict:
    cfg, vs, _ = parse(argv)
    out = Path(cfg.out).resolve()
    cfg.out = str(out)
    for stale in ("ablation.json", "ablation.png"):   # a summary is only ever of this invocation's runs
        (out / stale).unlink(missing_ok=True)
    script, todo = str(ROOT / "train.py"), []
    for v in vs:
        v["runs"] = {}
        for seed in range(cfg.seed_base, cfg.seed_base + cfg.seeds):
            run_dir = out / "runs" / f"{v['name'].replace('/', '_')}-seed{seed}"
            flags, want = run_config(v, seed, run_dir)
            v["runs"][seed] = run_dir
            now = state(run_dir, want)
            if now == "resume":
                todo.append((run_dir, [sys.executable, script, "--resume", str(run_dir)], want))
            elif now == "new":
                shutil.rmtree(run_dir, ignore_errors=True)
                todo.append((run_dir, [sys.executable, script] + flags, want))
    failures = run_all(cfg, todo) if todo else []
    if failures:
        raise SystemExit("ablate.py: runs failed, no summary written (re-run the same command to retry them):\n  "
                         + "\n  ".join(failures))
    summary = ablation.summarise(vs)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    ablation.figure(vs, out / "ablation.png")
    print(ablation.markdown_table(summary))
    print(f"summary: {out / 'ablation.json'}\nfigure: {out / 'ablation.png'}")
    return summary


def main(argv=None):
    """From Python, main([...]) raises input errors; as a command they print one line and exit with 2.
    SIGTERM and SIGHUP stop the runs as Ctrl-C does."""
    def interrupt(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    if argv is not None:
        return ablate(argv)
    return cli.run(ablate, "ablate.py", (ConfigError,), sys.argv[1:])


if __name__ == "__main__":
    main()
