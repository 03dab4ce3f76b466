"""The linear-probe benchmark on MovieLens-1M, end to end on this machine.

Run:  make bench-probe      (writes bench-results/probe.json: the run's bench.json plus timings)

It runs `foundv2 pipeline --config experiments/movielens-1m/probe-pipeline.yaml` from scratch
(tokenizer fit + predict over pooled features, then every representation and baseline) in a
fresh run folder, and records the wall time of each step.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_results  # noqa: E402

CONFIG = "experiments/movielens-1m/probe-pipeline.yaml"


def main() -> None:
    run_dir = ROOT / "runs" / "movielens-1m" / "probe"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "foundv2", "pipeline", "--config", CONFIG], cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    bench = json.loads((run_dir / "bench" / "bench.json").read_text())
    timings = json.loads((run_dir / "timings.json").read_text())
    write_results("probe", {**bench, "pipeline_timings": timings, "end_to_end_s": wall}, {"config": CONFIG})


if __name__ == "__main__":
    main()
