"""Data of any size: own files as folders, globs and lists, partitioned by user into buckets out of
core, prepared by one process or by two torchrun ranks with the same bytes, every row checked.

All through the real CLI on real files written by the synthetic generator
(:func:`write_synthetic_files`: every user's events spread over every file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from data_modules.prepare import load_meta
from data_modules.sources.synthetic import write_synthetic_files
from tests.helpers import ROOT, free_port, run_cli

N_USERS = 600
LABELS = [{"name": "segment", "kind": "multiclass", "num_classes": 6}, {"name": "churn", "kind": "binary"},
          {"name": "spender", "kind": "binary"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("own")
    write_synthetic_files(folder, N_USERS, n_files=4, chunk_users=200)
    return folder


def _config(tmp: Path, events, cache: Path, users: Path, **data) -> Path:
    cfg = {"data": {"dataset": "files", "loader_args": {
        "events": events, "users": str(users), "sources": ["payment", "item", "search", "app"],
        "tabular_inputs": ["age_norm", "region"], "labels": LABELS},
        "window_mode": "day", "text_encoder": "hashing", "cache_dir": str(cache), "progress": False, **data}}
    path = tmp / f"data-{abs(hash(json.dumps(cfg))) % 10**8}.json"
    path.write_text(json.dumps(cfg))
    return path


def _prepared(cache: Path) -> Path:
    (folder,) = [p for p in (cache / "prepared").iterdir() if ".tmp-" not in p.name]
    return folder


def _files_of(folder: Path) -> dict[str, bytes]:
    """Every published file but meta.json (which records timings and the rank count)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "meta.json"}


def _users_rows(folder: Path) -> dict[int, tuple]:
    """Each user's prepared row with items as (source, raw id) and texts as strings: what a user
    holds, whatever the numbering of items and texts."""
    import datasets

    meta = load_meta(folder)
    items = pa.ipc.open_stream(pa.memory_map(str(folder / "items.arrow"))).read_all()
    item_key = np.concatenate([[-1], np.asarray(items["source"]) * 10**6 + np.asarray(items["item_id"])])
    texts = np.asarray(pa.ipc.open_stream(pa.memory_map(str(folder / "texts.arrow"))).read_all()["text"]
                       .to_pylist() + [""], dtype=object)  # index -1: no text
    out = {}
    for shard in meta["shards"]:
        t = datasets.Dataset.from_file(str(folder / shard))
        for r in t:
            out[r["user_id"]] = (r["split"], tuple(r["h_time"]), tuple(item_key[r["h_item"]]), tuple(texts[r["h_text"]]),
                                 tuple(r["h_window"]), tuple(r["w_key"]), tuple(item_key[r["f_item"]]),
                                 texts[r["fut_text"]], tuple(r["tabular"]), r["label/segment"], r["first_day"])
    return out


def test_folder_glob_and_list_give_the_same_cache(files, tmp_path):
    ev = files / "events"
    paths = sorted(str(p) for p in ev.glob("*.parquet"))
    caches = {}
    for name, events in (("folder", str(ev)), ("glob", str(ev / "events-*.parquet")), ("list", paths)):
        caches[name] = tmp_path / name
        run_cli("data", "--config", str(_config(tmp_path, events, caches[name], files / "users.parquet",
                                                buckets=3)))
    folder = _files_of(_prepared(caches["folder"]))
    assert len([k for k in folder if k.startswith("users-")]) == 3
    assert _files_of(_prepared(caches["glob"])) == folder
    assert _files_of(_prepared(caches["list"])) == folder
    meta = load_meta(_prepared(caches["folder"]))
    assert meta["users"] == N_USERS and meta["buckets"] == 3


def test_buckets_hold_the_same_users_as_one_pass(files, tmp_path):
    """Three buckets give every user the same prepared row as one bucket (one pass), up to the
    numbering of items and texts; users and their events are never split between buckets."""
    one = tmp_path / "one"
    three = tmp_path / "three"
    run_cli("data", "--config", str(_config(tmp_path, str(files / "events"), one, files / "users.parquet", buckets=1)))
    run_cli("data", "--config", str(_config(tmp_path, str(files / "events"), three, files / "users.parquet",
                                            buckets=3)))
    a, b = _users_rows(_prepared(one)), _users_rows(_prepared(three))
    assert len(a) == N_USERS and a.keys() == b.keys()
    differ = [u for u in a if a[u] != b[u]]
    assert not differ, f"{len(differ)} users differ, e.g. {differ[:3]}"


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "foundv2", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)


@pytest.mark.ddp
def test_two_ranks_write_the_same_shards_as_one_process(files, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("data", "--config", str(_config(tmp_path, str(files / "events"), one, files / "users.parquet", buckets=5)))
    res = _torchrun("data", "--config", str(_config(tmp_path, str(files / "events"), two, files / "users.parquet",
                                                    buckets=5)))
    assert res.returncode == 0, res.stderr[-4000:]
    assert "prepared by     2 ranks" in res.stdout and res.stdout.count("users           600") == 1
    assert _files_of(_prepared(two)) == _files_of(_prepared(one))
    assert load_meta(_prepared(two))["ranks"] == 2


def _bad_second_file(files: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the events folder whose second file has a NaN timestamp in row 7."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in sorted((files / "events").glob("*.parquet")):
        df = pd.read_parquet(p)
        if p.name == "events-001.parquet":
            df["timestamp"] = df["timestamp"].astype("float64")
            df.loc[7, "timestamp"] = np.nan
        df.to_parquet(bad / p.name, index=False)
    return bad, bad / "events-001.parquet"


def test_a_bad_row_in_the_second_file_is_refused_naming_it(files, tmp_path):
    bad, second = _bad_second_file(files, tmp_path)
    cache = tmp_path / "cache"
    res = run_cli("data", "--config", str(_config(tmp_path, str(bad), cache, files / "users.parquet")), check=False)
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("foundv2: error: ") and "Traceback" not in res.stderr
    assert str(second) in err[-1] and "'timestamp'" in err[-1] and "NaN" in err[-1] and "row 7" in err[-1]
    assert not [p for p in cache.rglob("*") if p.is_file()], "a refused run left files behind"


@pytest.mark.ddp
def test_a_bad_row_is_refused_by_two_ranks_once_with_nothing_left(files, tmp_path):
    bad, second = _bad_second_file(files, tmp_path)
    cache = tmp_path / "cache"
    res = _torchrun("data", "--config", str(_config(tmp_path, str(bad), cache, files / "users.parquet")))
    assert res.returncode != 0
    assert res.stderr.count("foundv2: error: ") == 1 and str(second) in res.stderr and "row 7" in res.stderr
    assert not [p for p in cache.rglob("*") if p.is_file()], "a refused run left files behind"


def test_a_user_row_repeated_in_another_users_file_is_refused(files, tmp_path):
    users = pd.read_parquet(files / "users.parquet")
    (tmp_path / "users").mkdir()
    users.to_parquet(tmp_path / "users" / "a.parquet", index=False)
    users.iloc[[42]].to_parquet(tmp_path / "users" / "b.parquet", index=False)
    cache = tmp_path / "cache"
    cfg = _config(tmp_path, str(files / "events"), cache, tmp_path / "users", buckets=2)
    res = run_cli("data", "--config", str(cfg), check=False)
    assert res.returncode == 2 and "duplicate user row" in res.stderr, res.stderr[-2000:]
    assert "b.parquet row 0" in res.stderr and "a.parquet row 42" in res.stderr
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_a_large_csv_piece_with_chunked_strings_prepares_like_its_parquet(files, tmp_path):
    """A CSV piece of ~200k rows reaches pandas as Arrow-backed strings in several chunks (its C
    parser reads in blocks); the partition must take them as one array each, and the CSV gives
    the same users as the same rows in Parquet."""
    events = pd.concat([pd.read_parquet(p) for p in sorted((files / "events").glob("*.parquet"))])
    reps = -(-220_000 // len(events))  # enough rows for two parser blocks: shift each copy a day later
    big = pd.concat([events.assign(timestamp=events["timestamp"] + k * 86_400) for k in range(reps)],
                    ignore_index=True)
    csv, parquet = tmp_path / "events.csv", tmp_path / "events.parquet"
    big.to_csv(csv, index=False)
    big.to_parquet(parquet, index=False)
    from data_modules.sources.files import read_pieces

    first = next(read_pieces(csv))
    assert isinstance(pa.array(first["text"].fillna("").astype(str), pa.string()), pa.ChunkedArray)  # the case
    users = files / "users.parquet"
    for name, path in (("csv", csv), ("parquet", parquet)):
        run_cli("data", "--config", str(_config(tmp_path, str(path), tmp_path / f"cache-{name}", users)))
    assert _users_rows(_prepared(tmp_path / "cache-csv")) == _users_rows(_prepared(tmp_path / "cache-parquet"))
