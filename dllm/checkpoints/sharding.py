"""How tensors split across model-parallel ranks, read from the model's module types: a
fairscale ColumnParallelLinear or VocabParallelEmbedding splits its weight by rows (dim 0), a
RowParallelLinear or ParallelEmbedding by columns (dim 1), anything else is replicated.

The rules are taken once from a one-block model of the same structure, so checkpoints of any size
are split without building their model."""
import functools
import re
from typing import Dict, List, Optional

import torch
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, VocabParallelEmbedding,
)

from dllm import distributed
from dllm.core.model import ModelArgs, Transformer


# the dimension each fairscale layer splits its weight along
SPLIT_DIMS = {ColumnParallelLinear: 0, VocabParallelEmbedding: 0, RowParallelLinear: 1, ParallelEmbedding: 1}
LAYER_INDEX = re.compile(r"^layers\.\d+\.")


@functools.lru_cache(maxsize=2)
def split_dims(tied_embeddings: bool) -> Dict[str, int]:
    """Parameter name (block index as `layers.*.`) -> split dim, for every split parameter of a model
    with LoRA and D-LLM routers, read from a one-block model's module types."""
    distributed.setup_if_needed()
    mp = distributed.mp_size()  # every split size a multiple of it
    args = ModelArgs(dim=4 * mp, n_layers=1, n_heads=mp, hidden_dim=4 * mp, vocab_size=8 * mp, max_seq_len=4,
                     lora_rank=1, dynamic_start_layer=0, dynamic_router_hdim=4, tie_word_embeddings=tied_embeddings)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
        model = Transformer(args)
    dims = {}
    for module_name, module in model.named_modules():
        dim = next((d for kind, d in SPLIT_DIMS.items() if isinstance(module, kind)), None)
        if dim is not None:
            dims[LAYER_INDEX.sub("layers.*.", f"{module_name}.weight")] = dim
    return dims


def shard_dim(name: str, tied_embeddings: bool = False) -> Optional[int]:
    """The dimension a tensor is split along across model-parallel ranks, or None if replicated.
    A tied embedding is split by vocabulary, like the output projection it doubles as."""
    return split_dims(tied_embeddings).get(LAYER_INDEX.sub("layers.*.", name))


def shard_state_dict(state_dict: Dict[str, torch.Tensor], mp_size: int, rank: int,
                     tied_embeddings: bool = False) -> Dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state_dict.items():
        dim = shard_dim(name, tied_embeddings)
        out[name] = tensor if dim is None else tensor.chunk(mp_size, dim)[rank].clone()
    return out


def unshard_state_dict(shards: List[Dict[str, torch.Tensor]], tied_embeddings: bool = False) -> Dict[str, torch.Tensor]:
    """The inverse of shard_state_dict: model-parallel shards concatenated into full tensors."""
    out = {}
    for name, tensor in shards[0].items():
        dim = shard_dim(name, tied_embeddings)
        out[name] = tensor if dim is None or len(shards) == 1 else torch.cat([s[name] for s in shards], dim)
    return out
