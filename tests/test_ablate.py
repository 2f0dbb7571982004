"""ablate.py and minitir/ablation.py: the intervals against hand-computed and naive bootstraps, pairing by
seed, steps_to, the table's "no difference", parsing, and a real tiny grid that resumes."""
import json
import math
import random
from pathlib import Path

import pytest

import ablate
from minitir import ablation
from minitir.cli import UsageError
from minitir.config import ConfigError


def test_bootstrap_of_two_values_by_hand():
    # resampled means of [0, 1]: 0 (1/4), 0.5 (1/2), 1 (1/4): the 2.5th and 97.5th percentiles are 0 and 1
    ci = ablation.bootstrap_ci([0.0, 1.0])
    assert ci == {"mean": 0.5, "ci_low": 0.0, "ci_high": 1.0}
    assert ablation.bootstrap_ci([0.7]) == {"mean": 0.7, "ci_low": 0.7, "ci_high": 0.7}


def test_bootstrap_agrees_with_a_naive_one():
    values = [0.61, 0.72, 0.80, 0.93, 0.95]
    rng, n = random.Random(123), len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(40_000))
    tail = 0.5 * (1 + math.erf(-math.sqrt(5 / 4) * 2.776 / math.sqrt(2)))   # Hesterberg's expansion, t(0.975, 4)
    naive = (means[int(tail * len(means))], means[int((1 - tail) * len(means))])
    ci = ablation.bootstrap_ci(values)
    assert ci["mean"] == pytest.approx(sum(values) / n)
    assert ci["ci_low"] == pytest.approx(naive[0], abs=0.015) and ci["ci_high"] == pytest.approx(naive[1], abs=0.015)
    plain = (means[int(0.025 * len(means))], means[int(0.975 * len(means))])
    assert ci["ci_low"] < plain[0] - 0.02 and ci["ci_high"] > plain[1] + 0.01   # wider than the plain percentiles
    assert ablation.tail(1000) == pytest.approx(0.025, abs=0.001)


def _fake_run(path: Path, acc: list[float], code: list[float], every: int = 5, old: bool = False):
    path.mkdir(parents=True)
    rows = [{"step": i * every, "eval/accuracy": a, "eval/code_ratio": c, "eval/response_length": 10 + 10 * a,
             "eval/format_failure_rate": 0.5 * (1 - a)}
            for i, (a, c) in enumerate(zip(acc, code))]
    if old:   # made before format failures were logged
        rows = [{k: v for k, v in r.items() if k != "eval/format_failure_rate"} for r in rows]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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
    paired = ablation.bootstrap_ci([0.6 - 0.5, 0.8 - 0.6, 0.8 - 0.7])   # seed by seed
    assert diff["pairs"] == 3 and diff["mean"] == pytest.approx(0.4 / 3)
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx((paired["ci_low"], paired["ci_high"]))
    assert diff["ci_low"] == pytest.approx(0.1)
    # over the run: a's curves average 0.3, 0.4, 0.3667, b's 0.3667, 0.5, 0.4, so b learns faster by
    # 0.0667, 0.1, 0.0333 seed by seed
    assert a["curve_mean"]["eval/accuracy"]["mean"] == pytest.approx((0.3 + 0.4 + 1.1 / 3) / 3)
    area = b["curve_mean_diff_vs_first"]["eval/accuracy"]
    assert area == pytest.approx({**ablation.bootstrap_ci([1.1 / 3 - 0.3, 0.1, 1.2 / 3 - 1.1 / 3]), "pairs": 3})
    code = b["diff_vs_first"]["eval/code_ratio"]   # [0, 0, -0.6]: all three resampled as 0 with p = 8/27
    assert code["mean"] == pytest.approx(-0.2) and code["ci_high"] == 0.0
    # the first evaluation at or above 0.5; one that never gets there counts as the last step (10)
    assert a["steps_to"]["eval/accuracy>=0.5"]["mean"] == pytest.approx(25 / 3)      # 10, 5, 10
    assert b["steps_to"]["eval/accuracy>=0.5"]["mean"] == pytest.approx(20 / 3)      # 5, 5, 10
    assert b["steps_to"]["eval/code_ratio>=0.5"] == {**ablation.bootstrap_ci([5, 5, 10]), "reached": 2}
    assert a["steps_to"]["eval/code_ratio>=0.5"]["reached"] == 3
    other = {"name": "c", "overrides": {"lr": "3"}, "steps": 10,   # evaluated every 2 steps: no curve-mean difference
             "runs": {s: _fake_run(tmp_path / f"c{s}", *r, every=2) for s, r in new.items()}}
    c = ablation.summarise(variants + [other])["variants"][2]
    assert c["curve_mean_diff_vs_first"] == {} and c["diff_vs_first"]["eval/accuracy"] == diff
    table = ablation.markdown_table(summary)
    row = table.splitlines()[-1]
    assert row.startswith("| b | 3 |") and row.count("no difference at 3 seeds") == 1   # code ratio only
    assert "no difference" not in table.splitlines()[-2]
    older = {"name": "d", "overrides": {"lr": "4"}, "steps": 10,   # runs without a metric: the metric is left out
             "runs": {s: _fake_run(tmp_path / f"d{s}", *r, old=True) for s, r in new.items()}}
    mixed = ablation.summarise(variants + [older])
    assert set(mixed["variants"][0]["final"]) == set(ablation.METRICS) - {"eval/format_failure_rate"}
    assert mixed["variants"][2]["diff_vs_first"]["eval/accuracy"] == diff
    assert "format failures" in table and "format failures" not in ablation.markdown_table(mixed)


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


def test_a_run_is_done_resumed_or_started_over(tmp_path):
    cfg, (v,), rest = ablate.parse(["--out", str(tmp_path), "--steps", "10"])
    run = tmp_path / "runs" / "base-seed0"
    flags, want = ablate.run_config(v, 0, run)
    assert flags[-6:] == ["--seed", "0", "--run-dir", str(run.parent), "--run-name", "base-seed0"]
    assert ablate.state(run, want) == "new"
    _fake_run(run, [0.0, 0.5], [0.0, 1.0])
    (run / "config.json").write_text(json.dumps(want))
    (run / "checkpoints" / "step-000005").mkdir(parents=True)
    (run / "checkpoints" / "step-000005" / "trainer_state.pt").write_bytes(b"")
    assert ablate.state(run, want) == "resume"                              # logged to step 5 of 10
    assert ablate.state(run, {**want, "lr": 1.0}) == "new"                   # other flags: start over
    assert ablate.state(run, {**want, "run_dir": "x", "run_name": "y"}) == "resume"   # moved or copied: the same run
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 10, "eval/accuracy": 1.0}) + "\n")
    assert ablate.state(run, want) == "done"
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3}) + "\n")
    (run / "checkpoints" / "step-000010").mkdir()
    (run / "checkpoints" / "step-000010" / "trainer_state.pt").write_bytes(b"")
    assert ablate.state(run, want) == "new"   # its last checkpoint is the end, yet it did not log it: redo


def test_a_failed_run_fails_the_ablation_loudly(tmp_path):
    with pytest.raises(SystemExit) as e:   # in this process; the runs are processes of their own
        ablate.ablate(["--out", str(tmp_path), "--seeds", "1", "--data", str(tmp_path / "missing.jsonl")])
    assert "runs failed, no summary written" in str(e.value) and "base-seed0: exit 2" in str(e.value)
    assert not (tmp_path / "ablation.json").exists()


def test_a_tiny_grid_runs_summarises_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # --out relative to it; the runs are started from here too
    argv = ["--out", "abl", "--vary", "lr=0.0003,0.003", "--seeds", "2", "--jobs", "2", "--prompt", "zero_rl",
            "--steps", "2", "--prompts-per-step", "2", "--n-samples", "2", "--max-new-tokens", "16", "--eval-size",
            "4", "--eval-every", "1", "--synthetic-size", "40", "--no-tensorboard", "--log-samples", "0",
            "--save-every", "0"]
    summary = ablate.ablate(argv)
    out = capsys.readouterr().out
    assert "4 runs to do" in out and "| lr=0.003 | 2 |" in out and "| format failures |" in out
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text()) == json.loads(json.dumps(summary))
    first, second = summary["variants"]
    assert [first["name"], second["name"]] == ["lr=0.0003", "lr=0.003"] and second["overrides"] == {"lr": "0.003"}
    for m in ablation.METRICS:
        for ci in (first["final"][m], second["final"][m], second["diff_vs_first"][m]):
            assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"]
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
