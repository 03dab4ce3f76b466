"""The paired bootstrap's cost on a multi-class task: the numpy resample metric against the
torchmetrics one it replaces, side by side in one run (same resamples, same interval).

    python benchmarks/bench_bootstrap.py [--users 615] [--classes 21] [--resamples 200]

MovieLens-1M's test split is 615 users and occupation has 21 classes; the bench runs 1,000
resamples per pair and task.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import foundv2.bench.probes as probes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=615)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--resamples", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    a, b = (rng.dirichlet(np.ones(args.classes), args.users) for _ in range(2))
    y = rng.integers(0, args.classes, args.users)
    t = time.perf_counter()
    fast = probes.paired_bootstrap("multiclass", a, b, y, n_boot=args.resamples)
    t_fast = time.perf_counter() - t
    keep = probes._resample_metric
    probes._resample_metric = lambda kind, metric: None  # every resample through score_predictions
    try:
        t = time.perf_counter()
        slow = probes.paired_bootstrap("multiclass", a, b, y, n_boot=args.resamples)
        t_slow = time.perf_counter() - t
    finally:
        probes._resample_metric = keep
    print(f"{args.resamples} resamples, {args.users} users x {args.classes} classes (macro AUC): "
          f"numpy {t_fast:.2f} s, torchmetrics {t_slow:.2f} s, ratio {t_slow / t_fast:.1f}")
    print(f"interval numpy [{fast['lo']:.6f}, {fast['hi']:.6f}], torchmetrics [{slow['lo']:.6f}, {slow['hi']:.6f}]")


if __name__ == "__main__":
    main()
