"""ablate.py and minitir/ablation.py: the intervals against hand-computed ones, pairing by
seed, steps_to, the table's "no difference", parsing, and a real tiny grid that resumes."""
import json
import math
import time
from pathlib import Path

import pytest

import ablate
from minitir import ablation
from minitir.cli import UsageError
from minitir.config import ConfigError, TrainConfig


@pytest.mark.quick
def test_t_interval_by_hand_and_too_few_seeds():
    # [0.61, 0.72, 0.80, 0.93, 0.95]: mean 0.802, s = sqrt(0.08188 / 4) = 0.143073, t(0.975, 4) = 2.776
    ci = ablation.interval([0.61, 0.72, 0.80, 0.93, 0.95])
    half = 2.776 * 0.143073 / math.sqrt(5)
    assert ci["mean"] == pytest.approx(0.802)
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx((0.802 - half, 0.802 + half), abs=1e-5)
    assert ablation.interval([0.5, 0.5, 0.5])["ci_low"] == 0.5   # no spread, no width
    two = {"mean": pytest.approx(0.8), "ci_low": None, "ci_high": None, "values": [0.7, 0.9]}
    assert ablation.interval([0.7, 0.9]) == two
    assert ablation.t975(200) == pytest.approx(1.972, abs=0.001)


@pytest.mark.quick
def test_below_three_seeds_the_table_gives_values_not_verdicts(tmp_path):
    variants = [{"name": n, "overrides": {}, "steps": 10,
                 "runs": {s: _fake_run(tmp_path / f"{n}{s}", [0.0, a + s / 10], [0, 1]) for s in (0, 1)}}
                for n, a in (("a", 0.5), ("b", 0.9))]
    table = ablation.markdown_table(ablation.summarise(variants))
    row = table.splitlines()[-1]
    assert "0.95 (values 0.90, 1.00: too few seeds)" in row and "+0.40 (values +0.40, +0.40: too few seeds)" in row
    assert "no difference" not in table and "[" not in row
    ablation.figure(variants, tmp_path / "two.png")   # means only, no band


def _fake_run(path: Path, acc: list[float], code: list[float], every: int = 5, old: bool = False):
    path.mkdir(parents=True)
    rows = [{"step": i * every, "eval/accuracy": a, "eval/code_ratio": c, "eval/response_length": 10 + 10 * a,
             "eval/format_failure_rate": 0.5 * (1 - a)}
            for i, (a, c) in enumerate(zip(acc, code))]
    if old:   # made before format failures were logged
        rows = [{k: v for k, v in r.items() if k != "eval/format_failure_rate"} for r in rows]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.quick
def test_summary_pairs_differences_by_seed_and_counts_steps_to(tmp_path):
    base = {0: ([0.0, 0.4, 0.5], [0, 1, 1]), 1: ([0.0, 0.6, 0.6], [0, 1, 1]), 2: ([0.1, 0.3, 0.7], [0, 1, 1])}
    new = {0: ([0.0, 0.5, 0.6], [0, 1, 1]), 1: ([0.0, 0.7, 0.8], [0, 1, 1]), 2: ([0.0, 0.4, 0.8], [0, 0.2, 0.4])}
    variants = [{"name": "a", "overrides": {"lr": "1"}, "steps": 10,
                 "runs": {s: _fake_run(tmp_path / f"a{s}", *r) for s, r in base.items()}},
                {"name": "b", "overrides": {"lr": "2"}, "steps": 10,
                 "runs": {s: _fake_run(tmp_path / f"b{s}", *r) for s, r in new.items()}}]
    summary = ablation.summarise(variants)
    a, b = summary["variants"]
    assert a["final"]["eval/accuracy"]["mean"] == pytest.approx(0.6) and a["diff_vs_first"] == {}
    assert a["runs"] == [str(tmp_path / f"a{s}") for s in (0, 1, 2)]
    diff = b["diff_vs_first"]["eval/accuracy"]
    paired = ablation.interval([0.6 - 0.5, 0.8 - 0.6, 0.8 - 0.7])   # seed by seed
    assert diff["pairs"] == 3 and diff["mean"] == pytest.approx(0.4 / 3)
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx((paired["ci_low"], paired["ci_high"]))
    assert diff["ci_low"] == pytest.approx(0.4 / 3 - 4.303 * math.sqrt(1 / 300) / math.sqrt(3))   # s = 0.0577
    # over the run: a's curves average 0.3, 0.4, 0.3667, b's 0.3667, 0.5, 0.4, so b learns faster by
    # 0.0667, 0.1, 0.0333 seed by seed
    assert a["curve_mean"]["eval/accuracy"]["mean"] == pytest.approx((0.3 + 0.4 + 1.1 / 3) / 3)
    area = b["curve_mean_diff_vs_first"]["eval/accuracy"]
    want = {**ablation.interval([1.1 / 3 - 0.3, 0.1, 1.2 / 3 - 1.1 / 3]), "pairs": 3}
    assert area.pop("values") == pytest.approx(want.pop("values")) and area == pytest.approx(want)
    code = b["diff_vs_first"]["eval/code_ratio"]   # [0, 0, -0.6]: s = 0.3464, so -0.2 +- 0.861
    assert code["mean"] == pytest.approx(-0.2)
    assert code["ci_high"] == pytest.approx(-0.2 + 4.303 * 0.34641 / math.sqrt(3), abs=1e-4)
    # the first evaluation at or above 0.5; one that never gets there counts as the last step (10)
    assert a["steps_to"]["eval/accuracy>=0.5"]["mean"] == pytest.approx(25 / 3)      # 10, 5, 10
    assert b["steps_to"]["eval/accuracy>=0.5"]["mean"] == pytest.approx(20 / 3)      # 5, 5, 10
    assert b["steps_to"]["eval/code_ratio>=0.5"] == {**ablation.interval([5, 5, 10]), "reached": 2}
    assert a["steps_to"]["eval/code_ratio>=0.5"]["reached"] == 3
    other = {"name": "c", "overrides": {"lr": "3"}, "steps": 10,   # evaluated every 2 steps: no curve-mean difference
             "runs": {s: _fake_run(tmp_path / f"c{s}", *r, every=2) for s, r in new.items()}}
    c = ablation.summarise(variants + [other])["variants"][2]
    assert c["curve_mean_diff_vs_first"] == {} and c["diff_vs_first"]["eval/accuracy"] == diff
    table = ablation.markdown_table(summary)
    row = table.splitlines()[-1]
    assert row.startswith("| b | 3 |") and row.count("no difference at 3 seeds") == 5   # t at 3 seeds: wide
    assert not ablation.contains_zero(ablation.interval([0.1, 0.2, 0.15]))   # [+0.03, +0.27]: a difference
    assert "no difference" not in table.splitlines()[-2]
    older = {"name": "d", "overrides": {"lr": "4"}, "steps": 10,   # runs without a metric: the metric is left out
             "runs": {s: _fake_run(tmp_path / f"d{s}", *r, old=True) for s, r in new.items()}}
    mixed = ablation.summarise(variants + [older])
    assert set(mixed["variants"][0]["final"]) == set(ablation.METRICS) - {"eval/format_failure_rate"}
    assert mixed["variants"][2]["diff_vs_first"]["eval/accuracy"] == diff
    assert "format failures" in table and "format failures" not in ablation.markdown_table(mixed)


@pytest.mark.quick
def test_parse_builds_the_grid_and_refuses_mistakes():
    cfg, vs, rest = ablate.parse(["--out", "x", "--vary", "prompt=zero_tir,zero_rl", "--vary=carry_over=true,false",
                                  "--seeds", "3", "--steps", "7"])
    assert [v["name"] for v in vs] == ["prompt=zero_tir,carry_over=true", "prompt=zero_tir,carry_over=false",
                                       "prompt=zero_rl,carry_over=true", "prompt=zero_rl,carry_over=false"]
    assert vs[1]["flags"] == ["--prompt", "zero_tir", "--no-carry-over"] and vs[0]["steps"] == 7
    assert cfg.seeds == 3 and rest == ["--steps", "7"]
    for argv in (["--vary", "bogus=1,2"], ["--vary", "seed=1,2"], ["--seed", "3"], ["--vary", "carry_over=yes"],
                 ["--vary", "lr=1,1"], ["--vary", "algo=grpo,nope"], ["--eval-size", "0"], ["--seeds", "0"],
                 ["--vary", "lr=1e-3,2e-3", "--lr", "5e-4"], ["--vary", "carry_over=true,false", "--no-carry-over"]):
        with pytest.raises(UsageError):
            ablate.parse(["--out", "x"] + argv)
    with pytest.raises(ConfigError):   # validated as train.py validates, before any run
        ablate.parse(["--out", "x", "--vary", "roc_oversample=1,2", "--n-samples", "2"])


@pytest.mark.quick
def test_a_run_is_done_resumed_restarted_or_refused_never_deleted(tmp_path):
    cfg, (v,), rest = ablate.parse(["--out", str(tmp_path), "--steps", "10"])
    run = tmp_path / "runs" / "base-seed0"
    flags, want = ablate.run_config(v, 0, run)
    assert flags[-6:] == ["--seed", "0", "--run-dir", str(run.parent), "--run-name", "base-seed0"]
    assert ablate.state(run, want) == "new"
    _fake_run(run, [0.0, 0.5], [0.0, 1.0])
    (run / "config.json").write_text(json.dumps(want))
    assert ablate.state(run, want) == "restart"                             # nothing to resume from
    (run / "checkpoints" / "step-000005").mkdir(parents=True)
    (run / "checkpoints" / "step-000005" / "trainer_state.pt").write_bytes(b"")
    assert ablate.state(run, want) == "resume"                              # logged to step 5 of 10
    # a checkout moved elsewhere (data_dir), runs copied in (run_dir, run_name), a field added since at its
    # default, settings that change no number: the same run
    moved = {**want, "data_dir": "/elsewhere/data", "run_dir": "x", "run_name": "y", "save_every": 7,
             "sandbox_workers": 9, "log_samples": 0}
    del moved["dual_clip"]
    assert want["dual_clip"] == TrainConfig().dual_clip
    (run / "config.json").write_text(json.dumps(moved))
    assert ablate.state(run, want) == "resume"
    (run / "config.json").write_text(json.dumps({**want, "lr": 1.0, "tis_cap": 0.5}))   # other numbers: stop
    with pytest.raises(ablate.RunConflict) as e:
        ablate.state(run, want)
    assert "base-seed0" in str(e.value) and "lr 1.0 != " in str(e.value) and "tis_cap 0.5 != 2.0" in str(e.value)
    assert "--restart" in str(e.value) and (run / "metrics.jsonl").exists()
    (run / "config.json").write_text(json.dumps(want))
    with open(run / "metrics.jsonl", "a") as f:   # a crash mid-line: cut back, then resumed
        f.write('{"step": 6, "eval/acc')
    assert ablate.state(run, want) == "resume" and (run / "metrics.jsonl").read_text().endswith("}\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 10, "eval/accuracy": 1.0}) + "\n")
    assert ablate.state(run, want) == "done"
    foreign = tmp_path / "runs" / "base-seed1"   # not a run: ablate.py cannot tell it is its own
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ablate.RunConflict, match="no readable config.json"):
        ablate.state(foreign, want)


@pytest.mark.quick
def test_plan_moves_aside_never_removes(tmp_path, capsys):
    """--restart moves a run made with other settings to OUT/aside whole; a run of this configuration with
    nothing to resume is moved aside too, then started again."""
    argv = ["--out", str(tmp_path), "--steps", "10", "--seeds", "2"]
    cfg, vs, _ = ablate.parse(argv)
    runs = [tmp_path / "runs" / f"base-seed{s}" for s in (0, 1)]
    for s, run in enumerate(runs):
        _fake_run(run, [0.0, 0.5], [0.0, 1.0])
        want = ablate.run_config(vs[0], s, run)[1]
        (run / "config.json").write_text(json.dumps({**want, "lr": 1.0} if s == 0 else want))
    with pytest.raises(ablate.RunConflict):
        ablate.plan(cfg, vs, tmp_path)
    assert all(r.exists() for r in runs)
    cfg, vs, _ = ablate.parse(argv + ["--restart"])
    todo = ablate.plan(cfg, vs, tmp_path)
    assert [t[0] for t in todo] == runs and not any(r.exists() for r in runs)
    aside = sorted((tmp_path / "aside").iterdir())
    assert [a.name.rsplit("-", 2)[0] for a in aside] == ["base-seed0", "base-seed1"]
    assert all((a / "metrics.jsonl").exists() and (a / "config.json").exists() for a in aside)
    assert "moved aside" in capsys.readouterr().out


def test_a_failed_run_fails_the_ablation_loudly(tmp_path):
    with pytest.raises(SystemExit) as e:   # in this process; the runs are processes of their own
        ablate.ablate(["--out", str(tmp_path), "--seeds", "1", "--data", str(tmp_path / "missing.jsonl")])
    assert "no run of the first variant (base) finished" in str(e.value) and "base-seed0: exit 2" in str(e.value)
    assert "its log" in str(e.value) and "missing.jsonl" in str(e.value)   # the log's last line says why
    assert not (tmp_path / "ablation.json").exists()


def test_failures_do_not_hide_the_runs_that_finished(tmp_path, capsys):
    """One of two variants fails (its data is missing): the summary and figure cover the finished one, say
    which did not finish and how its log ends, and the command still fails; a figure of one metric works."""
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(40)))
    argv = ["--out", str(tmp_path / "abl"), "--vary", f"data={data},{tmp_path / 'missing.jsonl'}", "--seeds", "1",
            "--prompt", "zero_rl", "--steps", "1", "--prompts-per-step", "2", "--n-samples", "2", "--max-new-tokens",
            "8", "--eval-size", "4", "--no-tensorboard", "--log-samples", "0", "--save-every", "0"]
    with pytest.raises(SystemExit) as e:
        ablate.ablate(argv)
    assert "1 runs did not finish; the summary above is PARTIAL" in str(e.value)
    summary = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert [v["name"] for v in summary["variants"]] == [f"data={data}"] and len(summary["unfinished"]) == 1
    assert "missing.jsonl-seed0: exit 2" in summary["unfinished"][0] or "exit 2" in summary["unfinished"][0]
    assert f"| data={data} | 1 |" in capsys.readouterr().out
    one = tmp_path / "one-metric"   # runs that logged a single held-out metric: a figure of one plot
    one.mkdir()
    (one / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval/accuracy": s / 10}) + "\n" for s in (0, 5)))
    assert ablation.figure([{"name": "one", "runs": {0: one}}], tmp_path / "one.png").stat().st_size > 5_000


def test_a_tiny_grid_runs_summarises_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # --out relative to it; the runs are started from here too
    argv = ["--out", "abl", "--vary", "lr=0.0003,0.003", "--seeds", "2", "--jobs", "2", "--prompt", "zero_rl",
            "--steps", "2", "--prompts-per-step", "2", "--n-samples", "2", "--max-new-tokens", "16", "--eval-size",
            "4", "--eval-every", "1", "--synthetic-size", "40", "--no-tensorboard", "--log-samples", "0",
            "--save-every", "0"]
    summary = ablate.ablate(argv)
    out = capsys.readouterr().out
    assert "4 runs to do" in out and "| lr=0.003 | 2 |" in out and "| format failures |" in out
    assert "too few seeds" in out
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text()) == json.loads(json.dumps(summary))
    first, second = summary["variants"]
    assert [first["name"], second["name"]] == ["lr=0.0003", "lr=0.003"] and second["overrides"] == {"lr": "0.003"}
    for m in ablation.METRICS:
        for ci in (first["final"][m], second["final"][m], second["diff_vs_first"][m]):   # 2 seeds: no interval
            assert ci["ci_low"] is None and len(ci["values"]) == 2
        finals = [ablation.final(ablation.read_metrics(r), m) for r in first["runs"]]
        assert first["final"][m]["mean"] == pytest.approx(sum(finals) / 2)
    assert (tmp_path / "abl" / "ablation.png").stat().st_size > 10_000
    kept = Path(first["runs"][0]) / "metrics.jsonl"
    before = kept.stat().st_mtime_ns
    lost = Path(second["runs"][1])
    (lost / "metrics.jsonl").write_text((lost / "metrics.jsonl").read_text().splitlines()[0] + "\n")  # cut short
    again = ablate.ablate(argv)
    out = capsys.readouterr().out
    assert "1 runs to do" in out and "lr=0.003-seed1: done" in out
    assert kept.stat().st_mtime_ns == before
    assert again == summary   # the run redone alone gives the same numbers


def test_a_grid_as_slurm_jobs_through_submitits_local_executor(tmp_path, capsys):
    """--launcher slurm submits every run as a job (here submitit's local executor: the same path but the
    scheduler), waits, and summarises as the local launcher does; a job told to stop before its time limit
    (RunJob.checkpoint: what SLURM's warning signal calls) stops its run, which saves, and the requeued job
    resumes it; --summarise-only later gives the same summary."""
    import threading
    argv = ["--out", str(tmp_path / "abl"), "--vary", "lr=0.0003,0.003", "--seeds", "1", "--prompt", "zero_rl",
            "--steps", "3", "--prompts-per-step", "2", "--n-samples", "2", "--max-new-tokens", "16", "--eval-size",
            "4", "--synthetic-size", "40", "--no-tensorboard", "--log-samples", "0", "--save-every", "0"]
    cfg, vs, _ = ablate.parse(argv)
    (run_dir, _, want, fresh), _ = ablate.plan(cfg, vs, tmp_path / "abl")
    (tmp_path / "abl" / "logs").mkdir(parents=True)
    job = ablate.RunJob(run_dir, fresh, want, tmp_path / "abl" / "logs" / f"{run_dir.name}.log", gpus=1)
    errors = []
    t = threading.Thread(target=lambda: errors.append(_raises(job)))
    t.start()
    while not ((run_dir / "metrics.jsonl").exists() and '"step": 1' in (run_dir / "metrics.jsonl").read_text()):
        time.sleep(0.1)
    requeued = job.checkpoint()   # as at SLURM's warning signal: the run finishes its step and saves
    t.join()
    assert "exit 143" in str(errors[0]) and ablate.state(run_dir, want) == "resume"
    assert isinstance(requeued.function, ablate.RunJob) and requeued.function.run_dir == run_dir
    summary = ablate.ablate(argv + ["--launcher", "slurm", "--submitit-cluster", "local", "--wait"])
    out = capsys.readouterr().out
    assert "lr=0.0003-seed0: done" in out and "lr=0.003-seed0: done" in out and "too few seeds" in out
    assert len(json.loads((tmp_path / "abl" / "jobs.json").read_text())) == 2
    assert [r["step"] for r in ablation.read_metrics(run_dir)] == [0, 1, 2, 3]   # resumed after 1, not redone
    assert not (tmp_path / "abl" / "aside").exists()
    assert ablate.ablate(argv + ["--summarise-only"]) == summary


def _raises(job):
    try:
        job()
    except RuntimeError as e:
        return e
    return None


@pytest.mark.quick
def test_a_run_whose_job_has_not_ended_is_not_submitted_twice(tmp_path):
    out = tmp_path / "abl"
    cfg, vs, _ = ablate.parse(["--out", str(out), "--seeds", "1", "--launcher", "slurm"])
    todo = ablate.plan(cfg, vs, out)
    out.mkdir(exist_ok=True)
    (out / "jobs.json").write_text(json.dumps({str(todo[0][0]): "123"}))
    with pytest.raises(ablate.RunConflict, match=r"base-seed0 \(job 123\); wait for them, or cancel them"):
        ablate.submit(cfg, todo, out)
    (out / "jobs" / "123").mkdir(parents=True)
    (out / "jobs" / "123" / "123_0_result.pkl").write_bytes(b"")   # the job ended
    assert ablate.in_flight(out, todo) == []
