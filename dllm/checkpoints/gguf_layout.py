"""GGUF files (llama.cpp) of Llama-family models: metadata -> ModelArgs, tensors dequantized to fp32.

llama.cpp's converter permutes the wq/wk rows of a Hugging Face checkpoint back into Meta's
interleaved-pair RoPE order, so GGUF tensors map onto this model's names with a rename only
(hf_layout.py permutes again when writing the Hugging Face layout).
"""
import os
from typing import Dict, Tuple

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from dllm.errors import InputError
from dllm.core.model import ModelArgs

# GGUF name -> this model's name; "{}" is the layer index
TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
LAYER_NAMES = {
    "attn_norm.weight": "attention_norm.weight", "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight", "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight", "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}


def open_gguf(path: str) -> GGUFReader:
    if not os.path.isfile(path):
        raise InputError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise InputError(f"{path}: not a readable GGUF file ({e})") from None


def field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _float32(value) -> float:
    """GGUF stores floats as float32: 1e-5 comes back as 9.9999997e-06; keep the intended decimal."""
    return float(str(np.float32(value)))


def read_params(reader: GGUFReader, path: str) -> dict:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise InputError(f"{path}: architecture {arch!r} is not supported (supported: llama)")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise InputError(f"{path}: rope frequency factors (Llama-3.1 rope scaling) in GGUF are not supported; "
                         f"convert the Hugging Face checkpoint instead")
    try:
        dim, n_heads = int(field(reader, "llama.embedding_length")), int(field(reader, "llama.attention.head_count"))
        params = {
            "dim": dim, "n_layers": int(field(reader, "llama.block_count")), "n_heads": n_heads,
            "n_kv_heads": int(field(reader, "llama.attention.head_count_kv", n_heads)),
            "hidden_dim": int(field(reader, "llama.feed_forward_length")),
            "norm_eps": _float32(field(reader, "llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": _float32(field(reader, "llama.rope.freq_base", 10000.0)),
            "head_dim": int(field(reader, "llama.rope.dimension_count", dim // n_heads)),
            "vocab_size": int(field(reader, "llama.vocab_size", len(field(reader, "tokenizer.ggml.tokens", [])))),
            "tie_word_embeddings": "output.weight" not in tensor_names,
        }
    except TypeError as e:
        raise InputError(f"{path}: GGUF metadata incomplete ({e})") from None
    return params


def read_tensors(reader: GGUFReader, path: str) -> Dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32, under this model's names."""
    names = dict(TOP_NAMES)
    n_layers = int(field(reader, "llama.block_count"))
    for i in range(n_layers):
        names.update({f"blk.{i}.{g}": f"layers.{i}.{m}" for g, m in LAYER_NAMES.items()})
    out = {}
    for tensor in reader.tensors:
        if tensor.name not in names:
            raise InputError(f"{path}: tensor {tensor.name!r} has no place in a Llama model")
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions fastest first
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise InputError(f"{path}: tensor {tensor.name}: {e}") from None
        out[names[tensor.name]] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return out


def read_gguf(path: str) -> Tuple[ModelArgs, Dict[str, torch.Tensor], GGUFReader]:
    reader = open_gguf(path)
    args = ModelArgs.from_dict(read_params(reader, path))
    return args, read_tensors(reader, path), reader
