"""Stage 1: Q-Former features against pooled features, an objective ablation, training speed.

Run:  make bench-qformer      (writes bench-results/qformer.json and its tables into docs/benchmarks.md)
      python benchmarks/bench_qformer.py --docs    (rewrite the docs block from qformer.json only)

For each data set the shipped config (experiments/<data>/qformer.yaml) is trained as is (the
full objective), then once more with each objective switched off in turn; each variant's
predict writes its features and per-user embeddings, which go through the bench's label
probes (a quick bench: next_items is left out). Pooled features are probed beside them, and
``vs_pooled`` holds each variant's difference from pooled per task with a paired-bootstrap 95 %
interval over the test users (an interval above 0 = clearly better).
`users_per_s` is training users per second of fit wall time (2 CPU cores here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine, previous_figures, write_results  # noqa: E402

from foundv2.bench.report import write_block  # noqa: E402

CONFIGS = {"synthetic": "experiments/synthetic/qformer.yaml", "movielens-1m": "experiments/movielens-1m/qformer.yaml"}
DOCS = ROOT / "docs" / "benchmarks.md"
LABELS = {"full": "all objectives", "no_fine": "without fine-grained", "no_window": "without window",
          "no_semantic": "without semantic", "no_recon": "without reconstruction"}
VARIANTS = {"full": {}, "no_fine": {"fine": False}, "no_window": {"window": False},
            "no_semantic": {"semantic": False}, "no_recon": {"recon": False}}


def fit_and_predict(config: str, run_dir: Path, enabled: dict, extra: list[str]) -> dict:
    import lightning as L

    from foundv2.launch import lightning_cli

    args = ["--config", str(ROOT / Path(config).parent / "data.yaml"), "--config", str(ROOT / config), "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            "--model.objectives.enabled", json.dumps(enabled), *extra]
    cli = lightning_cli(args, run=False)
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - t0
    n_train = len(cli.datamodule.rows("train")) * cli.trainer.current_epoch
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    cli.model.predict_dir = str(run_dir / "features")
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).predict(
        cli.model, datamodule=cli.datamodule, return_predictions=False)
    return {"fit_seconds": fit_s, "users_per_s": n_train / fit_s, "metrics": metrics,
            "features": str(run_dir / "features"), "dm": cli.datamodule}


def probe_vs_pooled(dm, features: dict[str, str], n_boot: int = 1000) -> tuple[dict, dict]:
    """The protocol's label probes (chosen on val, metrics on test) on pooled features and on every
    stage-1 output, then each output against pooled on the same test users: per task the
    difference of the probe metric with a paired-bootstrap 95 % interval
    (:func:`foundv2.bench.probes.paired_bootstrap`). "Clearly better" = the interval is above 0.

    Returns ``(probe, vs_pooled)``: ``probe[rep][task]`` metrics (plus ``bytes_per_user``),
    ``vs_pooled[rep][task]`` = ``{delta, lo, hi, p_le_0}`` (multi-class tasks also under
    ``task:accuracy``).
    """
    from foundv2.bench.baselines import majority
    from foundv2.bench.probes import fit_label_probe, paired_bootstrap
    from foundv2.bench.run import embedding_representation, load_bench_data, pooled_representation

    data = load_bench_data(dm)
    n = len(data.split)
    reps = {"pooled": pooled_representation(dm)}
    reps.update({name: embedding_representation(Path(folder), n) for name, folder in features.items()})
    test = data.split == 2
    probe: dict[str, dict] = {name: {"bytes_per_user": b} for name, (_, b) in reps.items()}
    vs_pooled: dict[str, dict] = {name: {} for name in features}
    for task in data.tasks:
        if task.kind == "ranking":
            continue
        y_test = task.y[test]
        scores = {}
        for name, (X, _) in reps.items():
            keep: dict = {}
            t0 = time.perf_counter()
            probe[name][task.name] = fit_label_probe(X, task.y, data.split, task.kind, scores_out=keep)
            probe[name][task.name]["seconds"] = time.perf_counter() - t0
            scores[name] = keep["test"]
        probe.setdefault("majority", {})[task.name] = majority(task.y, data.split, task.kind)[0]
        metrics = ["macro_auc", "accuracy"] if task.kind == "multiclass" else [None]  # None: the task's own
        for name in features:
            for metric in metrics:
                key = task.name if metric in (None, "macro_auc") else f"{task.name}:{metric}"
                vs_pooled[name][key] = paired_bootstrap(task.kind, scores[name], scores["pooled"], y_test,
                                                        metric=metric, n_boot=n_boot)
        print(task.name, {k: round(v[task.name]["delta"], 3) for k, v in vs_pooled.items()}, flush=True)
    return probe, vs_pooled


def _cell(v: dict) -> str:
    return f"{v['delta']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]"


def docs_block(figures: dict) -> str:
    """Per data set: every variant's probe figures beside pooled and majority, the full variant's
    paired intervals against pooled, and the fit times, as docs/benchmarks.md shows them."""
    m = machine()
    lines = [f"`make bench-qformer` ({m['cores']} cores, torch {m['libraries']['torch']}): the shipped configs "
             f"trained as they are, then once with each objective off; the bench's label probes on every "
             f"variant's `user_emb` and on the pooled features; `vs pooled`: the difference with a paired "
             f"95 % interval over the test users (1,000 resamples)."]
    for name, config in CONFIGS.items():
        f = figures.get(name)
        if not f:
            continue
        probe = f["probe"]
        tasks = [t for t, v in probe["pooled"].items() if isinstance(v, dict)]
        keys = {t: next(k for k in ("accuracy", "auc", "macro_auc") if k in probe["pooled"][t]) for t in tasks}
        fit = f["fit_seconds"]
        lines += ["", f"{name} (`{config}`): the full fit {fit['full']:.0f} s, {f['users_per_s']:.0f} training "
                      f"users/s; every variant: " + ", ".join(f"{v} {s:.0f} s" for v, s in fit.items()) + ".", "",
                  "| representation | " + " | ".join(f"{t} {keys[t]}" for t in tasks) + " | bytes/user |",
                  "|---" * (len(tasks) + 2) + "|"]
        for rep in ["pooled", *(f"qformer_{v}" for v in fit), "majority"]:
            row = probe.get(rep)
            if row is None:
                continue
            label = LABELS.get(rep.removeprefix("qformer_"), rep)
            size = row.get("bytes_per_user")
            lines.append(f"| {label} | " + " | ".join(f"{row[t][keys[t]]:.4f}" if t in row else "-" for t in tasks)
                         + f" | {'' if size is None else format(size, ',.0f')} |")
            if rep == "qformer_full":
                vs = f["vs_pooled"][rep]
                lines.append("| vs pooled | " + " | ".join(
                    _cell(vs.get(f"{t}:accuracy", vs[t])) if t in vs else "-" for t in tasks) + " | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-qformer"))
    ap.add_argument("--only", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--extra", default="", help="extra CLI flags for every fit, e.g. '--trainer.max_epochs 1'")
    ap.add_argument("--docs", action="store_true", help="only rewrite the docs block from bench-results/qformer.json")
    a = ap.parse_args()
    if a.docs:
        write_block(DOCS, "bench_qformer", "make bench-qformer", docs_block(json.loads((RESULTS / "qformer.json").read_text())))
        return
    # one data set re-run: keep the other data set's figures from the last run
    figures = previous_figures("qformer", CONFIGS) if a.only else {}
    for name, config in CONFIGS.items():
        if a.only and name != a.only:
            continue
        runs = {}
        for v in a.variants.split(","):
            runs[v] = fit_and_predict(config, Path(a.out) / name / v, VARIANTS[v], a.extra.split())
            print(name, v, f"{runs[v]['users_per_s']:.1f} users/s", flush=True)
        probe, vs_pooled = probe_vs_pooled(runs["full"]["dm"], {f"qformer_{v}": r["features"] for v, r in runs.items()})
        figures[name] = {
            "probe": probe,
            "vs_pooled": vs_pooled,
            "users_per_s": runs["full"]["users_per_s"],
            "fit_seconds": {v: r["fit_seconds"] for v, r in runs.items()},
            "final_losses": {v: r["metrics"] for v, r in runs.items()},
            "config": config,
        }
        print(json.dumps({k: v for k, v in figures[name].items() if k != "final_losses"}, indent=1), flush=True)
    write_results("qformer", figures, {"configs": CONFIGS, "variants": a.variants, "extra": a.extra})
    write_block(DOCS, "bench_qformer", "make bench-qformer", docs_block(figures))


if __name__ == "__main__":
    main()
