"""Profiling and benchmarks: per-engine cost tables (``profile.json``) and interleaved end-to-end benchmarks."""
