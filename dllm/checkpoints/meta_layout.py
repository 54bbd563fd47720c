"""Meta's checkpoint layout: `params.json` + `consolidated.NN.pth`, one shard per model-parallel rank."""
import glob
import json
import os
from typing import Dict, List

import torch

from dllm import distributed
from dllm.atomic_io import atomic_save, atomic_write_text
from dllm.checkpoints.sharding import shard_state_dict
from dllm.core.model import META_LLAMA3_ROPE_SCALING, ModelArgs, Transformer, is_adapter_key
from dllm.errors import InputError


# the keys a Meta params.json carries
BASE_PARAM_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                   "ffn_dim_multiplier", "norm_eps", "rope_theta")


def meta_params(args: ModelArgs) -> dict:
    """The params.json of a Meta-layout base: Meta's keys, plus the others where not the default."""
    params = {k: v for k, v in args.to_dict().items() if k in BASE_PARAM_KEYS}
    derived = ModelArgs(**{k: params[k] for k in BASE_PARAM_KEYS})
    if args.head_dim != derived.head_dim:
        params["head_dim"] = args.head_dim
    if args.ffn_hidden_dim != derived.ffn_hidden_dim:
        params["hidden_dim"] = args.ffn_hidden_dim
    if args.tie_word_embeddings:
        params["tie_word_embeddings"] = True
    if args.rope_scaling == META_LLAMA3_ROPE_SCALING:
        params["use_scaled_rope"] = True
    elif args.rope_scaling is not None:
        params["rope_scaling"] = args.rope_scaling
    return params


def shard_files(ckpt_dir: str) -> List[str]:
    """A Meta checkpoint directory's consolidated.NN.pth shards, in rank order."""
    return sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))


def base_shard_path(ckpt_dir: str) -> str:
    """The consolidated.NN.pth of this model-parallel rank; the shard count must equal the MP size."""
    if not os.path.isdir(ckpt_dir):
        raise InputError(f"checkpoint directory not found: {ckpt_dir}")
    shards = shard_files(ckpt_dir)
    if not shards:
        raise InputError(f"no consolidated.*.pth files in {ckpt_dir}")
    if len(shards) != distributed.mp_size():
        raise InputError(
            f"{ckpt_dir} has {len(shards)} checkpoint shard(s) but model parallel size is "
            f"{distributed.mp_size()}; run it with {len(shards)} model-parallel processes (or reshard it)"
        )
    return shards[distributed.mp_rank()]


def save_meta_checkpoint(model: Transformer, out_dir: str, dtype: torch.dtype = torch.bfloat16, mp_size: int = 1):
    """Write the base model (no routers, no LoRA) in Meta's layout, split into `mp_size` shards.

    Takes a model built with model-parallel size 1 (the full tensors)."""
    full = {k: v.detach().to(dtype).cpu() for k, v in model.state_dict().items() if not is_adapter_key(k)}
    write_meta_shards(full, model.params, out_dir, mp_size)


def write_meta_shards(full: Dict[str, torch.Tensor], args: ModelArgs, out_dir: str, mp_size: int = 1):
    """Full base tensors -> `consolidated.NN.pth` for `mp_size` ranks and the params.json."""
    for rank in range(mp_size):
        shard = shard_state_dict(full, mp_size, rank, args.tie_word_embeddings)
        atomic_save(shard, os.path.join(out_dir, f"consolidated.{rank:02d}.pth"))
    atomic_write_text(json.dumps(meta_params(args), indent=2) + "\n", os.path.join(out_dir, "params.json"))
