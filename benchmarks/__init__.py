"""Benchmarks: scripts that measure and write benchmarks/results/; run from the repository root as
`python -m benchmarks.NAME` (this file makes the folder a package that wins over fairscale's own
top-level `benchmarks`)."""
import json
import os
import shlex
import sys

import dllm  # noqa: F401  before any benchmark imports torch: it keeps freed host memory (dllm/host_memory.py)
from dllm import host_memory
from dllm.atomic_io import atomic_write_text


# host memory switches (dllm/host_memory.py's, and torch's huge pages): a run that sets one says so
HOST_MEMORY_VARIABLES = (host_memory.KEEP_FREED_VARIABLE, "THP_MEM_ALLOC_ENABLE")


def command() -> str:
    """How this run was started, for a results file: `python -m benchmarks.NAME ARGS`, after any
    host memory variable the environment sets (`THP_MEM_ALLOC_ENABLE=1 python -m ...`)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    env = [f"{name}={shlex.quote(os.environ[name])}" for name in HOST_MEMORY_VARIABLES if name in os.environ]
    run = [f"python -m {spec.name}" if spec else f"python {sys.argv[0]}", shlex.join(sys.argv[1:])]
    return " ".join(env + run).strip()


def write_results(out, result: dict, table: str):
    """Print the table; with `out`, write the result as JSON there and the table beside it (.md)."""
    print(table)
    if out:
        atomic_write_text(json.dumps(result, indent=2) + "\n", out)
        atomic_write_text(table, os.path.splitext(out)[0] + ".md")
        print(f"wrote {out}")
