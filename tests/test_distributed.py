"""Data-parallel training under torchrun with FSDP2, on CPU with gloo: one optimizer step of 2 processes
equals one step of a single process on the combined batch, and train.py runs, checkpoints and resumes
across different numbers of processes.

The worker half of this file runs under `torchrun -m tests.test_distributed`."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minitir.sample import Completion
from minitir.model import ModelConfig, Transformer
from minitir.tasks import Problem
from minitir.config import TrainConfig
from minitir.sample import Sample
from minitir.trainer import Trainer, keep_group

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    # global token whitening, per-sequence weights, a reference model and entropy, selective checkpointing
    "reinforce_pp": dict(algo="reinforce_pp", loss_agg="seq_mean_token_mean", kl_coef=0.1, entropy_coef=0.01,
                         checkpointing="selective"),
    # a critic (sharded too), GAE with a global advantage whitening, full checkpointing
    "ppo": dict(algo="ppo", loss_agg="token_mean", checkpointing="full"),
    # LoRA adapters on a frozen, sharded base; the KL reference is the base (adapters off); merged decode copy
    "lora": dict(algo="grpo", loss_agg="token_mean", lora_rank=4, lora_alpha=8.0, kl_coef=0.1,
                 checkpointing="selective"),
}


def torchrun(args, nproc=2, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # torchrun's own default log directory (a new /tmp/torchelastic_*) would stay behind
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--log-dir", logs] + args
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def tiny_model():
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_id=0,
                      tie_word_embeddings=True)
    return Transformer(cfg).init_weights(std=0.1, seed=0)


def batch() -> list[Sample]:
    """Two groups of 4 responses. Group 0 is long and group 1 short, so the ranks run different numbers
    of micro-batches; odd responses carry tool tokens (mask 0) in the middle."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(8):
        P, L = (5, 12 + i % 3) if i < 4 else (3, 4 + i % 2)
        toks = torch.randint(1, 64, (L,), generator=g).tolist()
        mask = [0 if (i % 2 and 2 <= j < 4) else 1 for j in range(L)]
        comp = Completion(toks, [-2.0 * m for m in mask], mask, "", "stop")
        out.append(Sample(prompt_ids=torch.randint(1, 64, (P,), generator=g).tolist(), completion=comp, gold="",
                          reward=float(i % 3 == 0) + 0.25 * i, loss_mask=list(mask)))
    return out


class CharTokenizer:
    """Enough of a tokenizer for prompt budgets: one token per character."""
    eos_token_id = 0

    def __call__(self, text):
        return SimpleNamespace(input_ids=[1 + ord(c) % 63 for c in text])


def one_step(case: str, run_dir: Path) -> tuple[Trainer, dict]:
    """Build a trainer for `case` and run prepare + update on this process's share of batch()."""
    tc = TrainConfig(prompt="{question}", prompts_per_step=2, n_samples=4, max_prompt_tokens=6, max_new_tokens=14,
                     micro_batch_tokens=20, max_tool_calls=0, lr=1e-3, grad_clip=1e3, eval_size=0,
                     tensorboard=False, run_dir=str(run_dir), run_name="dist",
                     save_every=0, seed=1, dtype="float32", **CASES[case])
    tok = CharTokenizer()
    t = Trainer(tc, model=tiny_model(), tokenizer=tok, problems=[Problem("p", "q", "1")], eval_problems=[])
    samples = batch()
    if t.dist.enabled:  # whole groups per rank
        samples = samples[4 * t.dist.rank:4 * t.dist.rank + 4]
    stats = {"groups_kept": 0, "dropped_overlong": 0, "dropped_repetitive": 0}
    for g in range(0, len(samples), 4):   # the group baseline, as collecting computes it
        keep_group(samples[g:g + 4], t.cfg, stats)
    t.prepare(samples)
    m = t.learner.update(samples, t.step)
    return t, m


def full_params(model, grads=False) -> dict:
    """Every parameter (or gradient: trained parameters only) whole."""
    from minitir.distributed import full_tensor
    return {n: full_tensor((p.grad if grads else p).detach()).clone() for n, p in model.named_parameters()
            if not grads or p.requires_grad}


def merged_params(model) -> dict:
    """The plain parameters the generator decodes with (adapters merged, shards gathered)."""
    from minitir import lora
    from minitir.distributed import full_tensor
    return {n: w.detach().clone() for n, w in lora.merged_weights(model, full_tensor)}


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory) -> Path:
    """Every case's step under one torchrun of 2 processes (starting them is most of the cost): CASE.pt."""
    out = tmp_path_factory.mktemp("dist")
    torchrun(["-m", "tests.test_distributed", "step", str(out)] + list(CASES))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_on_the_combined_batch(case, tmp_path, two_process_steps):
    dist = torch.load(two_process_steps / f"{case}.pt")
    t, m = one_step(case, tmp_path)
    try:
        single = full_params(t.learner.model)
        assert set(single) == set(dist["params"])
        moved = 0.0
        # AdamW's first step is nearly sign(grad) * lr, so compare the (clipped) gradients themselves too
        for n, g in full_params(t.learner.model, grads=True).items():
            torch.testing.assert_close(dist["grads"][n], g, atol=1e-6, rtol=1e-4, msg=n)
        for n, p in single.items():
            torch.testing.assert_close(dist["params"][n], p, atol=1e-5, rtol=0, msg=n)
        start = dict(tiny_model().named_parameters(remove_duplicate=False))
        for n, w in merged_params(t.learner.model).items():
            assert torch.equal(dist["decoder"][n], dist["merged"][n]), n  # refreshed after the update
            moved = max(moved, float((w - start[n].detach()).abs().max()))
        assert moved > 1e-4  # the step did change the weights
        if case == "ppo":
            crit = full_params(t.learner.critic)
            for n, p in crit.items():
                torch.testing.assert_close(dist["critic"][n], p, atol=1e-5, rtol=0, msg=n)
        for k in ("loss", "grad_norm", "clipfrac", "entropy", "kl", "value_loss"):
            if k in m:
                assert dist["metrics"][k] == pytest.approx(m[k], abs=1e-5), k
    finally:
        t.close()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, saved as a Hugging Face directory."""
    from transformers import AutoTokenizer
    from minitir.checkpoint import embedded_checkpoint, save_pretrained
    path = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(embedded_checkpoint())
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True, max_position_embeddings=512)
    save_pretrained(Transformer(cfg).init_weights(std=0.02, seed=0), tok, path)
    return path


def test_train_py_under_torchrun_resumes_across_rank_counts(tmp_path, tiny_checkpoint):
    """2 processes (steps 1-2) -> 1 process (step 3) -> 2 processes (step 4), one run directory; each run
    checkpoints at its last step."""
    import train
    flags = ["--model", str(tiny_checkpoint), "--prompts-per-step", "2", "--n-samples", "2",
             "--max-new-tokens", "16", "--max-prompt-tokens", "200", "--eval-size", "2", "--save-every", "0",
             "--run-dir", str(tmp_path / "runs"), "--run-name", "r", "--no-tensorboard", "--sandbox-workers", "1"]
    run = tmp_path / "runs" / "r"
    torchrun(["train.py"] + flags + ["--steps", "2"])
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == ["config.json", "heldout.jsonl", "metrics.jsonl",
                                                                     "samples.jsonl", "scaling.json", "scaling.png"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    train.main(["--resume", str(run), "--steps", "3"])
    torchrun(["train.py", "--resume", str(run), "--steps", "4"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]   # step 0: the held-out evaluation before training
    ck = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ck == ["step-000003", "step-000004"]  # keep_checkpoints = 2
    from transformers import AutoModelForCausalLM
    from minitir.checkpoint import load_model
    last = run / "checkpoints" / "step-000004"  # written by 2 processes
    hf = AutoModelForCausalLM.from_pretrained(last)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(hf(ids).logits, load_model(last)(ids), atol=1e-5, rtol=0)
    state = torch.load(last / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4 and "model.layers.0.mlp.up_proj.weight" in state["optimizer"]["state"]


def test_eval_py_shards_problems_and_matches_one_process(tmp_path, tiny_checkpoint):
    """Sampled (temperature 1) responses are the same with 1 and 2 ranks: sampling streams are global."""
    import eval as evaluate_cli
    from tests.conftest import DATA_DIR
    args = ["--model", str(tiny_checkpoint), "--benchmarks", "math500", "--data-dir", str(DATA_DIR), "--limit", "3",
            "--n-samples", "2", "--temperature", "1.0", "--max-new-tokens", "12", "--max-tool-calls", "0"]
    single = evaluate_cli.main(args + ["--out", str(tmp_path / "one")])
    torchrun(["eval.py"] + args + ["--out", str(tmp_path / "two")])
    one = (tmp_path / "one" / "samples.jsonl").read_text().splitlines()
    two = (tmp_path / "two" / "samples.jsonl").read_text().splitlines()
    assert len(one) == 6 and one == two
    assert json.loads((tmp_path / "two" / "summary.json").read_text()) == single


def _worker(case: str, out: Path):
    t, m = one_step(case, out.parent / f"workers-{case}")
    params, grads = full_params(t.learner.model), full_params(t.learner.model, grads=True)
    critic = full_params(t.learner.critic) if t.learner.critic is not None else None
    decoder = {n: p.clone() for n, p in t.learner.decoder().named_parameters(remove_duplicate=False)}  # its copy
    merged = merged_params(t.learner.model)
    if t.dist.main:
        torch.save({"params": params, "grads": grads, "critic": critic, "metrics": m, "decoder": decoder,
                    "merged": merged}, out)
    t.close()


if __name__ == "__main__":   # step OUT_DIR CASE...
    assert sys.argv[1] == "step"
    torch.set_num_threads(1)
    for name in sys.argv[3:]:   # one Trainer after another in one process group
        _worker(name, Path(sys.argv[2]) / f"{name}.pt")
