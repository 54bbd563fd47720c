"""dllm: D-LLM, token-adaptive layer skipping for Llama-family models.

`from dllm import Llama` (Meta's generation API), `ModelArgs`, `Transformer` and `Tokenizer` are
resolved on first use, so that importing the algorithm alone (dllm.core) needs torch and fairscale
only.

Importing dllm first tunes the C library's malloc to keep freed memory (dllm/host_memory.py): it
must happen before torch is imported, which is why the entry points import dllm before torch.
"""
import importlib

from dllm import host_memory

KEEPS_FREED_MEMORY = host_memory.keep_freed_memory()

_EXPORTS = {"Llama": "dllm.generation", "ModelArgs": "dllm.core.model", "Transformer": "dllm.core.model",
            "Tokenizer": "dllm.tokenizer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dllm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
