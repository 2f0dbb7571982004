"""benchmarks/gpu_check.py in its dry mode (tiny sizes, CPU): every section runs and reports, so the script a
GPU machine runs in its few minutes is known to work before the machine is at hand."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_gpu_check_dry_runs_every_section(tmp_path):
    import gpu_check
    out = tmp_path / "report.json"
    report = gpu_check.main(["--dry", "--out", str(out)])
    assert json.loads(out.read_text())["dry"] is True
    for section in ("tests", "parity", "decode", "engine", "train", "invariance"):
        assert "error" not in report[section], report[section]
    assert report["tests"]["returncode"] == 0
    for name, diff in report["parity"].items():   # float32 on CPU: minitir equals transformers
        assert diff["padded"] < 1e-4 and diff["packed"] < 1e-4 and diff["cached"] < 1e-4, name
    assert all(row["graphs_equal_eager"] and row["transformers_tok_s"] > 0 for row in report["decode"])
    engine = report["engine"]   # one capture where the device has graphs (none on a CPU), and the same tokens
    assert all(engine["calls_equal_fresh_engine"]) and engine["captures"] == int(report["environment"]["cuda_graph_decode"])
    # the bfloat16 recipe on CPU: a decode copy in bfloat16 against float32 masters under autocast, the same bits
    assert report["train"]["logprob_gap_max"] == 0.0 and report["train"]["tis_capped"] == 0.0
    inv = report["invariance"]
    assert inv["same_run"] and inv["gap_max_invariant"] == 0.0 and 0 < inv["gap_max_default"] < 2
