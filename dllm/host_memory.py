"""Keep freed host memory in the process, so each training or decode step does not fault it back in.

glibc's malloc hands every block above its mmap threshold (128 KiB at first, at most 32 MiB) to the
kernel on free, and trims its heap's free top beyond twice that. A training step allocates and
frees the same activations every step, so each step maps them afresh and the kernel zero-fills
them page by page: on SmolLM2 (batch 4 x 256, 2 threads) about 100,000 minor page faults a step,
0.5 to 2.5 s of a 4.5 s step, varying with the heap's history, so two copies of one model differed
by 1.3x (issue 23). Kept, as CUDA's caching allocator keeps device memory, the faults fall to a
handful and steps take the same time every run. PyTorch's CPU tuning guide reaches the same end with
jemalloc or tcmalloc; glibc's own knobs need no extra library.

The settings must be made before torch is imported (made after, a small training step still faulted
63,000 pages in three steps against 3 when made before: most of what torch's import allocates is
already laid out), so `dllm/__init__.py` applies them first thing. The cost: the process's
resident memory stays at its peak instead of shrinking between steps. `DLLM_KEEP_FREED_MEMORY=0`
leaves malloc as it was.
"""
import ctypes
import ctypes.util
import os
import sys

KEEP_FREED_VARIABLE = "DLLM_KEEP_FREED_MEMORY"  # "0" leaves malloc as it is

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
SETTINGS = (
    (M_MMAP_MAX, 0),  # every block from the heap, where a freed one is reused (above 32 MiB too)
    (M_TRIM_THRESHOLD, (1 << 31) - 1),  # never give the heap's free top back
)


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as the module docstring says; False where it does not apply (not Linux,
    not glibc, or DLLM_KEEP_FREED_MEMORY=0)."""
    if os.environ.get(KEEP_FREED_VARIABLE, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
