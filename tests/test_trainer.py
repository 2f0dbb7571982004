"""The trainer end to end on a toy task (tool use emerging on the real path is tests/test_miniature.py): exact
resume, crash-safe checkpoints, the update's bookkeeping against hand computations, input errors before the
first step, and one real step of the embedded SmolLM2."""
import json
import math
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minitir.sample import Completion
from minitir.model import ModelConfig, Transformer
from minitir.tasks import Problem
from minitir.config import ConfigError, TrainConfig
from minitir.sample import Sample
from minitir.trainer import Trainer, keep_group

ROOT = Path(__file__).resolve().parents[1]

CODE_OPEN, CODE_CLOSE = "```python\nprint(", ")\n```"
ANS_OPEN, ANS_CLOSE = "</think> <answer>\\boxed{", "}</answer>"


class ToyTokenizer:
    """Whole-string tokens with greedy longest-match encoding: digits, '*', the code block's opening and
    closing, the output block's pieces, the answer's opening and closing, and filler words."""

    def __init__(self):
        fixed = ["<eos>", CODE_OPEN, CODE_CLOSE, "```output\n", "\n```\n\n\n", ANS_OPEN, ANS_CLOSE, "\n", " ",
                 "*", "="] + list("0123456789")
        self.vocab = fixed + [f"w{i} " for i in range(64 - len(fixed))]
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


def toy_problems(n, seed=0):
    """Products of a two-digit and a one-digit number: too many to memorise in a few steps."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        a, b = r.randrange(10, 100), r.randrange(2, 10)
        out.append(Problem(f"p{i}", f"{a}*{b}=", str(a * b)))
    return out


def warm_up(model, tok, problems, tool_share=0.15, steps=1000, seed=0):
    """A base model in miniature: next-token training on responses in the strict format that mostly guess
    the product directly and sometimes write it as code, read the output and copy it into the answer:
    a model that can, but rarely does, use the tool, as the paper's base models."""
    r = random.Random(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, foreach=True)   # the same bits as the loop, ~1.3x faster

    def response(p):
        a, b = p.question.rstrip("=").split("*")
        if r.random() < tool_share:
            return CODE_OPEN + f"{a}*{b}" + CODE_CLOSE + f"\n```output\n{p.answer}\n```\n\n\n" + ANS_OPEN + p.answer + ANS_CLOSE
        return ANS_OPEN + str(r.randrange(20, 900)) + ANS_CLOSE

    known = {}
    encode = lambda text: known[text] if text in known else known.setdefault(text, tok.encode(text))
    for _ in range(steps):
        docs = [(encode(p.question), encode(response(p))) for p in r.sample(problems, 32)]
        T = max(len(q) + len(a) for q, a in docs)
        ids = torch.zeros(len(docs), T, dtype=torch.long)
        target = torch.full((len(docs), T), -100)
        for b, (q, a) in enumerate(docs):
            ids[b, :len(q) + len(a)] = torch.tensor(q + a)
            target[b, len(q) - 1:len(q) + len(a) - 1] = torch.tensor(a)
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


_WARM = {}


def toy_setup(tmp_path, steps, run_name="toy", warm=False, **overrides):
    """(config, model, tokenizer, problems) of the toy task; warm=True starts from the warmed-up base model
    (trained once per test session)."""
    tok = ToyTokenizer()
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      eos_token_id=0, tie_word_embeddings=False)
    model = Transformer(cfg).init_weights(std=0.02, seed=0)
    problems = toy_problems(512)
    if warm:
        if "state" not in _WARM:
            _WARM["state"] = {k: v.clone() for k, v in warm_up(model, tok, problems).state_dict().items()}
        model.load_state_dict(_WARM["state"])
    tc = TrainConfig(prompt="{question}", prompts_per_step=8, n_samples=8, max_new_tokens=24,
                     max_prompt_tokens=8, max_tool_calls=1, max_tool_output_tokens=16, lr=5e-3, steps=steps,
                     eval_size=0, run_dir=str(tmp_path), run_name=run_name, save_every=0, tensorboard=False,
                     micro_batch_tokens=512, checkpointing="none", sandbox_workers=1, seed=3, dtype="float32")
    for k, v in overrides.items():
        setattr(tc, k, v)
    return tc, model, tok, problems


def _strip(m):
    """Metrics that must repeat exactly: all but the timings."""
    return {k: v for k, v in m.items() if not k.startswith("time/") and k != "tokens_per_s"}


class FakeSummaryWriter:
    """TensorBoard's SummaryWriter as the run log uses it: each writer appends a new event file."""

    def __init__(self, log_dir):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.f = open(Path(log_dir) / f"events.{time.time_ns()}", "w", buffering=1)

    def add_scalar(self, key, value, step):
        self.f.write(json.dumps([step, key, value]) + "\n")

    def close(self):
        self.f.close()


def logs(run: Path) -> dict:
    """Every log of a run, as a reader sees it (timings aside)."""
    keep = _strip
    events = [json.loads(ln) for f in sorted((run / "tb").glob("events.*")) for ln in f.read_text().splitlines()]
    return {"metrics": [keep(json.loads(ln)) for ln in (run / "metrics.jsonl").read_text().splitlines()],
            "samples": (run / "samples.jsonl").read_text().splitlines(),
            "tensorboard": sorted(tuple(e) for e in events if e[1] in keep({e[1]: e[2]}))}


def test_exact_resume_and_crash_while_saving(tmp_path, monkeypatch):
    """A run stopped by a crash while writing its step-4 checkpoint resumes from step 2 with the samples it
    carried over there, and ends with every log (metrics, samples, TensorBoard) as the straight run's."""
    import sys
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    shaped = lambda text, gold, info: float(len(text) % 3)
    setup = dict(steps=4, warm=True, max_new_tokens=8, filter_overlong=True, carry_over=True, max_refill_rounds=4,
                 tensorboard=True, log_samples=3)
    tc, model, tok, problems = toy_setup(tmp_path, run_name="straight", **setup)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[], reward_fn=shaped)
    straight = [_strip(t.train_step()) for _ in range(4)]
    weights = {k: v.clone() for k, v in t.learner.model.state_dict().items()}
    t.log.close()
    t.close()
    assert straight[1]["carried_out"] > 0 and straight[2]["carried_in"] == straight[1]["carried_out"]

    tc, model, tok, problems = toy_setup(tmp_path, run_name="stopped", save_every=2, **setup)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[], reward_fn=shaped)
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

    tc, model, tok, problems = toy_setup(tmp_path, run_name="stopped", save_every=2, **setup)
    fresh = Transformer(model.config).init_weights(seed=99)  # weights must come from the checkpoint
    t = Trainer(tc, model=fresh, tokenizer=tok, problems=problems, eval_problems=[], reward_fn=shaped,
                resume=str(Path(tmp_path) / "stopped"))
    assert t.step == 2
    resumed = [_strip(t.train_step()) for _ in range(2)]
    t.log.close()
    t.close()
    assert first[:2] == straight[:2]
    assert resumed == straight[2:]
    assert logs(Path(tmp_path) / "stopped") == logs(Path(tmp_path) / "straight")
    assert all(torch.equal(w, weights[k]) for k, w in t.learner.model.state_dict().items())


def rollouts_with_tool_output(tmp_path, **overrides):
    """A trainer on the warmed-up toy model and one step's graded samples from its real path (generator,
    sandbox, grader); some of them called the tool."""
    tc, model, tok, problems = toy_setup(tmp_path, steps=1, warm=True, **overrides)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    kept, _, _ = t.collect({"generate": 0.0, "grade": 0.0})
    with_tool = [s for s in kept if 0 in s.completion.policy_mask]
    assert len(with_tool) >= 2, "the rollouts must contain tool output for this test to mean anything"
    return t, kept, with_tool


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_logprobs_equal_the_generators_on_rollouts_with_tool_output(tmp_path, temperature):
    """The trainer's packed forward must give, at every policy token, the log-prob the generator sampled it
    with (float32, at the sampling temperature): a shifted hidden-state alignment, a tool token in the loss
    or log-probs taken at another temperature break this."""
    t, kept, with_tool = rollouts_with_tool_output(tmp_path, temperature=temperature)
    try:
        for s in kept:
            assert s.loss_mask == s.completion.policy_mask     # the environment's tokens are not the policy's
        logp, _, seq = t.learner.logprobs(t.learner.model, with_tool)
        gen = torch.tensor([lp for s in with_tool for lp, k in zip(s.completion.logprobs, s.loss_mask) if k])
        assert logp.shape == gen.shape
        assert torch.equal(logp, gen)     # the same bits: batch invariance (attention.block_attention)
    finally:
        t.close()


def test_tool_output_tokens_get_no_gradient(tmp_path):
    """Through the trainer's real update: a response cut right after its tool output gives the same
    parameter gradients whatever the tool-output token ids are (they are only inputs to nothing and
    targets of no loss), and every parameter gradient is unchanged."""
    t, kept, with_tool = rollouts_with_tool_output(tmp_path, grad_clip=1e9, lr=0.0)   # weights stay put
    try:
        s = with_tool[0]
        c = s.completion
        end = max(i for i, k in enumerate(s.loss_mask) if k == 0) + 1     # up to the last tool token

        def grads(tool_ids):
            toks = [tool_ids.pop(0) if k == 0 else x for x, k in zip(c.tokens[:end], s.loss_mask[:end])]
            cut = Sample(prompt_ids=s.prompt_ids, gold=s.gold, completion=Completion(
                toks, c.logprobs[:end], c.policy_mask[:end], "", "length"), loss_mask=s.loss_mask[:end], outcome_adv=1.0)
            t.learner.model.zero_grad()
            t.prepare([cut])
            t.learner.update([cut], t.step)
            return [p.grad.clone() for p in t.learner.model.parameters()]

        n_tool = end - sum(s.loss_mask[:end])
        real = grads([x for x, k in zip(c.tokens[:end], s.loss_mask[:end]) if k == 0])
        other = grads([(7 * i + 3) % 40 + 20 for i in range(n_tool)])
        assert any(float(g.abs().max()) > 0 for g in real)
        for a, b in zip(real, other):
            assert torch.equal(a, b)
    finally:
        t.close()


@pytest.mark.quick
def test_update_gradient_equals_the_loss_on_unfused_logprobs(tmp_path):
    """The update takes the loss's gradient inside the head's forward (token_loss); it must equal autograd
    through plain log-probs and the rl.py formulas: clipped and dual-clipped ratios, k3 KL, entropy bonus,
    per-sequence aggregation over the sequences holding loss tokens, truncated importance weights against the
    generator's log-probs, several micro-batches, log-probs at the sampling temperature."""
    from minitir import rl
    tc, model, tok, problems = toy_setup(tmp_path, steps=1, ppo_epochs=2, kl_coef=0.5, entropy_coef=0.5,
                                         dual_clip=3.0, loss_agg="seq_mean_token_mean", grad_clip=1e9,
                                         micro_batch_tokens=256, tis_cap=1.5, temperature=0.7)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        kept, _, _ = t.collect({"generate": 0.0, "grade": 0.0})
        t.prepare(kept)
        g = torch.Generator().manual_seed(0)
        for s in kept:   # ratios away from 1 (some clipped), a reference that differs, advantages of both signs
            n = len(s.old_logp)
            s.old_logp = (torch.tensor(s.old_logp) + 0.4 * torch.randn(n, generator=g)).tolist()
            s.ref_logp = (torch.tensor(s.ref_logp) + 0.3 * torch.randn(n, generator=g)).tolist()
            s.adv = (2 * torch.randn(n, generator=g)).tolist()
        assert len(t.learner.micro_batches(kept)) > 1
        masked = kept[0]   # a response masked out of the loss (e.g. mask_truncated) is not a sequence of it
        masked.loss_mask, masked.old_logp, masked.ref_logp, masked.adv = [0] * len(masked.loss_mask), [], [], []
        logp, ent, seq = t.learner.logprobs(t.learner.model, kept, with_entropy=True)
        cat = lambda key: torch.tensor([v for s in kept for v in getattr(s, key)])
        tok_loss, _ = rl.policy_loss(logp, cat("old_logp"), cat("adv"), tc.clip_low, tc.clip_high, tc.dual_clip)
        gen = torch.tensor([lp for s in kept for lp, k in zip(s.completion.logprobs, s.loss_mask) if k])
        is_w = torch.exp(cat("old_logp") - gen).clamp(max=1.5)          # pi_old / pi_generator, truncated
        assert 0 < float((is_w == 1.5).float().mean()) < 1                # some weights are capped
        tok_loss = tok_loss * is_w + tc.kl_coef * rl.kl_estimate(logp, cat("ref_logp"), tc.kl_estimator) - tc.entropy_coef * ent
        w = rl.token_weights(torch.ones(len(seq)), seq, len(kept) - 1, tc.loss_agg)
        model.zero_grad()
        (tok_loss * w).sum().backward()
        want = [p.grad.clone() for p in model.parameters()]
        t.cfg.ppo_epochs = 1
        t.learner.update(kept, t.step)   # one optimizer step; the gradients it stepped on stay in .grad
        got = [p.grad for p in model.parameters()]
        for a, b in zip(got, want):
            assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))
    finally:
        t.close()


def test_update_packs_each_groups_prompt_once(tmp_path, monkeypatch):
    """The update shuffles which samples go into which optimizer step, but packs each step's samples in group
    order, so every micro-batch computes a group's prompt once, not once per response."""
    from minitir import batching
    tc, model, tok, problems = toy_setup(tmp_path, steps=1, mini_batches=2, ppo_epochs=2)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    packed = []
    pack = batching.pack
    monkeypatch.setattr(batching, "pack", lambda samples, device: packed.append(samples) or pack(samples, device))
    try:
        kept, _, _ = t.collect({"generate": 0.0, "grade": 0.0})
        t.prepare(kept)
        t.learner.update(kept, t.step)
    finally:
        t.close()
    assert len(packed) >= 4
    for samples in packed:   # as many prompt sequences as distinct prompts in the micro-batch
        assert pack(samples, "cpu").continues.count(-1) == len({tuple(s.prompt_ids) for s in samples})


def test_paper_filters_drop_and_carry_over(tmp_path):
    """filter_overlong drops responses cut at the length limit, filter_repetition drops correct responses
    above the threshold, and carry_over fills exactly one batch with the survivors and keeps the rest
    for the next step, which uses them first."""
    tc, model, tok, problems = toy_setup(tmp_path, steps=2, max_new_tokens=8, filter_overlong=True,
                                         carry_over=True, max_refill_rounds=4, warm=True)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        timing = {"generate": 0.0, "grade": 0.0}
        kept, sampled, stats = t.collect(timing)
        cut = [s for s in sampled if s.completion.finish_reason == "length"]
        assert cut and stats["dropped_overlong"] == len(cut)         # a code block never fits in 8 tokens
        assert not any(s.completion.finish_reason == "length" for s in kept)
        assert len(kept) == tc.prompts_per_step * tc.n_samples and stats["groups_sampled"] > tc.prompts_per_step
        carried = list(t.carry)
        assert stats["carried_out"] == len(carried) > 0
        kept2, _, stats2 = t.collect(timing)
        assert stats2["carried_in"] == len(carried) and kept2[:len(carried)] == carried
        t.cfg.filter_overlong, t.cfg.filter_repetition, t.cfg.carry_over, t.cfg.max_new_tokens = False, 1e-9, False, 24
        t.carry = []
        kept3, sampled3, stats3 = t.collect(timing)
        assert stats3["dropped_repetitive"] > 0 and not any(s.correct for s in kept3)   # every correct one repeats a bit
    finally:
        t.close()


def test_grade_errors_are_counted_and_kept_out_of_the_statistics(tmp_path):
    """A check the grader could not make is neither wrong nor right: the sample is left out of its group's
    baseline and of the loss, and counted in grade_errors; accuracy is over the graded ones."""
    from minitir import rl
    tc, model, tok, problems = toy_setup(tmp_path, steps=1, warm=True)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        real = t.grader.math_equal_many
        t.grader.math_equal_many = lambda pairs: [None if i % 4 == 0 else v for i, v in enumerate(real(pairs))]
        m = t.train_step()
        assert m["grade_errors"] == tc.prompts_per_step * tc.n_samples // 4
        kept, sampled, _ = t.collect({"generate": 0.0, "grade": 0.0})
        lost = [s for s in sampled if not s.graded]
        assert lost and all(s.outcome_adv == 0 and not any(s.loss_mask) for s in lost) and not set(map(id, lost)) & set(map(id, kept))
        group = sampled[:tc.n_samples]
        valid = torch.tensor([[s.graded for s in group]])
        want = rl.group_advantages(torch.tensor([[s.reward for s in group]]), "grpo", valid)[0]
        assert [s.outcome_adv for s in group] == pytest.approx(want.tolist())
    finally:
        t.close()


def test_sandbox_failures_are_counted_and_kept_out_of_the_statistics(tmp_path):
    """A response whose code the sandbox failed to run (not the code's error) says nothing about the policy:
    it is counted in tool_failures (not in grade_errors), ungraded and incorrect, and left out of its group's
    baseline and of the loss."""
    from concurrent.futures import Future
    from minitir.sandbox import ExecResult
    tc, model, tok, problems = toy_setup(tmp_path, steps=1, warm=True)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        real, calls = t.tool.tool, []

        class Flaky:   # every other run: the sandbox fails (the engine submits to a sandbox's own queue)
            def submit(self, code):
                calls.append(code)
                if len(calls) % 2 == 0:
                    return real.submit(code)
                failed = Future()
                failed.set_result(ExecResult("sandbox_error", stderr="sandbox worker died"))
                return failed

            def close(self):
                real.close()

        t.tool.tool = Flaky()
        kept, sampled, _ = t.collect({"generate": 0.0, "grade": 0.0})
        failed = [s for s in sampled if s.completion.num_tool_failures]
        assert failed and all(not s.graded and not s.correct and s.outcome_adv == 0 and not any(s.loss_mask) for s in failed)
        assert not set(map(id, failed)) & set(map(id, kept))
        m = t.train_step()
        assert m["tool_failures"] > 0 and m["grade_errors"] == 0
    finally:
        t.close()


def test_void_turns_are_masked_but_counted(tmp_path):
    t, kept, _ = rollouts_with_tool_output(tmp_path, mask_void_turns=True, max_new_tokens=10)
    try:
        void = [s for s in kept if s.completion.finish_reason == "length"]   # cut before any answer
        assert void and all(not any(s.loss_mask) for s in void)
        answered = [s for s in kept if s.format_ok and s.completion.num_tool_calls == 0]
        assert all(s.loss_mask == s.completion.policy_mask for s in answered)
    finally:
        t.close()


@pytest.mark.quick
@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.json")))
def test_every_preset_loads_and_validates(name):
    import train
    from minitir.config import validate
    cfg, _ = train.parse(["--config", name])
    validate(cfg)
    assert cfg.reward == "strict" and cfg.prompt == "zero_tir"


def test_paper_preset_is_the_papers_protocol(tmp_path):
    """configs/zerotir-7b.json against the paper's run (train_grpo_ray_hybrid_engine_agent_tir_clean.sh and
    the code it runs), and wired through: the trainer's optimizer and schedule are the paper's."""
    import train
    cfg, _ = train.parse(["--config", "zerotir-7b"])
    assert (cfg.algo, cfg.prompts_per_step, cfg.n_samples, cfg.ppo_epochs, cfg.mini_batches) == ("reinforce_pp", 128, 16, 1, 1)
    assert (cfg.lr, cfg.warmup_steps, cfg.lr_schedule, tuple(cfg.adam_betas)) == (1e-6, 0, "constant", (0.9, 0.95))
    assert (cfg.clip_low, cfg.clip_high, cfg.loss_agg, cfg.temperature, cfg.top_p) == (0.2, 0.28, "token_mean", 1.0, 1.0)
    assert (cfg.max_prompt_tokens, cfg.max_new_tokens, cfg.max_tool_calls, cfg.max_tool_output_tokens) == (1024, 8192, 2, 256)
    assert (cfg.filter_groups, cfg.filter_min_acc, cfg.filter_max_acc) == (True, 1 / 16, 0.75)   # 0 < acc < 0.8
    assert (cfg.filter_overlong, cfg.filter_repetition, cfg.carry_over) == (True, 0.05, True)
    for name in ("qwen2.5-1.5b-grpo", "qwen2.5-1.5b-ppo", "qwen2.5-7b-grpo"):   # the same protocol, scaled
        other, _ = train.parse(["--config", name])
        assert (other.mini_batches, other.warmup_steps, tuple(other.adam_betas), other.filter_overlong,
                other.carry_over, other.max_tool_output_tokens, other.tis_cap) == (1, 0, (0.9, 0.95), True, True, 256, 2.0)
    assert cfg.tis_cap == 2.0   # beyond the paper's run as published: the generator decodes a bfloat16 copy
    _, model, tok, problems = toy_setup(tmp_path, steps=1)
    cfg.run_dir, cfg.tensorboard, cfg.max_new_tokens, cfg.micro_batch_tokens = str(tmp_path), False, 24, 1048
    t = Trainer(cfg, model=model, tokenizer=tok, problems=problems[:8], eval_problems=[], tool=lambda code: "")
    try:
        assert t.learner.opt.param_groups[0]["betas"] == (0.9, 0.95) and t.learner.sched.get_last_lr() == [1e-6]
    finally:
        t.close()


@pytest.mark.quick
def test_auto_precision_is_bfloat16_where_the_cpu_multiplies_it_natively(monkeypatch):
    from minitir.config import compute_dtype
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        assert compute_dtype("auto", torch.device("cpu")) == want
        assert compute_dtype("bfloat16", torch.device("cpu")) == "bfloat16"   # asked for: the recipe anyway
    assert compute_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert compute_dtype("float32", torch.device("cuda")) == "float32"


@pytest.mark.quick
def test_config_errors_before_first_step(tmp_path):
    with pytest.raises(ConfigError, match="micro-batch-tokens 100 cannot hold"):
        Trainer(TrainConfig(micro_batch_tokens=100, run_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="--lora-targets q_proj,wq"):
        Trainer(TrainConfig(lora_rank=4, lora_targets="q_proj,wq", run_dir=str(tmp_path)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{"text": "no question"}\n')
    from minitir.tasks import DatasetError
    with pytest.raises(DatasetError, match="bad.jsonl:2: field 'problem/question/prompt' is missing"):
        Trainer(TrainConfig(data=str(bad), run_dir=str(tmp_path)))


def test_one_smollm2_step_end_to_end(tmp_path):
    """The real thing, shrunk: SmolLM2-135M, the real sandbox and grader, the synthetic task."""
    import train
    cfg, _ = train.parse(["--model", "smollm2-135m", "--steps", "1", "--prompts-per-step", "1", "--n-samples", "2", "--max-new-tokens", "48",
                          "--eval-size", "1", "--run-dir", str(tmp_path), "--run-name", "e2e", "--no-tensorboard"])
    assert cfg.model == "smollm2-135m" and cfg.data == "synthetic"
    t = Trainer(cfg)
    try:
        m = t.train_step()
    finally:
        t.close()
    for k in ("reward", "accuracy", "code_ratio", "response_length", "entropy", "grad_norm", "logprob_gap_mean",
              "eval/accuracy", "eval/format_failure_rate", "time/generate_s", "time/train_s", "time/score_s"):
        assert k in m
    # the default precision (bfloat16 where the CPU multiplies it natively): the bfloat16 decode copy and the
    # float32 masters under autocast differ by rounding, ~0.04 nats per token (docs/gpu.md); float32: they agree
    from minitir.config import compute_dtype
    assert m["logprob_gap_mean"] < (1e-3 if compute_dtype(cfg.dtype, t.device) == "float32" else 0.1)
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
    _runs_and_updates(tmp_path, algo, extra, "float32")


def test_ppo_runs_and_updates_in_bfloat16(tmp_path):
    """The bfloat16 recipe through the critic and GAE (GRPO's path: test_bfloat16_runs_the_gpu_recipe_on_a_cpu)."""
    _runs_and_updates(tmp_path, "ppo", {"ppo_epochs": 2, "mini_batches": 2, "critic_lr": 1e-2}, "bfloat16")


def _runs_and_updates(tmp_path, algo, extra, dtype):
    tc, model, tok, problems = toy_setup(tmp_path, steps=2, algo=algo, dtype=dtype, **extra)
    before = [p.detach().clone() for p in model.parameters()]
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        ms = [t.train_step() for _ in range(2)]
    finally:
        t.close()
    for m in ms:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    if algo == "ppo":
        assert "value_loss" in ms[-1] and t.learner.critic.value_head.weight.dtype == torch.float32
    if tc.kl_coef:
        assert "kl" in ms[-1]
    changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed or all(m["grad_norm"] == 0 for m in ms)


# ------------------------------------------------------------------------------------------------
# the update's bookkeeping, each against a hand computation through the trainer's own path
# ------------------------------------------------------------------------------------------------
def constructed(tok, question, segments, finish="stop", gold="12", seed=0):
    """A sample from text segments [(text, written by the policy?)]: tool segments get policy mask 0 and
    log-prob 0, the model's get made-up log-probs; text and policy_text as the generator sets them."""
    g = torch.Generator().manual_seed(seed)
    tokens, mask = [], []
    for text, mine in segments:
        ids = tok.encode(text)
        tokens, mask = tokens + ids, mask + [int(mine)] * len(ids)
    logprobs = [float(-torch.rand(1, generator=g)) if m else 0.0 for m in mask]
    c = Completion(tokens, logprobs, mask, "".join(t for t, _ in segments), finish,
                   num_tool_calls=sum(not m for _, m in segments), policy_text="".join(t for t, m in segments if m))
    return Sample(prompt_ids=tok.encode(question), completion=c, gold=gold, question=question)


@pytest.mark.quick
def test_one_reward_path_for_training_and_zero_tir_reward(tmp_path):
    """The trainer's reward step and the public zero_tir_reward are one implementation: the same responses
    get the same rewards, including a \\boxed only the tool printed (before and after </think>), a response
    cut at the length limit, format failures, a wrong answer, and a check the grader could not make
    (ungraded in training, GradeError from zero_tir_reward)."""
    from minitir.reward import GradeError, zero_tir_reward
    tc, model, tok, problems = toy_setup(tmp_path, steps=1)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[], tool=lambda code: "")
    code, out = "```python\nprint(12)\n```", "\n```output\n12\n```\n\n\n"
    boxed_out = "\n```output\n\\boxed{12}\n```\n\n\n"
    cases = {  # name: (segments, finish_reason, gold)
        "right": ([(code, 1), (out, 0), ("</think> <answer>\\boxed{12}</answer>", 1)], "stop", "12"),
        "tool boxed": ([(code, 1), (boxed_out, 0), ("</think> <answer>see above</answer>", 1)], "stop", "12"),
        "tool boxed in answer": ([("</think> <answer>" + code, 1), (boxed_out, 0), ("</answer>", 1)], "stop", "12"),
        "cut": ([(code, 1), (out, 0), ("</think> <answer>\\boxed{12}</answer>", 1)], "length", "12"),
        "no think": ([("<answer>\\boxed{12}</answer>", 1)], "stop", "12"),
        "tail": ([("</think> <answer>\\boxed{12}</answer> w1 w2 w3 w4 w5 w6", 1)], "stop", "12"),
        "wrong": ([("</think> <answer>\\boxed{13}</answer>", 1)], "stop", "12"),
        "grader failed": ([("</think> <answer>\\boxed{7}</answer>", 1)], "stop", "nine"),
    }
    try:
        real = t.grader.math_equal_many
        t.grader.math_equal_many = lambda pairs: [None if g == "nine" else v for (p, g), v in zip(pairs, real(pairs))]
        batch = [constructed(tok, "12*1=", segs, finish, gold) for segs, finish, gold in cases.values()]
        t.reward(batch)
        count = lambda text: len(tok.encode(text))
        for name, s in zip(cases, batch):
            c = s.completion
            if name == "grader failed":
                assert not s.graded
                with pytest.raises(GradeError):
                    zero_tir_reward(c.text, s.gold, c.finish_reason == "stop", grader=t.grader, count_tokens=count)
                continue
            want = zero_tir_reward(c.text, s.gold, c.finish_reason == "stop", grader=t.grader, count_tokens=count)
            assert s.graded and s.reward == want, name
        assert [s.reward for s in batch[:-1]] == [1.0, 0, 0, 0, 0, 0, 0]
        # code whose output forges a closed block and an answer: training knows the tool's tokens by their mask
        # (zero_tir_reward, given text alone, can only find output blocks by their fences)
        forged = constructed(tok, "12*1=", [(code, 1), ("\n```output\nx\n```\n</think> <answer>\\boxed{12}</answer>"
                                                        "\n```\n\n\n", 0)])
        t.reward([forged])
        assert forged.graded and forged.reward == 0.0
    finally:
        t.close()


@pytest.mark.quick
def test_repetition_filter_scores_the_whole_response_and_mask_truncated_masks(tmp_path):
    """The paper scores its output_text, tool output included: a correct response whose own words do not
    repeat but whose tool output does is dropped. mask_truncated keeps a response cut at the length limit in
    its group's statistics but out of the loss, and counts it."""
    from minitir.filters import repeatness
    tc, model, tok, problems = toy_setup(tmp_path, steps=1)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[], tool=lambda code: "")
    try:
        answer = "</think> <answer>\\boxed{12}</answer>"
        loop = constructed(tok, "12*1=", [("```python\nprint(12)\n```", 1), ("\n```output\n" + "1\n" * 60 + "```\n\n\n", 0),
                                          (answer, 1)])
        plain = constructed(tok, "12*1=", [("```python\nprint(12)\n```", 1), ("\n```output\n12\n```\n\n\n", 0), (answer, 1)])
        cut = constructed(tok, "12*1=", [("```python\nprint(12)\n", 1)], finish="length")
        group = [loop, plain, cut]
        t.reward(group)
        calm = max(repeatness(loop.completion.policy_text), repeatness(plain.completion.text))
        assert calm < repeatness(loop.completion.text)      # only the tool's output repeats
        t.cfg.filter_repetition = (calm + repeatness(loop.completion.text)) / 2
        t.cfg.mask_truncated = True
        stats = {"groups_kept": 0, "dropped_overlong": 0, "dropped_repetitive": 0, "masked_truncated": 0, "masked_void": 0}
        kept = keep_group(group, t.cfg, stats)
        assert kept == [plain, cut] and stats["dropped_repetitive"] == 1 and stats["masked_truncated"] == 1
        assert plain.loss_mask == plain.completion.policy_mask and not any(cut.loss_mask)
        t.cfg.mask_truncated = False
        assert keep_group([plain, cut], t.cfg, stats)[1].loss_mask == cut.completion.policy_mask
    finally:
        t.close()


def _whiten(x):
    return (x - x.mean()) / (x.var(unbiased=False) + 1e-8).sqrt()


@pytest.mark.parametrize("algo", ["grpo", "reinforce_pp", "ppo"])
def test_advantages_with_kl_in_the_reward_by_hand(tmp_path, algo):
    """prepare's per-token advantages against a naive computation from the log-probs it computed: the KL
    penalty kl_coef * k3 at each policy token (none at the tool's), charged from each token on for the
    outcome estimators, or as GAE's per-token rewards with the outcome at the last policy token (ppo);
    reinforce_pp and ppo whitened over the batch's tokens."""
    coef, gamma, lam = 0.3, 0.9, 0.8
    tc, model, tok, problems = toy_setup(tmp_path, steps=1, algo=algo, kl_coef=coef, kl_in_reward=True,
                                         gamma=gamma, lam=lam)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[], tool=lambda code: "")
    try:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():   # the policy moves away from its reference
            for p in t.learner.model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        samples = [constructed(tok, f"{10 + i}*3=", [("w3 w4 w5 ", 1), ("```output\n42\n```\n\n\n", 0),
                                                       ("w6 " * (i + 1) + "</think> <answer>\\boxed{3}</answer>", 1)],
                               seed=i) for i in range(4)]
        for i, s in enumerate(samples):
            s.reward, s.outcome_adv, s.loss_mask = float(i % 2), 0.7 - 1.1 * (i % 2), list(s.completion.policy_mask)
        t.prepare(samples)
        want = []
        for s in samples:
            log_r = torch.tensor(s.old_logp) - torch.tensor(s.ref_logp)                       # policy tokens only
            kl = coef * (torch.exp(-log_r) - 1 + log_r)
            assert len(kl) == sum(s.completion.policy_mask) and kl.abs().max() > 1e-4
            if algo == "ppo":
                r = -kl
                r[-1] += s.reward
                v, a, out = s.old_values + [0.0], 0.0, []
                for j in reversed(range(len(r))):
                    a = float(r[j]) + gamma * v[j + 1] - v[j] + gamma * lam * a
                    out.append(a)
                want.append(torch.tensor(out[::-1]))
            else:
                want.append(torch.tensor([s.outcome_adv - float(kl[j:].sum()) for j in range(len(kl))]))
        flat = torch.cat(want)
        if algo in ("reinforce_pp", "ppo"):
            flat = _whiten(flat)
        got = torch.cat([torch.tensor(s.adv) for s in samples])
        assert torch.allclose(got, flat, atol=1e-5), (got, flat)
    finally:
        t.close()


def test_prompts_over_the_budget_are_skipped_and_counted(tmp_path):
    """max_prompt_tokens is the prompt budget: longer prompts never reach the generator and are counted,
    and every response gets the whole max_new_tokens."""
    tc, model, tok, problems = toy_setup(tmp_path, steps=1, max_prompt_tokens=5, max_new_tokens=12)
    long = [Problem(f"long{i}", f"{100 + i}*7=", str((100 + i) * 7)) for i in range(5)]   # 6 tokens; the rest 5
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems[:40] + long, eval_problems=[], tool=lambda code: "")
    try:
        assert t.prompts_too_long == 5 and len(t.data.problems) == 40
        kept, sampled, stats = t.collect({"generate": 0.0, "grade": 0.0})
        assert all(len(s.prompt_ids) <= 5 for s in sampled)
        cut = [s for s in sampled if s.completion.finish_reason == "length"]
        assert cut and all(len(s.completion.tokens) == 12 for s in cut)
        assert t.train_step()["prompts_too_long"] == 5 and "prompts_too_long" not in t.train_step()   # said once
    finally:
        t.close()


@pytest.mark.parametrize("ppo_epochs", [1, 2])
def test_carried_samples_are_trained_against_the_weights_that_made_them(tmp_path, ppo_epochs):
    """carry_over as the paper carries its surplus experiences: with the log-probs of the weights that made
    them. After an update, a carried sample's behaviour log-probs are still those (equal, in float32, to the
    generator's), its ratio in the next update is pi_now / pi_then (logged as carried_ratio_mean), while a
    sample made in the step it trains in needs no behaviour forward with one update per step."""
    tc, model, tok, problems = toy_setup(tmp_path, steps=3, max_new_tokens=8, filter_overlong=True, carry_over=True,
                                         max_refill_rounds=4, warm=True, ppo_epochs=ppo_epochs, lr=2e-3)
    shaped = lambda text, gold, info: float(len(text) % 3)   # rewards that differ within groups: the policy moves
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[], reward_fn=shaped)
    try:
        m1 = t.train_step()
        carry = list(t.carry)
        assert m1["carried_out"] == len(carry) > 0 and all(s.carried for s in carry)
        then = [list(s.old_logp) for s in carry]
        gen = torch.tensor([lp for s in carry for lp, k in zip(s.completion.logprobs, s.loss_mask) if k])
        assert (torch.tensor(sum(then, [])) - gen).abs().max() <= 1e-4       # the weights that made them
        with torch.no_grad():
            now, _, _ = t.learner.logprobs(t.learner.model, carry)
        log_ratio = now - torch.tensor(sum(then, []))
        assert log_ratio.abs().max() > 1e-3                                    # the update moved the policy
        kept, _, stats = t.collect({"generate": 0.0, "grade": 0.0})
        assert kept[:len(carry)] == carry and stats["carried_share"] == len(carry) / len(kept)
        t.prepare(kept)
        assert [s.old_logp for s in carry] == then                             # not rescored with today's weights
        fresh = kept[len(carry):]
        assert all(bool(s.old_logp) == (ppo_epochs > 1) for s in fresh)       # one update: no behaviour forward
        m2 = t.learner.update(kept, t.step)
        assert m2["carried_ratio_mean"] == pytest.approx(float(log_ratio.exp().mean()), abs=1e-5)
        assert m2["logprob_gap_mean"] < 1e-4    # over this step's samples: rounding, not the carried ones' drift
    finally:
        t.close()


def test_no_sample_is_lost_when_every_new_group_is_filtered(tmp_path):
    """A step whose new groups are all filtered still trains on the samples carried into it, and a batch
    short of prompts_per_step x n_samples says so (batch_size, batch_short)."""
    tc, model, tok, problems = toy_setup(tmp_path, steps=2, max_new_tokens=8, filter_overlong=True, carry_over=True,
                                         max_refill_rounds=4, warm=True)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        t.train_step()
        carried = len(t.carry)
        assert carried > 0
        t.cfg.filter_groups, t.cfg.filter_min_acc, t.cfg.filter_max_acc, t.cfg.max_refill_rounds = True, 1.0, 1.0, 1
        m = t.train_step()
        target = tc.prompts_per_step * tc.n_samples
        assert m["groups_kept"] == 0 and m["carried_in"] == carried
        assert m["batch_size"] == carried and m["batch_short"] == target - carried and "loss" in m
    finally:
        t.close()


def test_bfloat16_runs_the_gpu_recipe_on_a_cpu(tmp_path):
    """--dtype bfloat16 on a CPU is the GPU recipe: float32 master weights and AdamW state, forward and
    backward under bfloat16 autocast, a bfloat16 decode copy refreshed after each update, and the gap
    between its log-probs and the trainer's logged and corrected by truncated importance sampling."""
    tc, model, tok, problems = toy_setup(tmp_path, steps=2, warm=True, dtype="bfloat16", tis_cap=2.0)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        learner = t.learner
        with learner.autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        engines = set()
        for _ in range(2):
            m = t.train_step()
            engines.add(id(t.engine))
            assert t.engine.cache is None   # one engine for the run, its cache released before each update
            gen = learner.decoder()
            assert gen is not learner.model and {p.dtype for p in gen.parameters()} == {torch.bfloat16}
            copy = dict(gen.named_parameters())
            for name, w in learner.model.named_parameters():
                assert w.dtype == torch.float32, name
                assert torch.equal(copy[name], w.detach().to(torch.bfloat16)), name   # refreshed after the update
        assert len(engines) == 1 and t.engine.model is gen
        assert {s.dtype for st in learner.opt.state.values() for s in st.values() if s.dim()} == {torch.float32}
        # the bfloat16 decode copy and the float32 masters under autocast compute the same bits
        assert m["logprob_gap_mean"] == m["logprob_gap_max"] == m["tis_capped"] == 0.0
    finally:
        t.close()


def _run(tmp_path, name, **overrides):
    """A two-step toy run -> (its metrics, its samples.jsonl bytes, its final weights)."""
    tool = overrides.pop("tool", None)
    tc, model, tok, problems = toy_setup(tmp_path, steps=2, warm=True, run_name=name, log_samples=64, **overrides)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[], tool=tool)
    try:
        metrics = [_strip(t.train_step()) for _ in range(2)]
        t.log.close()
        return metrics, (Path(tmp_path) / name / "samples.jsonl").read_bytes(), \
            {k: v.clone() for k, v in t.learner.model.state_dict().items()}
    finally:
        t.close()


def product_tool(sleep):
    """The toy's code is print(a*b): its product, after sleep() seconds."""
    def run(code):
        time.sleep(sleep())
        a, b = code.strip()[len("print("):-1].split("*")
        return str(int(a) * int(b))
    return run


@pytest.mark.quick
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_runs_with_a_randomly_slow_tool_are_the_same_run(tmp_path, dtype):
    """The same seed gives the same run (metrics, every rollout's bytes, the weights) when the tool answers
    after a random time and the runs use 1 and 3 threads: a sequence takes its result at a tick fixed by its
    tokens (generate.py), never when the result happens to be done; every kernel is batch and thread
    invariant; and the generator's log-probs equal the trainer's bit for bit."""
    rng, before, runs = random.Random(0), torch.get_num_threads(), []
    try:
        for threads in (1, 3):   # 3: torch's accumulation of repeated indices, by thread, differed from 1's
            torch.set_num_threads(threads)
            runs.append(_run(tmp_path, f"run{threads}", dtype=dtype, tool=product_tool(lambda: rng.uniform(0, 0.02))))
    finally:
        torch.set_num_threads(before)
    (m0, s0, w0), (m1, s1, w1) = runs
    assert any(r["code_ratio"] > 0 for r in m0)
    assert m0 == m1 and s0 == s1 and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(r["logprob_gap_max"] == 0.0 for r in m0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_is_exactly_on_policy(tmp_path, dtype):
    """With LoRA adapters (the decode copy holds the merged weights) the generator's log-probs equal the
    trainer's bit for bit, so truncated importance sampling weighs every token exactly 1."""
    metrics, _, _ = _run(tmp_path, "lora", dtype=dtype, lora_rank=4, lr=1e-2, tis_cap=2.0,
                         tool=product_tool(lambda: 0.0))
    assert all(r["logprob_gap_max"] == 0.0 and r["tis_capped"] == 0.0 for r in metrics)


def test_without_batch_invariance_the_generator_and_trainer_differ_a_little(tmp_path):
    """--no-batch-invariant trains through SDPA's kernels: the gap is small, non-zero, and measured."""
    metrics, _, _ = _run(tmp_path, "sdpa", dtype="bfloat16", batch_invariant=False, tool=product_tool(lambda: 0.0))
    assert 0 < metrics[0]["logprob_gap_mean"] < 0.1


@pytest.mark.quick
def test_gradient_clipping_is_torchs_summed_in_a_fixed_order():
    """The norm and the clipped gradients are torch.nn.utils.clip_grad_norm_'s (to rounding), and their bits do
    not depend on the thread count (torch's norm of a large tensor does)."""
    from minitir.learner import clip_grad_norm
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(300, 200, generator=g), torch.randn(77, generator=g), torch.randn(1000, 64, generator=g)]

    def clipped(threads, fn):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            module = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros_like(x)) for x in grads])
            for p, x in zip(module, grads):
                p.grad = x.clone()
            return float(fn(module, 1.0)), [p.grad for p in module]
        finally:
            torch.set_num_threads(before)

    ours = [clipped(n, lambda m, c: clip_grad_norm(m, c, sharded=False)) for n in (1, 2, 3)]
    norm, want = clipped(2, lambda m, c: torch.nn.utils.clip_grad_norm_(m.parameters(), c))
    assert abs(ours[0][0] - norm) < 1e-4 * norm and norm > 1.0    # it clipped
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ours[0][1], want))
    for n, grads_n in ours[1:]:
        assert n == ours[0][0] and all(torch.equal(a, b) for a, b in zip(grads_n, ours[0][1]))


def test_a_stop_signal_saves_and_resume_gives_the_same_run(tmp_path):
    """train.py sent SIGTERM (a cluster's time limit, preemption) mid-run finishes its step, saves, closes its
    sandbox and exits 143 with one line saying how to go on; --resume then ends exactly as a run never
    stopped (metrics but the wall-clock fields, samples)."""
    import signal
    import subprocess
    import sys
    flags = ["--prompt", "zero_rl", "--steps", "4", "--prompts-per-step", "2", "--n-samples", "2",
             "--max-new-tokens", "16", "--eval-size", "4", "--eval-every", "2", "--synthetic-size", "40",
             "--no-tensorboard", "--log-samples", "1", "--save-every", "0", "--print-every", "0",
             "--run-dir", str(tmp_path)]
    cmd = lambda *a: [sys.executable, str(ROOT / "train.py"), *flags, *a]   # noqa: E731
    straight = subprocess.Popen(cmd("--run-name", "straight"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    stopped = subprocess.Popen(cmd("--run-name", "stopped"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    while not (metrics.exists() and '"step": 1' in metrics.read_text()) and stopped.poll() is None:
        time.sleep(0.1)
    stopped.send_signal(signal.SIGTERM)
    err = stopped.communicate(timeout=300)[1]
    assert stopped.returncode == 143, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("train.py: stopped by SIGTERM after step ") and "Traceback" not in err, err
    assert line.endswith(f"go on with: python train.py --resume {tmp_path / 'stopped'}"), line
    step = int(line.split("after step ")[1].split()[0])
    assert 1 <= step < 4 and (tmp_path / "stopped" / "checkpoints" / f"step-{step:06d}" / "trainer_state.pt").exists()
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(tmp_path / "stopped")],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and straight.wait(timeout=300) == 0, resumed.stderr[-2000:]
    wall = lambda row: {k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_s"}  # noqa
    read = lambda run, f: [json.loads(ln) for ln in (tmp_path / run / f).read_text().splitlines()]  # noqa: E731
    assert [wall(r) for r in read("stopped", "metrics.jsonl")] == [wall(r) for r in read("straight", "metrics.jsonl")]
    assert read("stopped", "samples.jsonl") == read("straight", "samples.jsonl")
    assert len(read("stopped", "heldout.jsonl")) == 4   # its held-out problems, for eval.py --benchmarks heldout


@pytest.mark.quick
def test_stop_signals_are_noted_then_act():
    """The first SIGINT, SIGTERM or SIGUSR2 is noted (the step goes on), repeats are the same request (torchrun
    and the terminal both pass on a Ctrl-C), a later Ctrl-C interrupts at once; leaving restores."""
    import signal
    from minitir.run_state import StopSignals
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.signum == signal.SIGINT
        for repeat in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
            os.kill(os.getpid(), repeat)
            time.sleep(0.01)
        stop.REPEAT_S = 0.0   # as if two seconds had passed
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGINT) is before
