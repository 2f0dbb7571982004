import itertools
import json

import pytest

from minitir.evaluate import majority_correct, pass_at_k, summarize
from tests.conftest import DATA_DIR


@pytest.mark.quick
@pytest.mark.parametrize("n,c", [(1, 0), (1, 1), (4, 1), (5, 2), (6, 3), (8, 0), (8, 8), (7, 5)])
def test_pass_at_k_equals_brute_force(n, c):
    outcomes = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert abs(pass_at_k(n, c, k) - brute) < 1e-12


def rec(bench, pid, sample, correct, answer, calls=2, tool_calls=0, errors=0, length=10, finish="stop"):
    return {"benchmark": bench, "problem_id": pid, "sample": sample, "max_tool_calls": calls, "correct": correct,
            "answer": answer, "num_tool_calls": tool_calls, "num_tool_errors": errors, "length": length,
            "policy_length": length - 3 * tool_calls, "finish_reason": finish}   # 3 tool-output tokens per call


@pytest.mark.quick
def test_summary_of_a_scripted_model():
    # problem a: 3 of 4 right, majority right; b: 1 of 4 right, majority wrong ("7" twice); c: none answered
    records = [rec("m", "a", 0, True, "1", tool_calls=1), rec("m", "a", 1, True, " 1 "), rec("m", "a", 2, False, "2"),
               rec("m", "a", 3, True, "1", tool_calls=2, errors=1),
               rec("m", "b", 0, False, "7"), rec("m", "b", 1, True, "3"), rec("m", "b", 2, False, "7"),
               rec("m", "b", 3, False, None, finish="length", length=30),
               rec("m", "c", 0, False, None), rec("m", "c", 1, False, None), rec("m", "c", 2, False, None),
               rec("m", "c", 3, False, None)]
    s = summarize(records)["m@2"]
    assert s["problems"] == 3 and s["n"] == 4
    assert s["avg@4"] == 4 / 12
    assert abs(s["pass@1"] - (0.75 + 0.25 + 0) / 3) < 1e-12
    assert abs(s["pass@2"] - ((1 - 0 / 6) + (1 - 3 / 6) + 0) / 3) < 1e-12
    assert s["pass@4"] == 2 / 3
    assert s["maj@4"] == 1 / 3
    assert s["code_ratio"] == 2 / 12 and s["tool_calls_per_response"] == 3 / 12 and s["tool_error_rate"] == 1 / 3
    assert s["truncation_rate"] == 1 / 12 and s["response_length_all"] == (11 * 10 + 30) / 12
    assert s["response_length"] == (11 * 10 + 30 - 3 * 3) / 12   # the model's own tokens, as training's metric
    assert majority_correct([{"answer": "5", "correct": False}, {"answer": "6", "correct": True}]) is False  # tie: first


def test_eval_py_end_to_end_and_resume(tmp_path, smollm):
    import eval as evaluate_cli
    args = ["--model", "smollm2-135m", "--benchmarks", "math500,aime24", "--data-dir", str(DATA_DIR), "--limit", "2",
            "--n-samples", "2", "--max-new-tokens", "24", "--max-tool-calls", "0,1", "--out", str(tmp_path)]
    summary = evaluate_cli.main(args)
    assert set(summary) == {"math500@0", "math500@1", "aime24@0", "aime24@1"}
    lines = [json.loads(l) for l in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2 * 2 * 2
    for r in lines:
        assert {"benchmark", "problem_id", "prompt", "response", "answer", "correct", "num_tool_calls", "length",
                "finish_reason"} <= set(r)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "tool_calls.png").stat().st_size > 5000
    again = evaluate_cli.main(args)   # everything is done: nothing is generated twice
    assert again == summary
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 16


@pytest.mark.quick
def test_the_default_response_budget_fits_the_models_context():
    import eval as evaluate_cli
    from minitir import load_pretrained
    from minitir.rollout import prompt_ids
    from minitir.tasks import get_template
    model, tok = load_pretrained("miniature")
    cfg = evaluate_cli.parse(["--model", "miniature", "--benchmarks", "miniature"])
    benches = evaluate_cli.load_benchmarks(cfg, print)
    longest = max(len(prompt_ids(tok, get_template("zero_tir"), p.question)) for p in benches["miniature"])
    assert cfg.max_new_tokens is None and model.config.max_position_embeddings == 1024
    assert evaluate_cli.default_budget(model, tok, cfg, benches) == 1024 - longest
    model.config.max_position_embeddings = 10**6
    assert evaluate_cli.default_budget(model, tok, cfg, benches) == 3072


@pytest.mark.quick
def test_each_seed_is_evaluated_on_its_own_held_out_problems(tmp_path):
    """A run saves its held-out problems; `--benchmarks heldout` reads exactly them from --model's run (seed
    1's differ from seed 0's, which `--benchmarks miniature` is), and says so where a run saved none."""
    import eval as eval_py
    from minitir import run_state
    from minitir.config import TrainConfig
    from minitir.tasks import DatasetError, load_benchmark, training_problems
    quiet = lambda *a: None   # noqa: E731
    held = {}
    for seed in (0, 1):
        cfg = TrainConfig(data="miniature", synthetic_size=4000, eval_size=64, seed=seed)
        held[seed] = training_problems(cfg, quiet)[1]
        (tmp_path / f"seed{seed}").mkdir()
        run_state.save_heldout(tmp_path / f"seed{seed}", held[seed])
        ecfg = eval_py.parse(["--model", str(tmp_path / f"seed{seed}" / "checkpoints" / "step-000040"),
                              "--benchmarks", "heldout"])
        got = eval_py.load_benchmarks(ecfg, quiet)["heldout"]
        assert [(p.question, p.answer) for p in got] == [(p.question, p.answer) for p in held[seed]]
    miniature = load_benchmark("miniature")[0]
    assert [p.question for p in miniature] == [p.question for p in held[0]]
    assert {p.question for p in held[1]} != {p.question for p in held[0]}
    ecfg = eval_py.parse(["--model", str(tmp_path / "nowhere" / "checkpoints" / "step-1"), "--benchmarks", "heldout"])
    with pytest.raises(DatasetError, match="heldout.jsonl not found"):
        eval_py.load_benchmarks(ecfg, quiet)
