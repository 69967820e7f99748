"""The gateway's benchmark suite (run ``python bench/run.py``; see docs/benchmarks.md)."""
