import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from minitir import ops
from minitir.checkpoint import CheckpointError, load_model, save_pretrained
from tests.conftest import make_hf_model


@pytest.mark.quick
@pytest.mark.parametrize("kind", ["qwen2-gqa-untied", "llama-gqa-tied", "llama-bias-mha"])
def test_save_then_transformers_load_same_logits(kind, tmp_path):
    from transformers import AutoModelForCausalLM
    make_hf_model(kind).save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src")
    save_pretrained(ours, None, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max() <= 1e-5


@pytest.mark.quick
def test_sharded_checkpoint_roundtrip(tmp_path, monkeypatch):
    from minitir import checkpoint
    make_hf_model("qwen2-gqa-untied").save_pretrained(tmp_path / "src")
    m = load_model(tmp_path / "src")
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 40_000)
    save_pretrained(m, None, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    m2 = load_model(tmp_path / "out")
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))


def test_smollm_save_then_transformers_load(smollm, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    # the round trip is under test, not the matrix-product library: both sides use F.linear (oneDNN's
    # summation order moves SmolLM2's 30-layer logits by ~1e-4, tiny-model parity covers that path)
    monkeypatch.setattr(ops, "_ONEDNN", False)
    model, tok = smollm
    save_pretrained(model, tok, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok2("def fibonacci(n):", return_tensors="pt").input_ids
    assert ids.tolist() == tok("def fibonacci(n):", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max() <= 1e-4


@pytest.mark.quick
def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_model(tmp_path)
    make_hf_model("llama-gqa-tied").save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        load_model(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.\w+_proj.weight' has shape"):
        load_model(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    st = load_file(tmp_path / "a" / "model.safetensors")
    del st["model.norm.weight"]
    save_file(st, tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing from the checkpoint: \\['model.norm.weight'\\]"):
        load_model(tmp_path / "a")
    from minitir.checkpoint import resolve
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="known short name"):
        resolve("gpt2")


def test_hub_name_without_network_fails_fast_with_advice(tmp_path):
    code = ("from minitir import load_pretrained\n"
            "try:\n    load_pretrained('Qwen2.5-1.5B')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    t = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert time.time() - t < 60
    assert "CheckpointError" in out.stdout and "Qwen/Qwen2.5-1.5B" in out.stdout and "smollm2-135m" in out.stdout
