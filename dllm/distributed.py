"""Process groups for torchrun and for plain Python processes.

fairscale's parallel layers need an initialised model-parallel group even for one process, so a
plain `python` run gets a one-process group of its own instead of an error.
"""
import atexit
import contextlib
import ctypes
import io
import os
import signal
import sys
from typing import Callable

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
    if "LOCAL_RANK" in os.environ:
        die_with_launcher()
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
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale's "> initializing ..." lines, on every rank
            fs_init.initialize_model_parallel(mp_size)
    elif fs_init.get_model_parallel_world_size() != mp_size:
        raise InputError(
            f"model parallel already initialised with size "
            f"{fs_init.get_model_parallel_world_size()}, asked for {mp_size}"
        )
    return device


def setup_if_needed() -> torch.device:
    """setup() with its defaults, unless a group is already up (whatever its model-parallel size)."""
    if dist.is_initialized() and fs_init.model_parallel_is_initialized():
        return default_device()
    return setup()


def die_with_launcher():
    """A torchrun worker ends when its launcher does, even when the launcher is killed with SIGKILL
    (else an orphan trains on and races the next run in its output directory). Linux only."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the launcher was gone before the request
        os._exit(1)


def on_main(check: Callable[[], None]):
    """Run check() on rank 0 alone; an InputError it raises is raised on every rank, so all stop together."""
    message = None
    if is_main():
        try:
            check()
        except InputError as e:
            message = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise InputError(message)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def mp_rank() -> int:
    return fs_init.get_model_parallel_rank()


def mp_src_rank() -> int:
    """The global rank of this model-parallel group's rank 0."""
    return fs_init.get_model_parallel_src_rank()


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
