import json
import math

import pytest

from minitir import plot

pytestmark = pytest.mark.quick   # the inner loop: pytest -m quick


def write_run(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_statistics_on_known_series():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert abs(plot.pearson(x, [2 * v + 1 for v in x]) - 1) < 1e-12
    assert abs(plot.pearson(x, [-v for v in x]) + 1) < 1e-12
    assert abs(plot.spearman(x, [v ** 3 for v in x]) - 1) < 1e-12      # monotone, not linear
    assert plot.ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    steps = [1, 2, 4, 8, 16, 32]
    t = plot.log_trend(steps, [0.1 + 0.2 * math.log(s) for s in steps])
    assert abs(t["a"] - 0.1) < 1e-9 and abs(t["b"] - 0.2) < 1e-9 and abs(t["r2"] - 1) < 1e-9


def test_plots_and_summary_for_overlaid_runs(tmp_path):
    rows_a, rows_b = [], []
    for s in range(1, 41):
        code = min(1.0, 0.02 * s)
        rows_a.append({"step": s, "code_ratio": code, "accuracy": 0.2 + 0.5 * code, "response_length": 100 + 400 * code,
                       **({"eval/accuracy": 0.1 + 0.01 * s} if s % 10 == 0 else {})})
        rows_b.append({"step": s, "code_ratio": 0.0, "accuracy": 0.2 + 0.1 * math.sin(s), "response_length": 120 + (s % 3)})
    a = write_run(tmp_path / "with_tools", rows_a)
    b = write_run(tmp_path / "no_tools", rows_b)
    summary = plot.main([str(a), str(b), "--out", str(tmp_path / "out")])
    c = summary["with_tools"]["corr"]["code_ratio~accuracy"]
    assert c["pearson"] > 0.999 and c["spearman"] > 0.999
    assert summary["with_tools"]["corr"]["code_ratio~response_length"]["pearson"] > 0.999
    flat = summary["no_tools"]["corr"]["code_ratio~accuracy"]                       # constant code ratio
    assert flat == {"pearson": None, "spearman": None, "undefined": "code_ratio is constant (0) over all 40 points"}
    assert summary["with_tools"]["corr"]["step~code_ratio"]["spearman"] > 0.99
    assert summary["with_tools"]["trend_vs_log_step"]["code_ratio"]["b"] > 0
    for name in ("scaling", "code_ratio", "response_length", "accuracy", "eval_accuracy"):
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["with_tools"]["steps"] == 40


def test_clear_errors_for_bad_metrics(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no metrics yet"):
        plot.main([str(tmp_path / "empty")])
    write_run(tmp_path / "bad", [{"step": 1}])
    with open(tmp_path / "bad" / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not valid JSON"):
        plot.main([str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="not found"):
        plot.main([str(tmp_path / "missing")])


def test_a_run_writes_its_scaling_figure_and_statistics(tmp_path):
    rows = [{"step": 0, "eval/accuracy": 0.1}] + [
        {"step": s, "code_ratio": 0.1 * s, "accuracy": 0.09 * s, "response_length": 40 + s} for s in range(1, 9)]
    run = write_run(tmp_path / "run", rows)
    png, js = plot.write_scaling(run)
    stats = json.loads(js.read_text())
    assert png.stat().st_size > 10_000 and stats["steps"] == 8
    assert stats["corr"]["step~accuracy"]["spearman"] == pytest.approx(1.0)
