"""The linear-probe benchmark on MovieLens-1M, end to end on this machine.

Run:  make bench-probe      (writes bench-results/probe.json: the run's bench.json plus timings,
                              its table into docs/benchmarks.md, its summary into README.md)
      python benchmarks/bench_probe.py --no-repeat    (skip the second run of the token steps)
      python benchmarks/bench_probe.py --docs         (rewrite the docs and README blocks from probe.json only)

It runs `foundv2 pipeline --config experiments/movielens-1m/probe-pipeline.yaml` from scratch
(stage 1, the per-window tokenizer, the user-level tokenizers, then every representation and
baseline) in a fresh run folder and records the wall time of each step and the machine's load
(1-minute load average before and after: the cores are shared). Then, unless ``--no-repeat``, it
runs the token steps of the same config a second time into another folder and compares the
token datasets column by column: ``repeat.identical`` says whether the same config gave the
same tokens (the bench's probes are seeded, so identical tokens give identical token rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine, write_results  # noqa: E402

from foundv2.bench.report import summary_table, table, write_block  # noqa: E402

CONFIG = "experiments/movielens-1m/probe-pipeline.yaml"
TOKEN_STEPS = ("tokenizer", "user_tokens16", "user_tokens64")
TOKEN_COLUMNS = ("token_ids", "codes", "user_codes", "user_emb")
DOCS = ROOT / "docs" / "benchmarks.md"


def load() -> float:
    return os.getloadavg()[0]


def pipeline(config: str, run_dir: Path) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "foundv2", "pipeline", "--config", config,
                    "--pipeline.run_dir", str(run_dir)], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def same_tokens(a: Path, b: Path) -> dict:
    """Per token step: whether every token column of the two runs' outputs is identical."""
    from data_modules.store import read_stage_output

    out = {}
    for step in TOKEN_STEPS:
        da, _ = read_stage_output(a / step / "tokens")
        db, _ = read_stage_output(b / step / "tokens")
        cols = [c for c in TOKEN_COLUMNS if c in da.column_names]
        same = len(da) == len(db)
        for c in cols:
            order_a, order_b = np.argsort(da["row"]), np.argsort(db["row"])
            va = [np.asarray(da[int(i)][c]).tolist() for i in order_a]
            vb = [np.asarray(db[int(i)][c]).tolist() for i in order_b]
            same &= va == vb
        out[step] = {"columns": cols, "identical": bool(same)}
    return out


def docs_block(figures: dict) -> str:
    """The run's timings, its console table (rows, verdicts, storage budgets) and the repeat
    check, as docs/benchmarks.md shows them."""
    m = machine()
    steps = ", ".join(f"{name} {t:.0f} s" for name, t in figures["pipeline_timings"].items() if name != "total")
    load = figures["load_average_1min"]
    lines = [f"`make bench-probe` ({m['cores']} cores, torch {m['libraries']['torch']}): `foundv2 pipeline --config "
             f"{CONFIG}` in a fresh run folder, {figures['end_to_end_s']:,.0f} s end to end ({steps}); 1-minute "
             f"load {load['before']:.1f} before, {load['after']:.1f} after.", "", "```", table(figures), "```"]
    rep = figures.get("repeat")
    if rep:
        same = ", ".join(f"{step} ({'/'.join(v['columns'])}): {'identical' if v['identical'] else 'DIFFERENT'}"
                         for step, v in rep["steps"].items())
        lines += ["", f"The token steps run a second time into another folder ({rep['seconds']:.0f} s), column by "
                      f"column: {same}."]
    return "\n".join(lines)


def write_docs(figures: dict) -> None:
    """The run's whole table into docs/benchmarks.md and its summary into the README."""
    write_block(DOCS, "bench_probe", "make bench-probe", docs_block(figures))
    write_block(ROOT / "README.md", "make bench-probe's summary", "make bench-probe", summary_table(figures))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-repeat", action="store_true", help="skip the second run of the token steps")
    ap.add_argument("--docs", action="store_true", help="only rewrite the docs block from bench-results/probe.json")
    args = ap.parse_args()
    if args.docs:
        write_docs(json.loads((RESULTS / "probe.json").read_text()))
        return
    run_dir = ROOT / "runs" / "movielens-1m" / "probe"
    load_before = load()
    wall = pipeline(CONFIG, run_dir)
    load_after = load()
    bench = json.loads((run_dir / "bench" / "bench.json").read_text())
    timings = json.loads((run_dir / "timings.json").read_text())
    figures = {**bench, "pipeline_timings": timings, "end_to_end_s": wall,
               "load_average_1min": {"before": load_before, "after": load_after}}
    write_results("probe", figures, {"config": CONFIG})  # rewritten below with the repeat check
    if not args.no_repeat:
        cfg = yaml.safe_load((ROOT / CONFIG).read_text())
        cfg["pipeline"]["steps"] = [s for s in cfg["pipeline"]["steps"] if s["name"] in TOKEN_STEPS]
        repeat_cfg = ROOT / "runs" / "movielens-1m" / "probe-repeat.yaml"
        repeat_cfg.write_text(yaml.safe_dump(cfg))
        repeat_dir = ROOT / "runs" / "movielens-1m" / "probe-repeat"
        t = pipeline(str(repeat_cfg.relative_to(ROOT)), repeat_dir)
        steps = same_tokens(run_dir, repeat_dir)
        figures["repeat"] = {"seconds": t, "steps": steps, "identical": all(s["identical"] for s in steps.values())}
        write_results("probe", figures, {"config": CONFIG})
    write_docs(figures)
    shutil.copyfile(run_dir / "bench" / "metric_vs_bytes.png", DOCS.parent / "metric_vs_bytes_movielens-1m.png")


if __name__ == "__main__":
    main()
