"""Tools that build artefacts; run from the repository root as `python -m tools.NAME`."""
import dllm  # noqa: F401  before any tool imports torch: it keeps freed host memory (dllm/host_memory.py)
