"""Which layout a base checkpoint directory is in: Meta (params.json + consolidated.NN.pth) or
Hugging Face (config.json + *.safetensors or pytorch_model*.bin)."""
import os

from dllm.checkpoints import hf_layout
from dllm.checkpoints.meta_layout import shard_files
from dllm.errors import InputError


def checkpoint_layout(ckpt_dir: str) -> str:
    """"meta" or "hf", from the files the directory holds."""
    if not os.path.isdir(ckpt_dir):
        raise InputError(f"checkpoint directory not found: {ckpt_dir}")
    if os.path.isfile(os.path.join(ckpt_dir, "params.json")) or shard_files(ckpt_dir):
        return "meta"
    if hf_layout.is_hf_dir(ckpt_dir):
        return "hf"
    raise InputError(f"{ckpt_dir}: neither a Meta checkpoint (params.json + consolidated.NN.pth) nor a "
                     f"Hugging Face one (config.json + *.safetensors)")


def params_file(ckpt_dir: str) -> str:
    """Where a base checkpoint keeps its model args: params.json (Meta) or config.json (Hugging Face)."""
    return os.path.join(ckpt_dir, "params.json" if checkpoint_layout(ckpt_dir) == "meta" else "config.json")


def default_model_parallel_size(ckpt_dir: str) -> int:
    """A Meta checkpoint runs with one rank per shard; a Hugging Face one is split on load, so 1."""
    return max(1, len(shard_files(ckpt_dir))) if checkpoint_layout(ckpt_dir) == "meta" else 1
