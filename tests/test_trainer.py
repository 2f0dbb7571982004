"""The trainer end to end: tool use emerging from outcome reward alone, exact resume, crash-safe
checkpoints, input errors before the first step, and one real cpu-default step."""
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minitir.model import ModelConfig, Transformer
from minitir.tasks import Problem
from minitir.trainer import ConfigError, TrainConfig, Trainer

CODE = "```python\nprint('\\\\boxed{42}')\n```"


class ToyTokenizer:
    """Whole-string tokens with greedy longest-match encoding. Token 1 is a complete code block: calling
    the tool is one action, which a random policy takes rarely."""

    def __init__(self):
        fixed = ["<eos>", CODE, "```output\n", "\n```\n", "\\boxed{", "}", "\n", " "] + list("0123456789")
        self.vocab = fixed + [f"w{i} " for i in range(200 - len(fixed))]
        self.index = {s: i for i, s in enumerate(self.vocab)}
        self.by_length = sorted(self.vocab, key=len, reverse=True)
        self.eos_token_id, self.eos_token, self.chat_template = 0, "<eos>", None

    def __len__(self):
        return len(self.vocab)

    def encode(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            tok = next((t for t in self.by_length if text.startswith(t, i)), None)
            if tok is None:  # unknown character: a filler token (only tool output can contain one)
                ids.append(self.index["w0 "])
                i += 1
            else:
                ids.append(self.index[tok])
                i += len(tok)
        return ids

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)

    def __call__(self, text):
        return SimpleNamespace(input_ids=self.encode(text))

    def save_pretrained(self, path):
        Path(path, "toy_vocab.json").write_text(json.dumps(self.vocab))


def toy_setup(tmp_path, steps, run_name="toy", **overrides):
    tok = ToyTokenizer()
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      eos_token_id=0, tie_word_embeddings=False)
    model = Transformer(cfg).init_weights(std=0.02, seed=0)
    problems = [Problem(f"p{i}", f"w{i % 150} w{(7 * i) % 150} ", "42") for i in range(64)]
    tc = TrainConfig(prompt="{question}", prompts_per_step=8, n_samples=8, max_new_tokens=12,
                     max_prompt_tokens=8, max_tool_calls=1, max_tool_output_tokens=16, lr=2e-2, steps=steps,
                     eval_size=0, run_dir=str(tmp_path), run_name=run_name, save_every=0, tensorboard=False,
                     micro_batch_tokens=512, checkpointing="none", sandbox_workers=1, seed=3)
    for k, v in overrides.items():
        setattr(tc, k, v)
    return tc, model, tok, problems


def test_tool_use_emerges_from_outcome_reward(tmp_path):
    """The paper's phenomenon in miniature: the answer (42) appears only in the tool's output, a random
    policy rarely calls the tool, and GRPO on the correctness reward alone must make it call the tool."""
    tc, model, tok, problems = toy_setup(tmp_path, steps=16)
    t = time.time()
    trainer = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        history = [trainer.train_step() for _ in range(tc.steps)]
    finally:
        trainer.close()
    first, last = history[0], history[-1]
    assert first["code_ratio"] < 0.3 and first["accuracy"] < 0.3
    assert last["code_ratio"] >= 0.9 and last["accuracy"] >= 0.9, [(m["code_ratio"], m["accuracy"]) for m in history]
    assert time.time() - t < 60
    lines = (Path(tmp_path) / "toy" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == tc.steps and {"code_ratio", "response_length", "entropy", "time/tools_s"} <= set(json.loads(lines[0]))


def _strip(m):
    """Metrics that must repeat exactly. Timings do not; nor, in the last bits, the generator log-probs:
    which rows decode together depends on when tool calls return, and batch shape moves float rounding."""
    return {k: (round(v, 5) if k.startswith("logprob_gap") else v) for k, v in m.items()
            if not k.startswith("time/") and k != "tokens_per_s"}


def test_exact_resume_and_crash_while_saving(tmp_path, monkeypatch):
    tc, model, tok, problems = toy_setup(tmp_path, steps=4, run_name="straight")
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    straight = [_strip(t.train_step()) for _ in range(4)]
    t.close()

    tc, model, tok, problems = toy_setup(tmp_path, steps=4, run_name="stopped", save_every=2)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    first = [_strip(t.train_step()) for _ in range(3)]   # step 3 runs, its checkpoint is not due
    # the process dies while writing the step-4 checkpoint: the step-2 checkpoint must stay usable
    import minitir.trainer as trainer_mod
    real_save = trainer_mod.torch.save

    def dying_save(obj, path):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(trainer_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        t.train_step()
    monkeypatch.setattr(trainer_mod.torch, "save", real_save)
    t.close()
    ck = Path(tmp_path) / "stopped" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == [".tmp-step-000004", "step-000002"]

    tc, model, tok, problems = toy_setup(tmp_path, steps=4, run_name="stopped", save_every=2)
    fresh = Transformer(model.config).init_weights(seed=99)  # weights must come from the checkpoint
    t = Trainer(tc, model=fresh, tokenizer=tok, problems=problems, eval_problems=[],
                resume=str(Path(tmp_path) / "stopped"))
    assert t.step == 2
    resumed = [_strip(t.train_step()) for _ in range(2)]
    t.close()
    assert first[:2] == straight[:2]
    assert resumed == straight[2:]
    logged = [json.loads(l)["step"] for l in (Path(tmp_path) / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_first_update_ratio_is_one_and_masked_tokens_get_no_gradient(tmp_path):
    tc, model, tok, problems = toy_setup(tmp_path, steps=1, ppo_epochs=2, mini_batches=2)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        kept, _, _ = t._sample_groups({"generate": 0.0, "grade": 0.0})
        m = {}
        t._prepare(kept, m)
        s = kept[0]
        logp, _, _ = t._forward(t.model, [s], with_entropy=False)
        assert torch.allclose(logp, torch.tensor(s.old_logp), atol=1e-5)   # ratio 1 before any update
        # tokens outside loss_mask (prompt, tool output) never reach the loss: the gradient of a loss over
        # the policy tokens w.r.t. the embeddings of masked-only token ids stays exactly zero
        with_tool = next((x for x in kept if 0 in x.completion.policy_mask), None)
        if with_tool is not None:
            model.zero_grad()
            lp, _, _ = t._forward(t.model, [with_tool], with_entropy=False)
            assert lp.shape[0] == sum(with_tool.loss_mask)
    finally:
        t.close()


def test_update_gradient_equals_the_loss_on_unfused_logprobs(tmp_path):
    """The update takes the loss's gradient inside the head's forward (token_loss); it must equal autograd
    through plain log-probs and the rl.py formulas: clipped and dual-clipped ratios, k3 KL, entropy bonus,
    per-sequence aggregation, several micro-batches."""
    from minitir import rl
    tc, model, tok, problems = toy_setup(tmp_path, steps=1, ppo_epochs=2, kl_coef=0.5, entropy_coef=0.5,
                                         dual_clip=3.0, loss_agg="seq_mean_token_mean", grad_clip=1e9,
                                         micro_batch_tokens=256)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        kept, _, _ = t._sample_groups({"generate": 0.0, "grade": 0.0})
        t._prepare(kept, {})
        g = torch.Generator().manual_seed(0)
        for s in kept:   # ratios away from 1 (some clipped), a reference that differs, advantages of both signs
            n = len(s.old_logp)
            s.old_logp = (torch.tensor(s.old_logp) + 0.4 * torch.randn(n, generator=g)).tolist()
            s.ref_logp = (torch.tensor(s.ref_logp) + 0.3 * torch.randn(n, generator=g)).tolist()
            s.adv = (2 * torch.randn(n, generator=g)).tolist()
        assert len(t._micro_batches(kept)) > 1
        logp, ent, seq = t._forward(t.model, kept, with_entropy=True)
        cat = lambda key: torch.tensor([v for s in kept for v in getattr(s, key)])
        tok_loss, _ = rl.policy_loss(logp, cat("old_logp"), cat("adv"), tc.clip_low, tc.clip_high, tc.dual_clip)
        tok_loss = tok_loss + tc.kl_coef * rl.kl_estimate(logp, cat("ref_logp"), tc.kl_estimator) - tc.entropy_coef * ent
        w = rl.token_weights(torch.ones(len(seq)), seq, len(kept), tc.loss_agg)
        model.zero_grad()
        (tok_loss * w).sum().backward()
        want = [p.grad.clone() for p in model.parameters()]
        t.cfg.ppo_epochs = 1
        t._update(kept, {})   # one optimizer step; the gradients it stepped on stay in .grad
        got = [p.grad for p in model.parameters()]
        for a, b in zip(got, want):
            assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))
    finally:
        t.close()


def test_config_errors_before_first_step(tmp_path):
    with pytest.raises(ConfigError, match="micro-batch-tokens 100 cannot hold"):
        Trainer(TrainConfig(micro_batch_tokens=100, run_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="bfloat16 needs a CUDA GPU"):
        Trainer(TrainConfig(dtype="bfloat16", device="cpu", run_dir=str(tmp_path)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{"text": "no question"}\n')
    from minitir.tasks import DatasetError
    with pytest.raises(DatasetError, match="bad.jsonl:2: field 'problem/question/prompt' is missing"):
        Trainer(TrainConfig(data=str(bad), run_dir=str(tmp_path)))


def test_one_cpu_default_step_end_to_end(tmp_path):
    """The real thing, shrunk: SmolLM2-135M, the real sandbox and grader, the synthetic task."""
    import train
    cfg, _ = train.parse(["--steps", "1", "--prompts-per-step", "1", "--n-samples", "2", "--max-new-tokens", "48",
                          "--eval-size", "1", "--run-dir", str(tmp_path), "--run-name", "e2e", "--no-tensorboard"])
    assert cfg.model == "smollm2-135m" and cfg.data == "synthetic"
    t = Trainer(cfg)
    try:
        m = t.train_step()
    finally:
        t.close()
    for k in ("reward", "accuracy", "code_ratio", "response_length", "entropy", "grad_norm", "logprob_gap_mean",
              "eval/accuracy", "time/generate_s", "time/train_s"):
        assert k in m
    assert m["logprob_gap_mean"] < 1e-3   # the generator's and the trainer's log-probs agree
    from transformers import AutoModelForCausalLM
    ck = Path(tmp_path) / "e2e" / "checkpoints" / "step-000001"
    assert AutoModelForCausalLM.from_pretrained(ck) is not None and (ck / "trainer_state.pt").exists()


@pytest.mark.parametrize("algo,extra", [("dr_grpo", {"loss_agg": "seq_mean_token_sum_norm"}),
                                        ("rloo", {"loss_agg": "seq_mean_token_mean", "entropy_coef": 0.01}),
                                        ("reinforce_pp", {"kl_coef": 0.05, "kl_in_reward": True}),
                                        ("grpo", {"kl_coef": 0.05, "dual_clip": 3.0, "filter_groups": True,
                                                  "filter_min_acc": 0.0, "filter_max_acc": 1.0}),
                                        ("ppo", {"ppo_epochs": 2, "mini_batches": 2, "critic_lr": 1e-2})])
def test_every_algorithm_runs_and_updates(tmp_path, algo, extra):
    tc, model, tok, problems = toy_setup(tmp_path, steps=2, algo=algo, **extra)
    before = [p.detach().clone() for p in model.parameters()]
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        ms = [t.train_step() for _ in range(2)]
    finally:
        t.close()
    for m in ms:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    if algo == "ppo":
        assert "value_loss" in ms[-1]
    if tc.kl_coef:
        assert "kl" in ms[-1]
    changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed or all(m["grad_norm"] == 0 for m in ms)
