"""The phenomenon in miniature: the shared-prefix pretraining forward against the model's plain forward, the
compact vocabulary against the real tokenizer, and, fast, tool use and accuracy rising together under the
paper's prompt and strict reward with the real generator, sandbox and grader."""
import time

import torch

from minitir import miniature
from minitir.checkpoint import embedded_checkpoint, load_pretrained, save_pretrained
from minitir.model import ModelConfig, Transformer
from minitir.tasks import TEMPLATES, render_prompt
from minitir.config import TrainConfig
from minitir.trainer import Trainer
from minitir.vocab import CompactTokenizer

# the fast version: one problem kind, a smaller model and corpus (the full one: minitir.miniature.BaseConfig)
FAST = miniature.BaseConfig(documents=6000, skill_steps=700, habit_steps=100, code_share=0.2, hidden_size=64,
                            layers=2, intermediate_size=128, batch=32, kinds=("product",))


def base_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(embedded_checkpoint())


def test_compact_vocabulary_round_trips_and_saves(tmp_path):
    base = base_tokenizer()
    p = miniature.problems(3, seed=0)[0]
    text = render_prompt(TEMPLATES["zero_tir"], p.question) + "".join(miniature.code_segments(p))
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


def test_tool_use_emerges_in_miniature(tmp_path):
    """Pretrain a small base model that can but rarely does use code, then GRPO under the paper's prompt
    and strict 0/1 reward: code use and accuracy on the training batches rise together."""
    t0 = time.time()
    model, tok = miniature.pretrain(FAST, log=lambda s: None)
    problems = miniature.problems(600, seed=1, kinds=FAST.kinds)
    tc = TrainConfig(model="miniature", prompt="zero_tir", prompts_per_step=8, n_samples=8, max_prompt_tokens=256,
                     max_new_tokens=48, max_tool_calls=1, max_tool_output_tokens=64, lr=5e-4, steps=12, eval_size=0,
                     run_dir=str(tmp_path), run_name="mini", save_every=0, tensorboard=False, log_samples=2,
                     micro_batch_tokens=8192, checkpointing="none", sandbox_workers=2, seed=0)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        history = [t.train_step() for _ in range(tc.steps)]
    finally:
        t.close()
    mean = lambda k, ms: sum(m[k] for m in ms) / len(ms)
    first, last = history[:3], history[-3:]
    curve = [(round(m["code_ratio"], 2), round(m["accuracy"], 2)) for m in history]
    assert mean("code_ratio", first) <= 0.35 and mean("accuracy", first) <= 0.35, curve
    assert mean("code_ratio", last) >= mean("code_ratio", first) + 0.3, curve
    assert mean("accuracy", last) >= mean("accuracy", first) + 0.25, curve
    assert mean("response_length", last) > mean("response_length", first)
    assert (tmp_path / "mini" / "samples.jsonl").read_text().count("\n") == 2 * tc.steps
    assert time.time() - t0 < 60, time.time() - t0
