"""Importing dllm keeps freed host memory (dllm/host_memory.py): steady training steps fault no pages back in."""
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
    env = {**os.environ, "DLLM_KEEP_FREED_MEMORY": keep, "OMP_NUM_THREADS": "1"}
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


def test_a_benchmark_run_records_the_host_memory_variables_it_was_given():
    probe = "import sys; sys.argv = ['bench', '--out', 'a b']; import benchmarks; print(benchmarks.command())"
    base = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "DLLM_KEEP_FREED_MEMORY")}
    for env, expected in (({}, "python bench --out 'a b'"),
                          ({"THP_MEM_ALLOC_ENABLE": "1", "DLLM_KEEP_FREED_MEMORY": "0"},
                           "DLLM_KEEP_FREED_MEMORY=0 THP_MEM_ALLOC_ENABLE=1 python bench --out 'a b'")):
        out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**base, **env}, capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == expected
