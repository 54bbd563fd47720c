"""Benchmarks: scripts that measure and write benchmarks/results/; run from the repository root as
`python -m benchmarks.NAME` (this file makes the folder a package that wins over fairscale's own
top-level `benchmarks`)."""
