"""Benchmark tool (`splitfuse bench`): workloads, arrival processes, a streaming load generator, metrics, sweeps, plots."""
