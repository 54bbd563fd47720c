"""Importing dllm keeps freed host memory (dllm/host_memory.py): steady training steps fault no pages back in,
and large tensors sit on huge pages."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT

# a small training step whose logits (4 x 256 x 32000 fp32, 131 MB) are above glibc's mmap threshold;
# the heap takes some steps to reach its largest (it still grew now and then after ten), then stays
PROBE = """
import resource
import dllm
import torch
from dllm import distributed
from dllm.core.model import ModelArgs, Transformer
from dllm.core.objective import compute_loss
distributed.setup()
torch.manual_seed(0)
model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=32000, max_seq_len=256, max_batch_size=4,
                              routing="dense"))
model.set_adapter_trainable(True)
model.train()
tokens = torch.randint(0, 32000, (4, 256))
batch = (tokens, tokens, torch.ones_like(tokens), torch.ones_like(tokens, dtype=torch.bool))
def step():
    c_loss, _, _ = compute_loss(model, *batch)
    c_loss.backward()
    model.zero_grad(set_to_none=True)
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(dllm.KEEPS_FREED_MEMORY, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(keep: str):
    # huge pages off: they cut the faults of plain glibc too (6,900 in three steps), hiding what malloc's settings do
    env = {**os.environ, "DLLM_KEEP_FREED_MEMORY": keep, "OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()[-2:]
    return applied == "True", int(faults)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's malloc only")
def test_steady_training_steps_fault_no_pages_back_in():
    applied, kept_faults = probe("1")
    off, plain_faults = probe("0")
    assert applied and not off
    assert plain_faults > 100_000  # glibc alone maps the logits afresh every step: the probe sees the cost
    assert kept_faults < plain_faults / 4  # most runs: under 10 faults; a heap still growing: 30,000


HUGE_PAGES_PROBE = """
import re
import dllm
import torch
tensors = [torch.ones(3 << 20) for _ in range(5)]  # 60 MB in allocations of 12 MB
print(dllm.USES_HUGE_PAGES, re.search(r"AnonHugePages:\\s+(\\d+) kB", open("/proc/self/smaps_rollup").read())[1])
"""


def kernel_thp_mode():
    try:
        return open("/sys/kernel/mm/transparent_hugepage/enabled").read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def huge_pages_probe(**env):
    """Run the probe with the environment's own THP_MEM_ALLOC_ENABLE replaced by env's, if any."""
    base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE], cwd=ROOT, env={**base, **env},
                         capture_output=True, text=True, check=True)
    applied, huge_kb = out.stdout.split()[-2:]
    return applied == "True", int(huge_kb)


@pytest.mark.skipif(kernel_thp_mode() not in ("madvise", "always"), reason="the kernel gives no transparent huge pages")
def test_large_tensors_are_backed_by_huge_pages():
    applied, huge_kb = huge_pages_probe()
    assert applied and huge_kb >= 20_000


@pytest.mark.skipif(kernel_thp_mode() != "madvise", reason="only in madvise mode does torch's request decide")
def test_huge_pages_off_switch():
    applied, huge_kb = huge_pages_probe(THP_MEM_ALLOC_ENABLE="0")
    assert not applied and huge_kb == 0
