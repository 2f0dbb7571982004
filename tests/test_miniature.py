"""The phenomenon in miniature: the shared-prefix pretraining forward against the model's plain forward, the
compact vocabulary against the real tokenizer, and, fast, tool use and accuracy rising together under the
paper's prompt and strict reward with the shipped base model, the real generator, sandbox and grader."""
import json
import math

import pytest
import torch

from minitir import miniature
from minitir.checkpoint import embedded_checkpoint, load_pretrained, save_pretrained
from minitir.model import ModelConfig, Transformer
from minitir.tasks import TEMPLATES, miniature_problems, render_prompt
from minitir.trainer import Trainer
from minitir.vocab import CompactTokenizer


def base_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(embedded_checkpoint())


@pytest.mark.quick
def test_compact_vocabulary_round_trips_and_saves(tmp_path):
    base = base_tokenizer()
    p = miniature_problems(3, seed=0)[0]
    response = "".join(t for t, _ in miniature.response_parts(p, code=True, slip=False))
    text = render_prompt(TEMPLATES["zero_tir"], p.question) + response
    tok = CompactTokenizer.build(base, [text])
    ids = tok.encode(text)
    assert max(ids) < len(tok) - 1 and tok.decode(ids) == text          # every piece known: exact round trip
    assert [tok.base_ids[i] for i in ids] == base.encode(text, add_special_tokens=False)
    odd = tok.encode("Zebra ∑")                                          # pieces outside the vocabulary
    assert tok.unk in odd and "?" in tok.decode(odd)
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    save_pretrained(Transformer(cfg).init_weights(seed=0), tok, tmp_path)
    _, again = load_pretrained(str(tmp_path))
    assert isinstance(again, CompactTokenizer) and again.encode(text) == ids


@pytest.mark.quick
def test_the_programs_print_what_the_corpus_shows():
    """Each miniature problem's programs, run, print the numbers its documents show in their output blocks,
    the last one the answer; a program holds only numbers the model has read: the question's, or for a
    two-step problem's second program the number the first one printed."""
    import contextlib
    import io
    import re
    numbers = lambda text: set(re.findall(r"\d+", text))
    for p in miniature_problems(40, seed=3):
        for code, printed in p.meta["programs"]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code, {})
            assert out.getvalue() == printed + "\n", (p.question, code)
        assert p.meta["programs"][-1][1] == p.answer
        (first, n), *rest = p.meta["programs"]
        assert numbers(first) <= numbers(p.question), (p.question, first)
        if p.meta["kind"] == "two_step":
            assert len(rest) == 1 and numbers(rest[0][0]) == {n} and f"primerange({n}))" in rest[0][0]
        else:
            assert rest == []


@pytest.mark.quick
def test_format_slips_fail_the_strict_reward_only():
    """The corpus's slipped endings (the base model's habit on products) are scored 0 by the paper's strict
    reward and graded by their \\boxed answer by the lenient one, through the grading path training uses;
    the endings in the format pass both."""
    from minitir.reward import default_grader, judge
    cfg = miniature.BaseConfig()
    tok = miniature.compact_tokenizer(cfg)
    docs = miniature.corpus(tok, 12, 5, code_share=0.5, rl_share=0.0, bare_share=0.0, slip_kinds=("product",),
                            slip_share=1.0)
    problems = miniature_problems(12, 5)
    prompt_len = [len(tok(render_prompt(TEMPLATES["zero_tir"], p.question)).input_ids) for p in problems]
    # graded as training grades: the model's own tokens (EOS included), tool output left out
    responses = [(tok.decode([t for t, m in zip(d.ids[n:], d.loss[n:]) if m]), True) for d, n in zip(docs, prompt_len)]
    golds = [p.answer for p in problems]
    slipped = [p.meta["kind"] == "product" for p in problems]
    # a slip ends at EOS (no stop string ends it), which the model learns to write
    assert [d.ids[-1] == tok.eos_token_id and d.loss[-1] == 1 for d in docs] == slipped
    for d, p, n in zip(docs, problems, prompt_len):   # the output blocks show what each program printed
        shown = tok.decode([t for t, m in zip(d.ids[n:], d.loss[n:]) if not m])
        coded = "```python" in tok.decode(d.ids[n:])
        assert shown == "".join(f"\n```output\n{out}\n```\n\n\n" for _, out in p.meta["programs"] if coded)
    strict = judge(responses, golds, "strict", default_grader())
    lenient = judge(responses, golds, "lenient", default_grader())
    assert [j.correct for j in strict] == [not s for s in slipped] and all(j.correct for j in lenient)
    assert [j.format_ok for j in strict] == [j.format_ok for j in lenient] == [not s for s in slipped]


@pytest.mark.quick
def test_the_shipped_base_model_is_todays():
    """minitir/miniature_base was pretrained from today's corpus, vocabulary and configuration (its
    fingerprint), and loads by name: a change to any of them without `python -m minitir.miniature` fails here."""
    import json
    from dataclasses import asdict
    from minitir.checkpoint import MINIATURE_DIR
    stored = json.loads((MINIATURE_DIR / "base_config.json").read_text())
    cfg = miniature.BaseConfig()
    assert stored == json.loads(json.dumps({"fingerprint": miniature.fingerprint(cfg), **asdict(cfg)}))
    model, tok = load_pretrained("miniature")
    assert isinstance(tok, CompactTokenizer) and model.config.vocab_size == len(tok)


@pytest.mark.quick
def test_shared_prefix_forward_equals_the_plain_forward():
    """Rows continuing one prefix, the prefix computed once: the logits must be the model's own on each
    whole sequence (reference: Transformer.forward), for two groups of different lengths."""
    cfg = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    model = Transformer(cfg).init_weights(std=0.1, seed=0)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 50, (7,), generator=g)
    groups = [torch.randint(0, 50, (3, 5), generator=g), torch.randint(0, 50, (2, 9), generator=g)]
    got = miniature.forward_with_prefix(model, prefix, groups)
    for rows, logits in zip(groups, got):
        full = model(torch.cat([prefix.expand(rows.shape[0], -1), rows], 1))[:, len(prefix):]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-4)
    empty = miniature.forward_with_prefix(model, prefix[:0], groups[:1])[0]   # nothing shared
    torch.testing.assert_close(empty, model(groups[0]), atol=1e-5, rtol=1e-4)


def test_pretraining_learns_the_corpus():
    """A small run of the pretraining that built the shipped model: the loss falls far below chance."""
    logged = []
    cfg = miniature.BaseConfig(documents=400, skill_steps=60, habit_steps=20, hidden_size=32, layers=1,
                               intermediate_size=64, batch=16, kinds=("product",))
    model, tok = miniature.pretrain(cfg, log=logged.append)
    final = float(logged[-1].split("loss ")[1].split(",")[0])
    assert final < 0.5 * math.log(len(tok)), logged


def test_tool_use_emerges_in_miniature(tmp_path):
    """What `python train.py` runs (configs/miniature.json, the shipped base model that can but rarely does
    use code), 22 steps: under the paper's prompt and strict 0/1 reward, code use, accuracy and response
    length on the training batches rise together."""
    import train
    cfg, _ = train.parse(["--steps", "22", "--eval-size", "0", "--run-dir", str(tmp_path), "--run-name", "mini",
                          "--no-tensorboard", "--save-every", "0", "--log-samples", "2"])
    t = Trainer(cfg)
    try:
        history = [t.train_step() for _ in range(cfg.steps)]
    finally:
        t.close()
    mean = lambda k, ms: sum(m[k] for m in ms) / len(ms)
    first, last = history[:3], history[-3:]
    curve = [(round(m["code_ratio"], 2), round(m["accuracy"], 2)) for m in history]
    assert mean("code_ratio", first) <= 0.2 and mean("accuracy", first) <= 0.2, curve
    assert mean("code_ratio", last) >= mean("code_ratio", first) + 0.3, curve
    assert mean("accuracy", last) >= mean("accuracy", first) + 0.25, curve
    assert mean("response_length", last) > mean("response_length", first)
    assert (tmp_path / "mini" / "samples.jsonl").read_text().count("\n") == 2 * cfg.steps
    rows = (tmp_path / "mini" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == cfg.steps and {"code_ratio", "response_length", "entropy", "time/tools_s", "batch_size",
                                       "format_failure_rate", "grade_errors", "tool_failures"} <= set(json.loads(rows[0]))
    # what it learnt, evaluated by name as a user would (eval.py --benchmarks miniature): with a tool call
    # allowed it answers held-out problems it cannot answer without one
    import eval as evaluate_cli
    ckpt = tmp_path / "mini" / "checkpoints" / f"step-{cfg.steps:06d}"
    s = evaluate_cli.main(["--model", str(ckpt), "--benchmarks", "miniature", "--limit", "16", "--max-tool-calls",
                           "0,1", "--out", str(tmp_path / "eval")])
    assert s["miniature@0"]["avg@1"] + 0.2 <= s["miniature@1"]["avg@1"], s
