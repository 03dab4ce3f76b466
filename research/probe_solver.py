"""The bench's logistic probes with and without warm starts across C, side by side in one run.

Run:  python research/probe_solver.py      (writes bench-results/probe_solver.json)

The bench picks C from (0.01, 0.1, 1, 10) on the validation users; a dense multi-label task
(MovieLens-1M future genres: 18 one-vs-rest LBFGS fits per C) dominated `make bench-probe`.
Each C's fit now starts from the previous, smaller C's solution. This script probes
MovieLens-1M's pooled features (the largest dense row of the bench) on the three classification
kinds both ways, alternately, and reports the seconds, the ratio and the metric differences
(same optimum to the solver's tolerance, so the metrics agree to a few 1e-4).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import ROOT, write_results  # noqa: E402

TASKS = ("gender", "age", "future_genres")


def main() -> None:
    import torch

    from data_modules.datamodule import UserDataModule
    from foundv2.bench.probes import fit_logistic_probe
    from foundv2.bench.run import load_bench_data, pooled_representation

    torch.set_num_threads(2)
    cfg = yaml.safe_load((ROOT / "experiments" / "movielens-1m" / "data.yaml").read_text())["data"]
    dm = UserDataModule(**cfg, progress=False)  # the shipped data config, as the bench reads it
    dm.prepare_data()
    data = load_bench_data(dm)
    X, _ = pooled_representation(dm)
    tasks = {t.name: t for t in data.tasks}
    out = {}
    for name in TASKS:
        task = tasks[name]
        row = {}
        for mode in ("cold", "warm", "cold", "warm"):  # alternate: the machine's load drifts
            t0 = time.perf_counter()
            m = fit_logistic_probe(X, task.y, data.split, task.kind, warm_start=mode == "warm")
            row.setdefault(mode, []).append({"seconds": time.perf_counter() - t0, **m})
        cold, warm = (min(row[k], key=lambda r: r["seconds"]) for k in ("cold", "warm"))
        metric = next(k for k in ("auc", "accuracy", "macro_auc") if k in cold)
        out[name] = {"kind": task.kind, "cold_s": cold["seconds"], "warm_s": warm["seconds"],
                     "speedup": cold["seconds"] / warm["seconds"], "metric": metric, "cold": cold[metric],
                     "warm": warm[metric], "C_cold": cold["C"], "C_warm": warm["C"]}
        print(f"{name:14s} cold {cold['seconds']:7.1f} s  warm {warm['seconds']:7.1f} s  "
              f"x{out[name]['speedup']:.2f}  {metric} {cold[metric]:.4f} vs {warm[metric]:.4f}", flush=True)
    write_results("probe_solver", {"tasks": out, "rows": int(X.shape[0]), "dim": int(X.shape[1])},
                  {"representation": "pooled (MovieLens-1M)", "Cs": [0.01, 0.1, 1.0, 10.0]})


if __name__ == "__main__":
    main()
