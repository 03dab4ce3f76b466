"""Stage 3 (AlignmentStage) against what it reads, on synthetic data and MovieLens-1M.

Run:  make bench-alignment        (writes bench-results/alignment.json)
      python benchmarks/bench_alignment.py --only synthetic|movielens-1m

For each data set it runs `foundv2 pipeline --config experiments/<data>/alignment-bench.yaml`
(stage 1 → tokenizer → stage 3, and stage 3 with each objective switched off in turn → the bench)
in its own run folder, resuming whatever is complete, and records:

- ``metrics``: each task's main metric for aligned_tokens, tokens_bag, tokens_sum, the stage-1
  features (qformer) and the best baseline of the run;
- ``vs``: the paired 95 % interval of aligned_tokens minus each of them (the bench's ``pairs``),
  and the verdict word (beats: interval above 0; tie: it includes 0; loses);
- ``ablation``: aligned_tokens minus stage 3 with each objective off (a positive interval means
  the objective helps);
- ``append``: not measured yet (``foundv2 tokenize --append`` is not built; see issue 11).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, previous_figures, write_results  # noqa: E402

DATASETS = ("synthetic", "movielens-1m")
MAIN = {"binary": "auc", "multiclass": "accuracy", "multilabel": "macro_auc", "ranking": "ndcg@10"}
ROWS = ("aligned_tokens", "tokens_bag", "tokens_sum", "qformer")
BASELINES = ("tfidf", "ease", "itemknn", "sasrec", "tfidf_svd64_int8")


def word(c: dict) -> str:
    return "beats" if c["lo"] > 0 else "loses" if c["hi"] < 0 else "tie"


def figures(bench: dict) -> dict:
    res, out = bench["results"], {"metrics": {}, "vs": {}, "ablation": {}}
    for task, kind in bench["tasks"].items():
        key = MAIN[kind]
        have = {n: r[task][key] for n, r in res.items() if isinstance(r.get(task), dict) and key in r[task]}
        base = {n: v for n, v in have.items() if n in BASELINES}
        best = max(base, key=base.get) if base else None
        out["metrics"][task] = {"metric": key, **{n: have[n] for n in ROWS if n in have},
                                **({"best_baseline": best, best: have[best]} if best else {})}
        for c in bench.get("pairs", {}).get(task, []):
            entry = {k: c[k] for k in ("delta", "lo", "hi")} | {"verdict": word(c)}
            if c["b"].startswith("aligned_no_"):
                out["ablation"].setdefault(task, {})[c["b"].removeprefix("aligned_")] = entry
            elif c["b"] in ROWS or c["b"] == best:
                out["vs"].setdefault(task, {})[c["b"] + (" (best baseline)" if c["b"] == best else "")] = entry
    return out


def run(dataset: str) -> dict:
    config = f"experiments/{dataset}/alignment-bench.yaml"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "foundv2", "pipeline", "--config", config,
                    "--pipeline.on_change", "restart"], cwd=ROOT, check=True)
    run_dir = ROOT / "runs" / dataset / "alignment-bench"
    bench = json.loads((run_dir / "bench" / "bench.json").read_text())
    return {**figures(bench), "timings": json.loads((run_dir / "timings.json").read_text()),
            "wall_s": time.perf_counter() - t0, "config": config}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=DATASETS, help="one data set (the other's last figures are kept)")
    args = ap.parse_args()
    names = [args.only] if args.only else list(DATASETS)
    out = previous_figures("alignment", DATASETS)
    for name in names:
        out[name] = run(name)
    out["append"] = {"measured": False, "why": "foundv2 tokenize --append is not built yet (issue 11)"}
    write_results("alignment", out, {"datasets": names})


if __name__ == "__main__":
    main()
