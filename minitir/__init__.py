"""minitir: agent RL for tool-integrated reasoning (ZeroTIR), small enough to read in an afternoon."""
from minitir.checkpoint import load_pretrained, save_pretrained
from minitir.model import KVCache, ModelConfig, Transformer

__all__ = ["load_pretrained", "save_pretrained", "Transformer", "ModelConfig", "KVCache"]
