"""State dicts read safely and copied into a model with their names and shapes checked: every file
goes through `torch.load(weights_only=True)`, so a checkpoint cannot run code, and every refusal is
one line naming the file."""
import os
import pickle
from typing import Dict

import torch

from dllm.core.model import Transformer, is_adapter_key
from dllm.errors import InputError


def load_file(path: str) -> Dict[str, torch.Tensor]:
    """torch.load with weights_only; every refusal becomes one line naming the file."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: refused by torch.load(weights_only=True): {first}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise InputError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


def check_state_dict(obj: dict, path: str) -> Dict[str, torch.Tensor]:
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{path}: expected a state dict (name -> tensor), entry {bad[0]!r} is {type(obj[bad[0]]).__name__}")
    return obj


# tensors that Meta's checkpoints carry but the model recomputes
IGNORED_KEYS = {"rope.freqs"}


def load_into(model: Transformer, state_dict: Dict[str, torch.Tensor], path: str, adapter: bool):
    """Copy tensors into the model after checking names and shapes (this rank's shard)."""
    own = model.state_dict()
    for name, tensor in state_dict.items():
        if name in IGNORED_KEYS:
            continue
        if name not in own:
            kind = "adapter" if adapter else "base"
            raise InputError(f"{path}: {kind} tensor {name!r} has no place in this model (check params.json / --lora_rank)")
        if adapter and not is_adapter_key(name):
            raise InputError(f"{path}: {name!r} is not a router or LoRA tensor; adapter files hold only those")
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise InputError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(own[name].shape)} (params.json does not match the checkpoint)"
            )
    missing = [k for k in own if is_adapter_key(k) == adapter and k not in state_dict]
    if missing:
        kind = "adapter" if adapter else "base"
        raise InputError(f"{path}: {kind} tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    with torch.no_grad():
        for name, tensor in state_dict.items():
            if name not in IGNORED_KEYS:
                own[name].copy_(tensor)
