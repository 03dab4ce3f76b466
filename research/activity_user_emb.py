"""Stage 1's user embedding with and without the activity features, against the ``activity`` row.

Run:  python research/activity_user_emb.py experiments/files-purchases/pipeline.yaml
      python research/activity_user_emb.py experiments/synthetic/pipeline.yaml
      python research/activity_user_emb.py experiments/movielens-1m/pipeline.yaml
      (writes bench-results/activity_user_emb.<data set>.json and prints a markdown table)

It runs the shipped pipeline's stage-1 step (resumable: a finished step is skipped), then writes stage 1's
``user_emb`` without its activity columns as a second representation (the learned state alone,
as before the activity features existed; training never reads them, so the two embeddings share
every learned column), and benches both beside the ``activity`` baseline with the paired 95 %
intervals of ``qformer - activity``, ``qformer_state - activity`` and ``qformer - qformer_state``
on every label task, on the metric the bench's tables show.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, write_results  # noqa: E402

from foundv2.bench.report import write_block  # noqa: E402

ROWS = ("qformer", "qformer_state", "activity")
PAIRS = [["qformer", "activity"], ["qformer_state", "activity"], ["qformer", "qformer_state"]]


def foundv2(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "foundv2", *args], cwd=ROOT, check=True)


def write_state(features: Path, folder: Path) -> None:
    """The learned state alone: ``user_emb`` of stage 1's output without its activity columns
    (the last ``activity_dim``; training never reads them, so the rest is what the stage gave
    before they existed), as a representation folder."""
    from data_modules.activity import activity_dim
    from data_modules.representations import write_representation
    from data_modules.store import read_stage_output

    ds, meta = read_stage_output(features)
    cols = ds.select_columns(["user_id", "row", "split", "user_emb"]).with_format("numpy")[:]
    emb = np.stack(cols["user_emb"]) if cols["user_emb"].dtype == object else cols["user_emb"]
    n_act = activity_dim(len([s for s in meta["sources"] if s != "profile"]))
    write_representation(folder, emb[:, :-n_act], cols["row"], cols["split"], cols["user_id"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline", help="a shipped pipeline YAML with a stage1 step and a bench step")
    args = ap.parse_args()
    spec = yaml.safe_load(Path(args.pipeline).read_text())["pipeline"]
    run = ROOT / spec["run_dir"]
    # the shipped pipeline's stage-1 step alone (in its run folder): nothing after it is read here
    only = run / "research-activity" / "pipeline.yaml"
    only.parent.mkdir(parents=True, exist_ok=True)
    step = next(s for s in spec["steps"] if s["name"] == "stage1")
    only.write_text(yaml.safe_dump({"pipeline": {**spec, "steps": [step]}}, sort_keys=False))
    foundv2("pipeline", "--config", str(only), "--pipeline.on_change", "restart")
    stage1 = run / "stage1"
    state = run / "research-activity" / "state"
    write_state(stage1 / "features", state)
    bench_step = next(s for s in spec["steps"] if s.get("kind") == "bench")
    out = run / "research-activity" / "bench"
    embeddings = {"qformer": str(stage1 / "features"), "qformer_state": str(state)}
    foundv2("bench", "--config", spec["data"], "--config", bench_step["config"],
            "--bench.output_dir", str(out), "--bench.embeddings", json.dumps(embeddings),
            "--bench.baselines", json.dumps(["activity", "majority"]), "--bench.representations", "[]",
            "--bench.tokens_dir", "null", "--bench.tokenizer_dir", "null",
            "--bench.skip_tasks", json.dumps(["next_items"]), "--bench.compare", json.dumps(PAIRS))
    bench = json.loads((out / "bench.json").read_text())
    tasks = [t for t in bench["pairs"]]
    lines = ["| task | metric | " + " | ".join(ROWS) + " | qformer − activity | qformer_state − activity "
             "| qformer − qformer_state |", "|---" * (5 + len(ROWS)) + "|"]
    for t in tasks:
        pairs = {(p["a"], p["b"]): p for p in bench["pairs"][t]}
        metric = next(iter(pairs.values()))["metric"]
        cells = [f"{bench['results'][r][t][metric]:.4f}" for r in ROWS]
        diffs = [f"{p['delta']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]" for p in (pairs[tuple(ab)] for ab in PAIRS)]
        lines.append(f"| {t} | {metric} | " + " | ".join(cells + diffs) + " |")
    name = Path(spec["data"]).parent.name
    sizes = {r: bench["results"][r]["bytes_per_user"] for r in ROWS}
    print(f"\n{name}: bytes per user " + ", ".join(f"{r} {b:g}" for r, b in sizes.items()))
    print("\n".join(lines))
    command = f"python research/activity_user_emb.py {args.pipeline}"
    m = machine()
    write_block(ROOT / "docs" / "benchmarks.md", f"activity_user_emb {name}", command,
                f"`{command}` ({m['cores']} cores, torch {m['libraries']['torch']}): {name}, stage 1's "
                f"`user_emb` with the activity features ({sizes['qformer']:g} B/user) and without them "
                f"({sizes['qformer_state']:g} B/user) against `activity` ({sizes['activity']:g} B/user); "
                f"Δ [paired 95 % interval] over the test users.\n\n" + "\n".join(lines))
    write_results(f"activity_user_emb.{name}", {"bytes_per_user": sizes, "pairs": bench["pairs"], "table": lines},
                  {"pipeline": args.pipeline, "rows": list(ROWS)})


if __name__ == "__main__":
    main()
