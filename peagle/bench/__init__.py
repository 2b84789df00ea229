"""Benchmarks behind the paper's overhead results: Table 2, memory scaling (and attention)."""
