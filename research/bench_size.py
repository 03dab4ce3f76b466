"""``foundv2 bench`` at growing sizes: wall seconds, seconds per user and peak resident memory of the
real command on synthetic users (10k and 100k by default), and what fitting the probes on a
sample of the train users (``bench.probe_users``) changes against fitting them on every one.

    python research/bench_size.py [--sizes 10000 100000] [--flags "--bench.baselines [majority]"]
    python research/bench_size.py --sample-sweep 100000 [--probe-users 5000 20000 all]

Each bench runs in its own process (``foundv2 bench --config experiments/synthetic/data.yaml
--config experiments/synthetic/bench.yaml --data.loader_args.n_users <n>`` plus ``--flags``,
without tokens), started by a small measuring process of this script so that its peak RSS is the
bench's alone. Data that is not prepared yet is prepared first (``foundv2 data``, not timed).
``--sample-sweep`` runs the same rows at one size with each ``--probe-users`` value and prints
each task's metric beside the all-users one. Writes ``bench-results/bench_size.json`` and
``docs/bench-size.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import RESULTS, ROOT, write_results  # noqa: E402

DATA = ROOT / "experiments" / "synthetic" / "data.yaml"
BENCH = ROOT / "experiments" / "synthetic" / "bench.yaml"
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
MAIN = {"binary": "auc", "multiclass": "accuracy", "multilabel": "macro_auc", "ranking": "ndcg@10"}


def measure_child(cmd: list[str]) -> None:
    """``--measure``: run ``cmd``; print its wall seconds, exit code and peak RSS (MB) as JSON."""
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env={**os.environ, **ENV}, cwd=ROOT)
    print(json.dumps({"seconds": time.perf_counter() - t0, "rc": rc,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def measured(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", "--", *cmd], capture_output=True, text=True,
                         cwd=ROOT)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if not lines:
        raise SystemExit(f"no measurement from {' '.join(cmd)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def foundv2() -> list[str]:
    return [sys.executable, "-m", "foundv2"]


def prepare(n: int) -> None:
    cmd = [*foundv2(), "data", "--config", str(DATA), "--data.loader_args.n_users", str(n), "--data.progress", "false"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True)


def bench(n: int, out: Path, flags: list[str]) -> dict:
    """One measured ``foundv2 bench`` run; its figures and those of its bench.json."""
    cmd = [*foundv2(), "bench", "--config", str(DATA), "--config", str(BENCH), "--data.loader_args.n_users", str(n),
           "--bench.tokens_dir", "null", "--bench.tokenizer_dir", "null", "--bench.output_dir", str(out),
           "--bench.progress", "false", "--bench.resume", "false", *flags]
    fig = measured(cmd)
    if fig["rc"] != 0:
        raise SystemExit(f"foundv2 bench exited {fig['rc']}: {' '.join(cmd)}")
    saved = json.loads((out / "bench.json").read_text())
    fig.update(users=n, seconds_per_user=fig["seconds"] / n,
               command=" ".join(shlex.quote(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c)
                                for c in cmd[2:]),
               read=saved["users"], not_run=saved["not_run"],
               rows={r: {t: m[t][MAIN[k]] for t, k in saved["tasks"].items() if isinstance(m.get(t), dict)}
                     for r, m in saved["results"].items()},
               row_seconds={r: round(sum(m[t]["seconds"] for t in saved["tasks"] if isinstance(m.get(t), dict)), 1)
                            for r, m in saved["results"].items()})
    return fig


def markdown(figures: dict) -> str:
    lines = ["# `foundv2 bench` at growing sizes", "",
             "Written by `python research/bench_size.py` (synthetic users, no tokens; one process per run, "
             f"{os.cpu_count()} cores shared with other work, so seconds are noisy: compare within one table).", ""]
    sizes = figures.get("sizes") or {}
    if sizes:
        lines += ["| users | seconds | seconds / user | peak RSS | train / val / test users read |", "|---|---|---|---|---|"]
        for n, f in sizes.items():
            r = f["read"]
            lines.append(f"| {int(n):,} | {f['seconds']:.0f} | {f['seconds_per_user'] * 1e3:.2f} ms | "
                         f"{f['peak_rss_mb']:,.0f} MB | {r['train']['read']:,} / {r['val']['read']:,} / "
                         f"{r['test']['read']:,} |")
        keys = sorted(sizes, key=int)
        if len(keys) > 1:
            small, big = sizes[keys[0]], sizes[keys[-1]]
            prev = sizes[keys[-2]]
            lines += ["", f"Peak RSS at {int(keys[-1]):,} users is {big['peak_rss_mb'] / small['peak_rss_mb']:.2f} x that "
                          f"at {int(keys[0]):,}; seconds per user at {int(keys[-1]):,} are "
                          f"{big['seconds_per_user'] / prev['seconds_per_user']:.2f} x those at {int(keys[-2]):,}."]
        lines += ["", f"Command (each size, its own `n_users` and output folder): `{next(iter(sizes.values()))['command']}`",
                  ""]
    sweep = figures.get("sample_sweep")
    if sweep:
        runs = sweep["runs"]
        lines += [f"## Probes fitted on a sample of the train users ({int(sweep['users']):,} users)", "",
                  "| probe_users | seconds | peak RSS | " + " | ".join(f"{r}/{t}" for r, t in sweep["cells"]) + " |",
                  "|---|---|---|" + "---|" * len(sweep["cells"])]
        for name, f in runs.items():
            cells = " | ".join(f"{f['rows'].get(r, {}).get(t, float('nan')):.4f}" for r, t in sweep["cells"])
            lines.append(f"| {name} | {f['seconds']:.0f} | {f['peak_rss_mb']:,.0f} MB | {cells} |")
        lines += ["", f"Flags: `{sweep['flags']}`", ""]
    return "\n".join(lines)


def main() -> None:
    if "--measure" in sys.argv:
        measure_child(sys.argv[sys.argv.index("--") + 1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--flags", default="", help="extra flags for every foundv2 bench, e.g. '--bench.sasrec_epochs 3'")
    ap.add_argument("--sample-sweep", type=int, default=None, help="a size at which to compare probe_users values")
    ap.add_argument("--probe-users", nargs="*", default=["5000", "20000", "all"])
    ap.add_argument("--sweep-flags", default="--bench.baselines [tfidf_svd] --bench.storage_bytes [16]",
                    help="the rows of the sweep (default: pooled and tfidf_svd16_int8)")
    args = ap.parse_args()
    out = RESULTS / "bench_size"
    figures: dict = {}
    if not args.sample_sweep:
        figures["sizes"] = {}
        for n in args.sizes:
            prepare(n)
            figures["sizes"][str(n)] = f = bench(n, out / str(n), shlex.split(args.flags))
            print(f"{n:>9,} users: {f['seconds']:7.0f} s  {f['seconds_per_user'] * 1e3:6.2f} ms/user  "
                  f"peak RSS {f['peak_rss_mb']:7,.0f} MB", flush=True)
    else:
        n = args.sample_sweep
        prepare(n)
        runs = {}
        for pu in args.probe_users:
            flags = [*shlex.split(args.sweep_flags), "--bench.probe_users", "null" if pu == "all" else pu,
                     *shlex.split(args.flags)]
            runs[pu] = f = bench(n, out / f"sweep-{n}-{pu}", flags)
            print(f"probe_users {pu:>6}: {f['seconds']:6.0f} s  peak RSS {f['peak_rss_mb']:6,.0f} MB  {f['rows']}",
                  flush=True)
        first = next(iter(runs.values()))
        cells = [(r, t) for r, tasks in first["rows"].items() if r != "majority" for t in tasks]
        figures["sample_sweep"] = {"users": n, "flags": args.sweep_flags, "cells": cells, "runs": runs}
    previous = json.loads((RESULTS / "bench_size.json").read_text()) if (RESULTS / "bench_size.json").exists() else {}
    if "sizes" in figures:  # a size measured again replaces its row; the others are kept
        figures["sizes"] = {**previous.get("sizes", {}), **figures["sizes"]}
    figures = {**{k: previous[k] for k in ("sizes", "sample_sweep") if k in previous}, **figures}
    figures["sizes"] = dict(sorted(figures.get("sizes", {}).items(), key=lambda kv: int(kv[0])))
    write_results("bench_size", figures, vars(args))
    doc = ROOT / "docs" / "bench-size.md"
    doc.write_text(markdown(figures) + "\n")
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
