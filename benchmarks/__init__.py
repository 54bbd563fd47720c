"""Benchmarks: scripts that measure and write benchmarks/results/; run from the repository root as
`python -m benchmarks.NAME` (this file makes the folder a package that wins over fairscale's own
top-level `benchmarks`)."""
import json
import os
import shlex
import sys

import dllm  # noqa: F401  before any benchmark imports torch: it keeps freed host memory (dllm/host_memory.py)
from dllm.atomic_io import atomic_write_text


def command() -> str:
    """How this run was started, for a results file: `python -m benchmarks.NAME ARGS`."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return " ".join([f"python -m {spec.name}" if spec else f"python {sys.argv[0]}", shlex.join(sys.argv[1:])]).strip()


def write_results(out, result: dict, table: str):
    """Print the table; with `out`, write the result as JSON there and the table beside it (.md)."""
    print(table)
    if out:
        atomic_write_text(json.dumps(result, indent=2) + "\n", out)
        atomic_write_text(table, os.path.splitext(out)[0] + ".md")
        print(f"wrote {out}")
