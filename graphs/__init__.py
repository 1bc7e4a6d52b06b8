"""graphs: execution transforms that must not change results (compile, recompute, precision, benchmarks)."""
