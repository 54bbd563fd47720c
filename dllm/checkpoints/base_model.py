"""A base model built from its checkpoint, in either layout, with an optional adapter."""
from typing import Dict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from dllm import distributed
from dllm.checkpoints import hf_layout
from dllm.checkpoints.layouts import checkpoint_layout
from dllm.checkpoints.meta_layout import base_shard_path, shard_files
from dllm.checkpoints.sharding import shard_state_dict, unshard_state_dict
from dllm.checkpoints.adapters import load_adapter
from dllm.checkpoints.state_dicts import check_state_dict, load_file, load_into
from dllm.core.model import ModelArgs, Transformer
from dllm.errors import InputError




def check_base(ckpt_dir: str):
    """The base weights exist for this rank: a missing model says so before anything else loads."""
    if checkpoint_layout(ckpt_dir) == "meta":
        base_shard_path(ckpt_dir)
    else:
        hf_layout.weight_files(ckpt_dir)


def read_hf_weights(ckpt_dir: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face checkpoint, under its Hugging Face name."""
    state_dict = {}
    for path in hf_layout.weight_files(ckpt_dir):
        if path.endswith(".safetensors"):
            try:
                state_dict.update(load_safetensors(path))
            except (SafetensorError, OSError) as e:
                raise InputError(f"{path}: not a readable safetensors file ({e})") from None
        else:
            state_dict.update(check_state_dict(load_file(path), path))
    return state_dict


def read_base(ckpt_dir: str, args: ModelArgs) -> Dict[str, torch.Tensor]:
    """The whole base model in this code's names and layout, from either checkpoint layout."""
    if checkpoint_layout(ckpt_dir) == "hf":
        return hf_layout.hf_to_meta(read_hf_weights(ckpt_dir), args, ckpt_dir)
    shards = [check_state_dict(load_file(path), path) for path in shard_files(ckpt_dir)]
    if not shards:
        raise InputError(f"no consolidated.*.pth files in {ckpt_dir}")
    return unshard_state_dict(shards, args.tie_word_embeddings)


def load_base(model: Transformer, ckpt_dir: str):
    if checkpoint_layout(ckpt_dir) == "meta":
        path = base_shard_path(ckpt_dir)
        load_into(model, check_state_dict(load_file(path), path), path, adapter=False)
        return
    full = read_base(ckpt_dir, model.params)
    local = shard_state_dict(full, distributed.mp_size(), distributed.mp_rank(), model.params.tie_word_embeddings)
    load_into(model, local, ckpt_dir, adapter=False)


def build_model(args: ModelArgs, llama_ckpt_dir: str, adapter_path: str = None, device=None,
                dtype: torch.dtype = torch.float32) -> Transformer:
    """The base model in `dtype` (routers and LoRA stay fp32) with its checkpoint and optional adapter.

    Built on the CPU without random initialisation (fairscale allocates with the legacy
    constructor, which ignores device contexts), then moved to `device`.
    """
    distributed.setup_if_needed()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Transformer(args, init_weights=False)
    finally:
        torch.set_default_dtype(previous)
    load_base(model, llama_ckpt_dir)
    if adapter_path:
        load_adapter(model, adapter_path)
    return model.to(device or distributed.default_device())
