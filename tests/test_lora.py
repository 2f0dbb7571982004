"""LoRA against naive recomputation and against PEFT: a zero B leaves the base, the adapted weight is
W0 + (alpha / r) B A, only adapters train, the KL reference is the base, PEFT loads minitir's adapter onto its
base with the same logits, minitir and `python -m minitir.checkpoint merge` load it merged, resume is exact."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minitir import lora
from minitir.checkpoint import load_model, load_pretrained
from minitir.config import ConfigError, TrainConfig
from minitir.trainer import Trainer
from tests.conftest import make_hf_model
from tests.test_trainer import _strip, toy_setup

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 33, 8, 41, 9, 12, 3], [70, 3, 2, 2, 9, 60, 1, 4]])


def randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@pytest.mark.quick
def test_zero_b_is_the_base_and_the_adapted_weight_is_w_plus_scaled_ba(tmp_path):
    make_hf_model("qwen2-gqa-untied", vocab_size=80).save_pretrained(tmp_path)
    base, model = load_model(tmp_path), load_model(tmp_path)
    names = lora.add_lora(model, rank=4, alpha=8.0)
    assert len(names) == 2 * 7 and not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))                                  # B = 0: exactly the base
    randomise(model)
    naive = load_model(tmp_path)
    with torch.no_grad():
        for name, m in lora.lora_modules(model).items():
            w = naive.get_submodule(name).weight
            w += (8.0 / 4) * m.lora_B @ m.lora_A                                   # W0 + (alpha / r) B A
        torch.testing.assert_close(model(IDS), naive(IDS), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lora.merged_copy(model)(IDS), naive(IDS), atol=1e-5, rtol=1e-5)
        with lora.disabled(model):
            assert torch.equal(model(IDS), base(IDS))
    model.train()   # the packed training path reaches A and B through the fused products' weight gradients
    h = model.hidden_packed(IDS.flatten(), torch.tensor([0, 8, 16], dtype=torch.int32))
    h.square().sum().backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())


def test_only_the_adapters_train_and_the_reference_is_the_base(tmp_path):
    """Through the trainer's real step: the optimizer holds the adapters alone, they change, every base weight
    stays; the KL reference log-probs are the base model's (adapters off, no second copy)."""
    tc, model, tok, problems = toy_setup(tmp_path, steps=2, lora_rank=4, lora_alpha=8.0, lr=1e-2, kl_coef=0.1)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = load_free_copy(model)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[], tool=lambda code: "1",
                reward_fn=lambda text, gold, info: float(len(text) % 3))
    try:
        L = t.learner
        adapters = [p for n, p in L.model.named_parameters() if "lora_" in n]
        assert L.ref is None and {id(p) for g in L.opt.param_groups for p in g["params"]} == set(map(id, adapters))
        m = t.train_step()
        for n, p in L.model.named_parameters():
            if "lora_" not in n:
                assert torch.equal(p, base[n.replace(".base.", ".")]), n
        assert any(float(m_.lora_B.detach().abs().max()) > 0 for m_ in lora.lora_modules(L.model).values())
        assert "kl" in m
        kept, _, _ = t.collect({"generate": 0.0, "grade": 0.0})
        t.prepare(kept)
        with torch.no_grad():
            want, _, _ = L.logprobs(plain, kept)
            adapted, _, _ = L.logprobs(L.model, kept)
        got = torch.tensor([v for s in kept for v in s.ref_logp])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert (adapted - want).abs().max() > 1e-4                                  # the adapters did move it
    finally:
        t.close()


def load_free_copy(model):
    import copy
    return copy.deepcopy(model).eval()


def test_peft_loads_the_adapter_and_minitir_merges_it(tmp_path):
    """A run's checkpoint is an adapter PEFT loads onto its base (transformers) with minitir's logits; minitir's
    load_pretrained and `python -m minitir.checkpoint merge` give the merged model, which transformers loads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from minitir.checkpoint import embedded_checkpoint
    from tests.test_trainer import toy_problems
    tok = AutoTokenizer.from_pretrained(embedded_checkpoint())
    base_dir = tmp_path / "base"
    make_hf_model("llama-gqa-tied", vocab_size=len(tok)).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    tc = TrainConfig(model=str(base_dir), lora_rank=4, lora_alpha=16.0, lora_targets="q_proj,v_proj,down_proj",
                     prompt="{question}", eval_size=0, run_dir=str(tmp_path), run_name="lora", tensorboard=False,
                     max_tool_calls=0, max_new_tokens=8, max_prompt_tokens=64, micro_batch_tokens=256, dtype="float32")
    t = Trainer(tc, problems=toy_problems(16), eval_problems=[])
    try:
        randomise(t.learner.model)
        ck = t.save_checkpoint()
        with torch.no_grad():
            ours = t.learner.model(IDS)
    finally:
        t.close()
    assert {p.name for p in ck.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"}
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), ck)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, ours, atol=1e-4, rtol=1e-4)
        merged, _ = load_pretrained(str(ck))
        torch.testing.assert_close(merged(IDS), ours, atol=1e-4, rtol=1e-4)
    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "minitir.checkpoint", "merge", str(ck), str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        torch.testing.assert_close(hf(IDS).logits, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.quick
def test_an_adapter_names_the_base_a_model_object_was_read_from(tmp_path):
    """A model passed to the Trainer as an object: read by load_pretrained, its adapter names that directory and
    loads; built in memory, it names none (null, not "None"), and loading it says so."""
    import json
    from minitir.checkpoint import CheckpointError, load_lora, save_pretrained
    tc, model, tok, problems = toy_setup(tmp_path, steps=1, lora_rank=4, lora_alpha=8.0)
    base_dir = save_pretrained(model, None, tmp_path / "base")
    read = load_model(base_dir)   # what load_pretrained reads the model with
    for name, m, base in (("read", read, str(base_dir.resolve())), ("built", model, None)):
        tc.run_name = name
        t = Trainer(tc, model=m, tokenizer=tok, problems=problems, eval_problems=[], tool=lambda code: "1")
        try:
            randomise(t.learner.model)
            ck = t.save_checkpoint()
            with torch.no_grad():
                ours = t.learner.model(IDS % 20)
        finally:
            t.close()
        assert json.loads((ck / "adapter_config.json").read_text())["base_model_name_or_path"] == base
        if base is None:
            with pytest.raises(CheckpointError, match="names no base model"):
                load_lora(ck)
        else:
            torch.testing.assert_close(load_lora(ck)(IDS % 20), ours, atol=1e-5, rtol=1e-5)


def test_exact_resume_with_lora(tmp_path):
    setup = dict(steps=2, lora_rank=4, lora_alpha=8.0, lr=1e-2)
    tc, model, tok, problems = toy_setup(tmp_path, run_name="straight", **setup)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[], tool=lambda code: "1")
    straight = [_strip(t.train_step()) for _ in range(2)]
    t.close()
    tc, model, tok, problems = toy_setup(tmp_path, run_name="stopped", save_every=1, **setup)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[], tool=lambda code: "1")
    t.train_step()
    t.close()
    tc, model, tok, problems = toy_setup(tmp_path, run_name="stopped", save_every=1, **setup)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[], tool=lambda code: "1",
                resume=str(Path(tmp_path) / "stopped"))
    assert t.step == 1
    resumed = _strip(t.train_step())
    t.close()
    assert resumed == straight[1]
    tc, model, tok, problems = toy_setup(tmp_path, run_name="stopped", **dict(setup, lora_alpha=16.0))
    with pytest.raises(ConfigError, match="its adapter has rank 4, alpha 8.0"):   # another scale: refused
        Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[], tool=lambda code: "1",
                resume=str(Path(tmp_path) / "stopped"))
