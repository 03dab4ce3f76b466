"""The paired bootstrap's cost: the vectorised resamples (:mod:`foundv2.metrics.bootstrap`) against
one resample at a time through the reported metric functions, side by side in one run, on every
task kind of the bench.

    python research/bootstrap_speed.py [--users 100000] [--resamples 1000] [--reference-resamples 20]

The one-at-a-time reference runs ``--reference-resamples`` resamples and is extrapolated to
``--resamples`` (at 100,000 users it takes seconds per resample). Up to 20,000 users both give the
same differences; above, the vectorised one uses Poisson weights and first-order AUCs, and the
printed intervals show how close they stay. Writes ``bench-results/bootstrap.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_results  # noqa: E402
from foundv2.bench.probes import paired_bootstrap, score_predictions  # noqa: E402
from foundv2.metrics.bootstrap import EXACT_MAX_USERS, reference_differences  # noqa: E402

#: (task kind, metric, columns) as the synthetic bench has them: churn, segment, future categories, next items
CASES = [("binary", "auc", 1), ("multiclass", "accuracy", 6), ("multiclass", "macro_auc", 6),
         ("multilabel", "macro_auc", 18), ("ranking", "mean", 1)]


def scores(kind: str, n: int, C: int, rng: np.random.Generator):
    """Two scorers of the same users, the second noisier."""
    if kind == "ranking":
        base = rng.random(n)
        return base, np.clip(base + rng.normal(0, 0.1, n), 0, 1), None
    if kind == "multiclass":
        y = rng.integers(0, C, n)
        onehot = np.eye(C)[y]
        return onehot + rng.normal(0, 1.2, (n, C)), onehot + rng.normal(0, 1.4, (n, C)), y
    y = (rng.random((n, C)) < np.linspace(0.05, 0.5, C)).astype(np.int64)
    a, b = y + rng.normal(0, 1.5, (n, C)), y + rng.normal(0, 1.8, (n, C))
    return (a[:, 0], b[:, 0], y[:, 0]) if kind == "binary" else (a, b, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--reference-resamples", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    figures = {}
    for kind, metric, C in CASES:
        a, b, y = scores(kind, args.users, C, rng)
        t = time.perf_counter()
        fast = paired_bootstrap(kind, a, b, y, metric=None if kind == "ranking" else metric, n_boot=args.resamples)
        t_fast = time.perf_counter() - t
        t = time.perf_counter()
        ref = reference_differences(kind, metric, a, b, y, score_predictions, n_boot=args.reference_resamples)
        t_ref = (time.perf_counter() - t) * args.resamples / args.reference_resamples
        name = f"{kind}/{metric}" + (f" ({C} columns)" if C > 1 else "")
        figures[name] = {"vectorised_s": t_fast, "one_at_a_time_s": t_ref, "ratio": t_ref / t_fast,
                         "interval": [fast["lo"], fast["hi"]], "delta": fast["delta"],
                         "reference_spread": float(ref.std()) if ref.size > 1 else None}
        print(f"{name:32s} vectorised {t_fast:7.2f} s   one at a time {t_ref:9.1f} s (from {args.reference_resamples})"
              f"   x{t_ref / t_fast:,.0f}   interval [{fast['lo']:+.5f}, {fast['hi']:+.5f}]", flush=True)
    write_results("bootstrap", {"users": args.users, "resamples": args.resamples,
                                "path": "exact" if args.users <= EXACT_MAX_USERS else "first-order", "cases": figures},
                  vars(args))


if __name__ == "__main__":
    main()
