import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
DATA_DIR = Path(__file__).resolve().parents[1] / "data"   # the project's own copy


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: the inner loop, `pytest -m quick` (under 2 minutes on 2 cores): "
                                       "at least one test of every module")

TINY_CONFIGS = {
    # name: (transformers config class name, kwargs)
    "qwen2-gqa-untied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-gqa-tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-bias-mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
                                           tie_word_embeddings=False)),
}


def make_hf_model(kind: str, seed: int = 0, vocab_size: int = 97):
    import transformers
    cls_name, kw = TINY_CONFIGS[kind]
    cfg = getattr(transformers, cls_name)(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                          num_hidden_layers=2, max_position_embeddings=256, rope_theta=10000.0,
                                          rms_norm_eps=1e-6, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()
    with torch.no_grad():  # non-trivial norms and biases, so a dropped term shows up
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(params=list(TINY_CONFIGS))
def tiny_pair(request, tmp_path):
    """(transformers model, minitir model) with identical weights, loaded through minitir's checkpoint code."""
    from minitir.checkpoint import load_model
    hf = make_hf_model(request.param)
    hf.save_pretrained(tmp_path)
    return hf, load_model(tmp_path)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M (converted from GGUF on first use, then cached)."""
    from minitir import load_pretrained
    return load_pretrained("smollm2-135m")


@pytest.fixture(scope="session")
def smollm_hf(smollm):
    from transformers import AutoModelForCausalLM
    from minitir.checkpoint import embedded_checkpoint
    return AutoModelForCausalLM.from_pretrained(embedded_checkpoint(), dtype=torch.float32).eval()
