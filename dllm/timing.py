"""Timing that waits for the device: on a GPU a call returns once its kernels are queued, so a clock
read without synchronising measures the launches, not the work. Every benchmark and fidelity's
speed-ups time through this module."""
import time
from typing import Callable, Tuple, TypeVar

import torch

# wall time, or this process's CPU time: on a CPU shared with other jobs, what the run itself
# spent (its threads summed), not how long it waited for a core
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

T = TypeVar("T")


def synchronize(device):
    """Wait until the device has run everything queued on it (nothing to wait for on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        getattr(torch, device.type).synchronize()


def timed(fn: Callable[[], T], device, clock: str = "wall") -> Tuple[float, T]:
    """(seconds fn took, what it returned), the device synchronised before and after."""
    synchronize(device)
    start = CLOCKS[clock]()
    out = fn()
    synchronize(device)
    return CLOCKS[clock]() - start, out


class StepTimer:
    """Times each forward of a model (device synchronised): in a batch-1 generate() the first is the
    prefill and each later one a decode step."""

    def __init__(self, model):
        self.model, self.steps = model, []
        self._start = 0.0
        self._handles = [model.register_forward_pre_hook(self._begin), model.register_forward_hook(self._end)]

    def _begin(self, module, inputs):
        synchronize(self.model.tok_embeddings.weight.device)
        self._start = time.perf_counter()

    def _end(self, module, inputs, output):
        synchronize(self.model.tok_embeddings.weight.device)
        self.steps.append(time.perf_counter() - self._start)

    def close(self):
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> "StepTimer":
        return self

    def __exit__(self, *exc):
        self.close()

