"""Calendar labels on real data: the pooled features against the bench's ``activity`` baseline.

Run:  python research/calendar_labels.py        (writes bench-results/calendar.json)
      python research/calendar_labels.py --no-calendar --name calendar-off   (the pooled features
      without absolute time: ``UserDataModule(calendar=False)``, as before it existed)
      add --qformer-epochs 8 for a small stage-1 Q-Former's user embedding as well

MovieLens-100k's ratings, read from the installed wheel, become an item-free ``files`` data set
in a temporary folder (one source ``rating``: a timestamp and a value, no item ids, no text),
with two labels tied to the calendar, computed from each user's whole rating log:

- ``cohort``: the user's first rating falls after the median first day (a signup cohort);
- ``lapsed``: the user's last rating falls before the median last day (a lifecycle stage).

The bench (``run_bench``: the ``pooled`` row, ``activity`` and ``majority``) runs on day windows
with the default 20 % future held back; ``pairs`` holds pooled − activity per label with its
paired 95 % interval. Without absolute time in the pooled features both labels were close to
chance for them while ``activity`` (first/last active day, recency) read them off.
Nothing derived from MovieLens is written outside the temporary folder except the figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import write_results  # noqa: E402

LABELS = ("cohort", "lapsed")


def write_item_free_movielens(folder: Path) -> dict:
    """ML-100k ratings as events.csv + users.csv with the calendar labels; the loader args."""
    from data_modules.sources.movielens import load_movielens

    _, events, _ = load_movielens("movielens-100k")
    ev = events[events["source"] == "rating"][["user_id", "source", "timestamp", "value"]]
    day = ev["timestamp"] // 86_400
    first, last = day.groupby(ev["user_id"]).min(), day.groupby(ev["user_id"]).max()
    users = pd.DataFrame({"user_id": first.index, "cohort": (first > first.median()).astype(int).to_numpy(),
                          "lapsed": (last < last.median()).astype(int).to_numpy()})
    ev.to_csv(folder / "events.csv", index=False)
    users.to_csv(folder / "users.csv", index=False)
    return {"events": str(folder / "events.csv"), "users": str(folder / "users.csv"), "sources": ["rating"],
            "labels": [{"name": n, "kind": "binary", "num_classes": 2} for n in LABELS]}


def fit_qformer(dm, folder: Path, epochs: int) -> str:
    """A small stage-1 Q-Former (seed 0) fitted on ``dm``; returns its predict output folder."""
    import lightning as L

    from foundv2.nn.qformer import QFormerConfig
    from foundv2.objectives import ObjectivesConfig
    from foundv2.stages.base import OptimConfig
    from foundv2.stages.qformer import QFormerStage

    L.seed_everything(0)
    stage = QFormerStage(qformer=QFormerConfig(dim=32, num_queries=1, num_layers=1, num_heads=2),
                         objectives=ObjectivesConfig(enabled={"semantic": False}),
                         optim=OptimConfig(lr=2e-3, warmup_steps=5, cosine=True))
    opts = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(folder)}
    L.Trainer(max_epochs=epochs, enable_checkpointing=False, **opts).fit(stage, dm)
    stage.predict_dir = str(folder / "features")
    L.Trainer(**opts).predict(stage, dm, return_predictions=False)
    return stage.predict_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="calendar", help="bench-results/<name>.json")
    ap.add_argument("--no-calendar", action="store_true", help="the models without absolute time")
    ap.add_argument("--qformer-epochs", type=int, default=0,
                    help="also fit a small stage-1 Q-Former this many epochs and bench its user embedding")
    args = ap.parse_args()
    from data_modules.datamodule import UserDataModule
    from foundv2.bench.run import run_bench

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loader_args = write_item_free_movielens(tmp)
        dm = UserDataModule(dataset="files", loader_args=loader_args, window_mode="day", text_encoder="hashing",
                            cache_dir=str(tmp / "cache"), batch_size=64, progress=False,
                            calendar=not args.no_calendar)
        dm.prepare_data()
        rows = ["pooled", "activity"]
        embeddings = {}
        if args.qformer_epochs:
            embeddings["qformer"] = fit_qformer(dm, tmp / "qformer", args.qformer_epochs)
            rows.insert(1, "qformer")
        out = run_bench(dm, str(tmp / "bench"), embeddings=embeddings, representations=["pooled"],
                        baselines=["activity", "majority"], storage_bytes=[],
                        compare=[[r, "activity"] for r in rows[:-1]], progress=False)
    figures = {row: {t: {"auc": out["results"][row][t]["auc"]} for t in LABELS} for row in rows}
    figures["pairs"] = {t: out["pairs"][t] for t in LABELS}
    figures["test_users"] = int((dm.split == 2).sum())
    write_results(args.name, figures, {"data": "movielens-100k ratings, item-free, day windows", "labels": LABELS,
                                       "calendar": not args.no_calendar, "qformer_epochs": args.qformer_epochs})


if __name__ == "__main__":
    main()
