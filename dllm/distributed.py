"""Process groups for torchrun and for plain Python processes.

fairscale's parallel layers need an initialised model-parallel group even for one process, so a
plain `python` run gets a one-process group of its own instead of an error.
"""
import atexit
import os

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from dllm.errors import InputError


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def base_dtype(device: torch.device) -> torch.dtype:
    """Frozen base weights: bf16 on CUDA, fp32 on the CPU (routers and LoRA stay fp32 anyway)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def setup(model_parallel_size: int = None) -> torch.device:
    """Initialise torch.distributed (gloo on CPU, nccl on CUDA) and fairscale model parallel.

    Under torchrun the world comes from the environment; without it a one-process group is made.
    Returns the device this process computes on.
    """
    device = default_device()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # a process group still alive at interpreter exit can abort the process (gloo's threads)
        atexit.register(teardown)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = dist.get_world_size()
    mp_size = model_parallel_size or world
    if world % mp_size:
        raise InputError(f"model_parallel_size {mp_size} does not divide world size {world}")
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(mp_size)
    elif fs_init.get_model_parallel_world_size() != mp_size:
        raise InputError(
            f"model parallel already initialised with size "
            f"{fs_init.get_model_parallel_world_size()}, asked for {mp_size}"
        )
    return device


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def mp_rank() -> int:
    return fs_init.get_model_parallel_rank()


def mp_size() -> int:
    return fs_init.get_model_parallel_world_size()


def dp_rank() -> int:
    return fs_init.get_data_parallel_rank()


def dp_size() -> int:
    return fs_init.get_data_parallel_world_size()


def dp_group():
    return fs_init.get_data_parallel_group()


def mp_group():
    return fs_init.get_model_parallel_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
