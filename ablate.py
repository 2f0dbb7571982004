"""Quick ablations: variants x seeds of train.py, each run a separate process, then intervals over seeds.

    python ablate.py --vary prompt=zero_tir,zero_rl --seeds 5 --out runs/ablate-tools
    python ablate.py --vary algo=grpo,rloo --vary lr=3e-4,1e-3 --seeds 3 --out runs/grid --steps 30   # 4 variants
    python ablate.py --config smollm2-cpu --vary roc_oversample=1,2 --seeds 3 --out runs/roc

--vary FIELD=V1,V2,... takes any TrainConfig field (booleans: true,false) and may repeat (a grid; the first
value of each is the baseline every variant is compared with); any other flag goes to every run as train.py
reads it. Runs go to OUT/runs/VARIANT-seedS (logs in OUT/logs), as many at once as there are cores (one
thread each) or GPUs (one each). A finished run is never run again: re-running the same command continues
an interrupted ablation (a run with a checkpoint resumes from it; a log line cut short by a crash is cut
back). Nothing is ever deleted: a run of the same configuration with nothing to resume is moved to
OUT/aside and run again, and a directory made with other settings that change the numbers (or that is not
a run) stops the command with one line naming it and the settings (--restart moves it aside instead);
where the run or its data live and how often it saves do not count. Values are separated by commas, so a
value cannot hold one (lora_targets, adam_betas: set them for every run instead). SIGTERM stops the runs as
Ctrl-C does: each finishes its step and saves. A run that fails or stops is listed with the last line of
its log, the summary covers the runs that finished (marked partial), and the command exits non-zero. At
the end: OUT/ablation.json (final held-out metrics with 95% Student's t intervals over seeds, none below 3
seeds, their means over the run, differences to the first variant paired by seed, steps to 0.5),
OUT/ablation.png (the curves, mean and band) and a Markdown table.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

from minitir import ablation, cli, run_state
from minitir.checkpoint import CheckpointError
from minitir.cli import UsageError
from minitir.config import ConfigError, TrainConfig, config_fields, validate

import train

ROOT = Path(__file__).resolve().parent
RESERVED = ("seed", "run_dir", "run_name", "resume")   # ablate.py sets these for each run
STOP_WAIT_S = 300   # a stopped run's last step and checkpoint
REQUEUES = 50       # a SLURM job may run out of time (and resume) this many times
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
    restart: bool = False               # a run made with other settings is moved to OUT/aside and run again
                                        # (without: the command stops, naming it and the settings that differ)
    launcher: Literal["local", "slurm"] = "local"   # slurm: every run a job through submitit (OUT/jobs)
    wait: bool = False                  # slurm: wait for the jobs, then summarise (else: --summarise-only later)
    summarise_only: bool = False        # run nothing: summarise the runs that finished, list the others
    slurm_partition: str = ""           # the partition ("": the cluster's default)
    slurm_gpus: int = 1                 # GPUs per run (more than 1: one node, train.py under torchrun)
    slurm_cpus: int = 8                 # CPU cores per run, and its torch threads (its sandbox workers run there too)
    slurm_mem_gb: int = 0               # memory per run (0: the partition's default)
    slurm_time_min: int = 240           # time limit per job; a run stopped by it is requeued and resumes
    slurm_signal_s: int = 300           # SIGUSR2 this long before the limit: the run finishes its step and saves
    slurm_account: str = ""             # --account
    slurm_qos: str = ""                 # --qos
    slurm_constraint: str = ""          # --constraint (e.g. a GPU type)
    resubmit: bool = False              # slurm: submit runs whose earlier job (OUT/jobs.json) has not ended
    submitit_cluster: Literal["slurm", "local"] = "slurm"   # local: submitit's local executor, the same path
                                        # without a scheduler (to try it on one machine)


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
    own, rest = split_argv(argv)
    cfg = cli.parse(AblateConfig, own, description="Variants x seeds of train.py with intervals over seeds; flags "
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
    for v in out:
        v["flags"] = sum((train_flags(k, x) for k, x in v["overrides"].items()), [])
        v["argv"] = (["--config", cfg.config] if cfg.config else []) + ["--print-every", "0"] + v["flags"] + rest
        tc, _ = train.parse(v["argv"])
        validate(tc)
        if tc.eval_size == 0:
            raise UsageError("--eval-size 0: an ablation compares held-out evaluations; keep eval_size > 0")
        v["config"], v["steps"] = tc, tc.steps
    return cfg, out, rest


def run_config(v: dict, seed: int, run_dir: Path) -> tuple[list[str], dict]:
    """-> (train.py's flags for one run, the configuration it will write to its config.json)."""
    where = {"seed": seed, "run_dir": str(run_dir.parent), "run_name": run_dir.name}
    flags = v["argv"] + sum((["--" + k.replace("_", "-"), str(x)] for k, x in where.items()), [])
    return flags, json.loads(json.dumps(asdict(replace(v["config"], **where))))


# Fields that do not change a run's numbers: where it and its data live, how often it saves and what it
# prints, the sandbox's pool size (a tool result rejoins at a tick fixed by the tokens, whoever ran it)
PLACE = ("run_dir", "run_name", "data_dir", "save_every", "keep_checkpoints", "tensorboard", "log_samples",
         "print_every", "sandbox_workers", "sandbox_allow_unisolated")


class RunConflict(UsageError):
    """A directory where a run should be that ablate.py will not touch: it stops and says why."""


def differences(old: dict, want: dict) -> list[str]:
    """The fields that change the numbers in which a run's config.json differs from the one wanted; a field
    the old run lacks counts as its default (a field added since), one this version lacks as a difference."""
    defaults = json.loads(json.dumps(asdict(TrainConfig())))
    out = []
    for k in sorted(set(old) | set(want)):
        if k in PLACE:
            continue
        if k not in want:
            out.append(f"{k} (unknown to this version)")
        elif old.get(k, defaults[k]) != want[k]:
            out.append(f"{k} {old[k] if k in old else '(absent)'} != {want[k]}")
    return out


def state(run_dir: Path, want: dict, repair: bool = True) -> str:
    """"done" (the run logged its last step with the held-out evaluation that ends every run), "resume" (an
    earlier step's complete checkpoint), "restart" (a run of this configuration with nothing to resume: its
    directory is moved aside, never removed), "new" (no directory). RunConflict for a directory that is not
    this configuration's run: made with other numbers-changing settings, or not a run at all. A partial last
    line in its logs (a crash mid-write) is cut back first (repair=False: only read past)."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "new"
    try:
        old = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise RunConflict(f"{run_dir}: not a run ablate.py can read (no readable config.json): move it away or "
                          f"choose another --out") from None
    diff = differences(old, want)
    if diff:
        raise RunConflict(f"{run_dir}: made with other settings ({'; '.join(diff)}); --restart moves it aside "
                          f"and runs it again")
    rows = run_state.repair_logs(run_dir, cut=repair)
    if rows and rows[-1]["step"] == want["steps"] and "eval/accuracy" in rows[-1]:
        return "done"
    steps = [int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/trainer_state.pt")]
    return "resume" if steps and max(steps) < want["steps"] else "restart"


def move_aside(run_dir: Path) -> Path:
    """OUT/aside/NAME-TIME: a run directory ablate.py will not use, kept whole."""
    to = run_dir.parent.parent / "aside" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    to.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(to)
    return to


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
    """Interrupted: each run gets Ctrl-C (it finishes its step, saves a checkpoint, closes its sandbox), then
    is killed after STOP_WAIT_S. The next invocation resumes them."""
    for proc, *_ in running.values():
        proc.send_signal(signal.SIGINT)
    for proc, log, *_ in running.values():
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def run_all(cfg: AblateConfig, todo: list[tuple[Path, list[str], dict, list[str]]]) -> list[str]:
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
                run_dir, cmd, want, _ = todo.pop(0)
                log = open(logs / f"{run_dir.name}.log", "a")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(envs[slot]),
                                        start_new_session=True)   # signals reach it from stop() alone
                running[slot] = (proc, log, run_dir, want, time.time())
            time.sleep(0.5)
            for slot, (proc, log, run_dir, want, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[slot]
                done += 1
                why = unfinished(run_dir, want, proc.returncode, Path(log.name))
                ok = why is None
                if not ok:
                    failures.append(why)
                print(f"[{done}] {run_dir.name}: {'done' if ok else 'FAILED'} in {time.time() - start:.0f}s "
                      f"({time.time() - t0:.0f}s in all)", flush=True)
    finally:
        stop(running)
    return failures


def unfinished(run_dir: Path, want: dict, code, log: Path, repair: bool = True) -> str | None:
    """None for a run that finished, else one line: how it ended and the last line of its log."""
    try:
        if state(run_dir, want, repair) == "done":
            return None
        rows = run_state.repair_logs(run_dir, cut=repair)
        how = f"exit {code}, logged step {rows[-1]['step'] if rows else 0} of {want['steps']}"
    except (RunConflict, CheckpointError) as e:
        how = f"exit {code}, {e}"
    text = log.read_text(errors="replace") if log.exists() else ""
    last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "(empty)")
    return f"{run_dir.name}: {how}; its log ({log}) ends: {last.strip()[-200:]}"


def plan(cfg: AblateConfig, vs: list[dict], out: Path) -> list[tuple[Path, list[str], dict, list[str]]]:
    """Every run's directory in v["runs"], and the runs to do, (directory, command, configuration, command
    from scratch): resumed, restarted (the old directory moved aside) or new. Stops (RunConflict) before any
    run where a directory is not this configuration's run, unless --restart. --summarise-only: none to do."""
    script, todo = str(ROOT / "train.py"), []
    for v in vs:
        v["runs"] = {}
        for seed in range(cfg.seed_base, cfg.seed_base + cfg.seeds):
            run_dir = out / "runs" / f"{v['name'].replace('/', '_')}-seed{seed}"
            flags, want = run_config(v, seed, run_dir)
            v["runs"][seed] = run_dir
            if cfg.summarise_only:
                continue
            try:
                now = state(run_dir, want)
            except RunConflict:
                if not cfg.restart:
                    raise
                now = "restart"
            if now == "restart":
                print(f"ablate: {run_dir.name} moved aside to {move_aside(run_dir)}", flush=True)
            fresh = [sys.executable, script] + flags
            if now == "resume":
                todo.append((run_dir, [sys.executable, script, "--resume", str(run_dir)], want, fresh))
            elif now in ("new", "restart"):
                todo.append((run_dir, fresh, want, fresh))
    return todo


class RunJob:
    """One run as a submitit job: brings its directory to "done" (resumed, or started, as plan() would) with
    train.py in a child process (under torchrun for several GPUs), its output appended to OUT/logs. On the
    signal SLURM sends before the time limit, or on preemption, the child is told to stop (it finishes its
    step and saves) and the job is requeued to resume."""

    def __init__(self, run_dir: Path, fresh: list[str], want: dict, log: Path, gpus: int, threads: int = 0):
        self.run_dir, self.fresh, self.want, self.log, self.gpus, self.proc = run_dir, fresh, want, log, gpus, None
        self.threads = threads   # CPU threads of its processes (0: torch's choice): the job's cores

    def __call__(self):
        now = state(self.run_dir, self.want)
        if now == "done":
            return
        if now == "restart":
            move_aside(self.run_dir)
        cmd = [self.fresh[0], self.fresh[1], "--resume", str(self.run_dir)] if now == "resume" else self.fresh
        if self.gpus > 1:
            cmd = [cmd[0], "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.gpus}"] + cmd[1:]
        with open(self.log, "a") as f:
            n = str(self.threads)
            threads = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n} if self.threads else {}
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(threads))
            while (code := self.proc.poll()) is None:   # not wait(): checkpoint() runs in a signal handler of
                time.sleep(1)                            # this thread and waits for the child itself
        why = unfinished(self.run_dir, self.want, code, self.log)
        if why:
            raise RuntimeError(why)

    def checkpoint(self, *args, **kwargs):
        import submitit
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait()
        return submitit.helpers.DelayedSubmission(RunJob(self.run_dir, self.fresh, self.want, self.log, self.gpus,
                                                         self.threads))


def in_flight(out: Path, todo: list) -> list[str]:
    """Runs to do that OUT/jobs.json says were submitted and whose job has not ended (submitit writes a
    result file when a job ends, whatever its end): queued, running, or killed without one."""
    jobs = json.loads((out / "jobs.json").read_text()) if (out / "jobs.json").exists() else {}
    return [f"{d.name} (job {jobs[str(d)]})" for d, *_ in todo
            if str(d) in jobs and not list((out / "jobs" / jobs[str(d)]).glob("*_result.pkl"))]


def submit(cfg: AblateConfig, todo: list, out: Path) -> list:
    """Every run to do as a job (one GPU each, or a node's slurm_gpus under torchrun): -> the jobs. Stops
    where a run's earlier job has not ended (a second job would write the same directory), unless
    --resubmit."""
    import submitit
    busy = in_flight(out, todo)
    if busy and not cfg.resubmit:
        raise RunConflict(f"{len(busy)} runs have jobs that have not ended: {', '.join(busy[:4])}"
                          f"{' ...' if len(busy) > 4 else ''}; wait for them, or cancel them and add --resubmit")
    executor = submitit.AutoExecutor(folder=out / "jobs" / "%j", cluster=cfg.submitit_cluster,
                                     slurm_max_num_timeout=REQUEUES)
    extra = {k: v for k, v in (("account", cfg.slurm_account), ("qos", cfg.slurm_qos),
                               ("constraint", cfg.slurm_constraint)) if v}
    executor.update_parameters(
        name="minitir-ablate", timeout_min=cfg.slurm_time_min, gpus_per_node=cfg.slurm_gpus, tasks_per_node=1,
        nodes=1, cpus_per_task=cfg.slurm_cpus, **({"mem_gb": cfg.slurm_mem_gb} if cfg.slurm_mem_gb else {}),
        slurm_partition=cfg.slurm_partition or None, slurm_signal_delay_s=cfg.slurm_signal_s,
        slurm_additional_parameters=extra)
    # the jobs unpickle RunJob: they import ablate, from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    jobs = [executor.submit(RunJob(run_dir, fresh, want, out / "logs" / f"{run_dir.name}.log", cfg.slurm_gpus,
                                   cfg.slurm_cpus)) for run_dir, _, want, fresh in todo]
    known = json.loads((out / "jobs.json").read_text()) if (out / "jobs.json").exists() else {}
    (out / "jobs.json").write_text(json.dumps({**known, **{str(d): j.job_id for (d, *_), j in zip(todo, jobs)}},
                                              indent=2))
    for (run_dir, *_), job in zip(todo, jobs):
        print(f"ablate: {run_dir.name}: job {job.job_id}", flush=True)
    return jobs


def wait_for(jobs: list, todo: list) -> list[str]:
    """-> the failures, one line each (a job's exception carries the run's own line)."""
    failures = []
    for (run_dir, _, want, _), job in zip(todo, jobs):
        try:
            job.result()
            print(f"ablate: {run_dir.name}: done", flush=True)
        except Exception as e:   # noqa: BLE001 - a failed job is reported, not raised
            lines = [ln[ln.index(run_dir.name + ":"):] for ln in str(e).splitlines() if run_dir.name + ":" in ln]
            failures.append(lines[-1].strip() if lines else f"{run_dir.name}: job {job.job_id} failed: "
                            f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
    return failures


def ablate(argv: list[str]) -> dict:
    """Plan, run what is left, summarise the runs that finished (saying which did not), draw, print."""
    cfg, vs, _ = parse(argv)
    out = Path(cfg.out).resolve()
    cfg.out = str(out)
    todo = plan(cfg, vs, out)
    for stale in ("ablation.json", "ablation.png"):   # a summary is only ever of this invocation's runs
        (out / stale).unlink(missing_ok=True)
    if cfg.launcher == "slurm" and todo:
        jobs = submit(cfg, todo, out)
        if not cfg.wait:
            print(f"ablate: {len(jobs)} jobs submitted; when they end: python ablate.py {' '.join(argv)} "
                  f"--summarise-only")
            return {}
        failures = wait_for(jobs, todo)
    else:
        failures = run_all(cfg, todo) if todo else []
    if cfg.summarise_only:   # every run that is not done is unfinished
        failures = [why for v in vs for seed, d in v["runs"].items()
                    if (why := unfinished(d, run_config(v, seed, d)[1], "-", out / "logs" / f"{d.name}.log",
                                          repair=False))]
    failed = {line.split(":", 1)[0] for line in failures}
    for v in vs:   # the summary covers the runs that finished
        v["runs"] = {seed: d for seed, d in v["runs"].items() if d.name not in failed}
    if not vs[0]["runs"]:
        raise SystemExit(f"ablate.py: no run of the first variant ({vs[0]['name']}) finished, so nothing can be "
                         f"compared (re-run the same command to retry them):\n  " + "\n  ".join(failures))
    vs = [v for v in vs if v["runs"]]
    summary = ablation.summarise(vs)
    summary["unfinished"] = failures   # a partial summary says so
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    ablation.figure(vs, out / "ablation.png")
    print(ablation.markdown_table(summary))
    print(f"summary: {out / 'ablation.json'}\nfigure: {out / 'ablation.png'}")
    if failures:
        raise SystemExit(f"ablate.py: {len(failures)} runs did not finish; the summary above is PARTIAL, of the "
                         f"runs that did (re-run the same command to retry them):\n  " + "\n  ".join(failures))
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
    return cli.run(ablate, "ablate.py", (ConfigError, CheckpointError), sys.argv[1:])


if __name__ == "__main__":
    main()
