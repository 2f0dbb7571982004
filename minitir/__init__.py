"""minitir: agent RL for tool-integrated reasoning (ZeroTIR), small enough to read in an afternoon."""
import ctypes
import os
import sys


def _keep_freed_memory():
    """Training on CPU allocates and frees activation-sized tensors (tens of MB) thousands of times a step.
    glibc hands such blocks back to the kernel on free and the next allocation page-faults them in again,
    which made elementwise ops 3-6x slower than their arithmetic (bench_logprobs: 46 s -> 41 s). Keep
    freed memory in the process instead: it is reused, and peak RSS is what the process needed anyway.
    MINITIR_KEEP_FREED_MEMORY=0 leaves the allocator alone."""
    if not sys.platform.startswith("linux") or os.environ.get("MINITIR_KEEP_FREED_MEMORY", "1") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)   # glibc's maximum: blocks up to 32 MB come from the heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 40)    # never shrink the heap
    libc.mallopt(M_TOP_PAD, 64 << 20)          # grow it in 64 MB steps


_keep_freed_memory()

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
