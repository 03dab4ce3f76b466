"""Benchmark protocol ``foundv2-bench-v1``: linear probes and reference baselines."""
