"""minitir: agent RL for tool-integrated reasoning (ZeroTIR), small enough to read in an afternoon."""
__all__ = ["load_pretrained", "save_pretrained", "Transformer", "ModelConfig", "KVCache"]
_EXPORTS = {"load_pretrained": "minitir.checkpoint", "save_pretrained": "minitir.checkpoint",
            "Transformer": "minitir.model", "ModelConfig": "minitir.model", "KVCache": "minitir.model"}


def __getattr__(name):
    """The model and checkpoint API, imported on first use: the sandbox's worker processes import
    minitir.sandbox without paying for torch."""
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'minitir' has no attribute {name!r}")
