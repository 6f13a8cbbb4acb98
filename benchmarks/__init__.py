"""Benchmarks: each prints ratios against a reference run in the same process (machines are noisy); results and
the machine they ran on go in BENCHMARKS.md. Run one from the repository root: ``python -m benchmarks.<name>``."""
