"""Checkpoint conversion: Hugging Face <-> Meta (split for any model-parallel size), GGUF -> either.

Every conversion reads the source into full tensors under this model's names (the Meta layout),
then writes the target, so a round trip is a pair of exact renames and row permutations. The
output is built in a temporary directory next to the target and renamed into place when complete:
a failed conversion leaves nothing behind, and an existing directory is never overwritten.
"""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from dllm.checkpoints import gguf_layout
from dllm.checkpoints import hf_layout
from dllm import distributed
from dllm.checkpoints import base_model, layouts, meta_layout, model_params
from dllm.errors import InputError
from dllm.checkpoints.gguf_vocab import write_tokenizer_files
from dllm.core.model import ModelArgs, Transformer, check_model_parallel_split, is_adapter_key

# files that travel with the weights unchanged (tokenizers, chat template, token ids)
COMPANION_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


@dataclass
class Source:
    args: ModelArgs
    state_dict: Dict[str, torch.Tensor]  # full tensors, this model's names and RoPE layout
    hf_config_extra: dict = field(default_factory=dict)  # token ids and context length, when known
    companion_dir: Optional[str] = None  # where COMPANION_FILES are copied from
    gguf_reader: Optional[object] = None  # writes the tokenizer files of a GGUF source


def read_source(src: str) -> Source:
    """A GGUF file, a Hugging Face directory or a Meta directory (any number of shards)."""
    if not os.path.exists(src):
        raise InputError(f"{src} not found (expected a GGUF file, or a Hugging Face or Meta checkpoint directory)")
    if os.path.isfile(src):
        args, state_dict, reader = gguf_layout.read_gguf(src)
        extra = {k: gguf_layout.field(reader, key) for k, key in (
            ("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("max_position_embeddings", "llama.context_length"))}
        return Source(args, state_dict, {k: int(v) for k, v in extra.items() if v is not None}, gguf_reader=reader)
    args = model_params.load_params(src)
    return Source(args, base_model.read_base(src, args), hf_config_extra(src), companion_dir=src)


def hf_config_extra(src: str) -> dict:
    """The token ids and context length a Hugging Face directory's config carries (none for Meta)."""
    if layouts.checkpoint_layout(src) != "hf":
        return {}
    config = hf_layout.read_config(src)
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "max_position_embeddings") if k in config}


def random_source(src: str, seed: int = 0) -> Source:
    """`src`'s architecture and companion files with this model's random initialisation: a stand-in
    base of the same shape for timing, where the real weights cannot be copied (a GPU machine with
    no hub). Only the config (or params.json) of `src` is read."""
    if not os.path.isdir(src):
        raise InputError(f"{src}: --random_weights needs a Hugging Face or Meta checkpoint directory (its config)")
    args = model_params.load_params(src)
    distributed.setup_if_needed()
    torch.manual_seed(seed)
    weights = {k: v for k, v in Transformer(args).state_dict().items() if not is_adapter_key(k)}
    return Source(args, weights, hf_config_extra(src), companion_dir=src)


def _cast(state_dict: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() for k, v in state_dict.items()}


def write_hf(source: Source, out_dir: str, dtype: torch.dtype, max_shard_bytes: int):
    """config.json + safetensors (sharded with an index above max_shard_bytes)."""
    tensors = _cast(hf_layout.meta_to_hf(source.state_dict, source.args), dtype)
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(tqdm(shards, desc="write shards", leave=False)):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(out_dir, hf_layout.SAFETENSORS_INDEX), "w") as f:
            json.dump(index, f, indent=2)
    config = hf_layout.params_to_config(source.args, dtype, source.hf_config_extra)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def write_meta(source: Source, out_dir: str, dtype: torch.dtype, model_parallel_size: int):
    check_model_parallel_split(source.args, model_parallel_size)
    meta_layout.write_meta_shards(_cast(source.state_dict, dtype), source.args, out_dir, model_parallel_size)


def write_companions(source: Source, out_dir: str):
    if source.gguf_reader is not None:
        write_tokenizer_files(source.gguf_reader, out_dir)
        ids = {k: v for k, v in source.hf_config_extra.items() if k.endswith("_token_id")}
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(ids, f, indent=2)
        return
    for name in COMPANION_FILES:
        path = os.path.join(source.companion_dir, name)
        if os.path.isfile(path):
            shutil.copy(path, os.path.join(out_dir, name))


def convert(src: str, dst: str, to: str, model_parallel_size: int = 1, dtype: torch.dtype = torch.bfloat16,
            max_shard_bytes: int = 5 * 2**30, random_weights: bool = False):
    """Write `src` (GGUF file, HF or Meta directory) to the new directory `dst` in layout `to`;
    with `random_weights`, `src`'s shape with random weights (random_source)."""
    if to not in ("hf", "meta"):
        raise InputError(f"--to {to!r}: choose hf or meta")
    if to == "hf" and model_parallel_size != 1:
        raise InputError("--model_parallel_size applies to the Meta layout; Hugging Face checkpoints are split on load")
    if os.path.exists(dst):
        raise InputError(f"{dst} exists; convert into a new directory (nothing is overwritten)")
    source = random_source(src) if random_weights else read_source(src)
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-convert-")
    try:
        if to == "hf":
            write_hf(source, tmp, dtype, max_shard_bytes)
        else:
            write_meta(source, tmp, dtype, model_parallel_size)
        write_companions(source, tmp)
        for name in os.listdir(tmp):  # some writers create 0600 files; checkpoints are shared artefacts
            os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
