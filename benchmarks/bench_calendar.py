"""Calendar labels on real data: the pooled features against the bench's ``activity`` baseline.

Run:  python benchmarks/bench_calendar.py        (writes bench-results/calendar.json)
      python benchmarks/bench_calendar.py --no-calendar --name calendar-off   (the pooled features
      without absolute time: ``UserDataModule(calendar=False)``, as before it existed)

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="calendar", help="bench-results/<name>.json")
    ap.add_argument("--no-calendar", action="store_true", help="the pooled features without absolute time")
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
        out = run_bench(dm, str(tmp / "bench"), representations=["pooled"], baselines=["activity", "majority"],
                        storage_bytes=[], compare=[["pooled", "activity"]], progress=False)
    figures = {row: {t: {"auc": out["results"][row][t]["auc"]} for t in LABELS} for row in ("pooled", "activity")}
    figures["pairs"] = {t: out["pairs"][t] for t in LABELS}
    figures["test_users"] = int((dm.split == 2).sum())
    write_results(args.name, figures, {"data": "movielens-100k ratings, item-free, day windows", "labels": LABELS,
                                       "calendar": not args.no_calendar})


if __name__ == "__main__":
    main()
