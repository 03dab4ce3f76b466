"""The data layer: bad input, splits and leakage, MovieLens from the wheel, caches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_modules.datamodule import UserDataModule
from data_modules.prepare import user_split
from data_modules.schema import DataError

ROOT = Path(__file__).resolve().parents[1]


def _events(n_users: int = 12, per_user: int = 10) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(1, n_users + 1):
        for k in range(per_user):
            rows.append({"user_id": u, "source": ["pay", "search"][k % 2], "timestamp": 1_700_000_000 + k * 3600 * 7,
                         "item_id": int(rng.integers(0, 20)), "text": f"query {k % 4}", "value": float(k),
                         "category": ["food", "travel"][k % 2]})
    return pd.DataFrame(rows)


def _users(n_users: int = 12) -> pd.DataFrame:
    return pd.DataFrame({"user_id": range(1, n_users + 1), "age": np.arange(n_users) % 5,
                         "churn": np.arange(n_users) % 2})


def _files_dm(tmp_path: Path, events: pd.DataFrame, users: pd.DataFrame | None, **kw) -> UserDataModule:
    ev_path = tmp_path / "events.csv"
    events.to_csv(ev_path, index=False)
    args = {"events": str(ev_path), "sources": ["pay", "search"], "tabular_inputs": ["age"],
            "labels": [{"name": "churn", "kind": "binary", "num_classes": 2}]}
    if users is not None:
        users.to_csv(tmp_path / "users.csv", index=False)
        args["users"] = str(tmp_path / "users.csv")
    args.update(kw)
    return UserDataModule(dataset="files", loader_args=args, window_mode="day", text_encoder="hashing",
                          cache_dir=str(tmp_path / "cache"), batch_size=4, progress=False)


def _prepared(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "cache" / "prepared").glob("*")) if (tmp_path / "cache" / "prepared").exists() else []


BAD_EVENTS = {
    "missing column": (lambda e: e.drop(columns=["timestamp"]), "missing required event column"),
    "misnamed column": (lambda e: e.rename(columns={"user_id": "userid"}), "did you mean"),
    "wrong dtype": (lambda e: e.assign(timestamp=e["timestamp"].astype(str).where(e.index != 3, "yesterday")),
                    "must hold integers"),
    "NaN timestamp": (lambda e: e.assign(timestamp=e["timestamp"].where(e.index != 5, np.nan)), "NaN"),
    "negative timestamp": (lambda e: e.assign(timestamp=e["timestamp"].where(e.index != 7, -5)), "negative"),
    "unknown source": (lambda e: e.assign(source=e["source"].where(e.index != 2, "email")), "unknown source"),
    "non-numeric value": (lambda e: e.assign(value=e["value"].astype(object).where(e.index != 4, "lots")),
                          "'value' must hold numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_EVENTS))
def test_bad_events_named_and_nothing_written(tmp_path, case):
    mutate, phrase = BAD_EVENTS[case]
    dm = _files_dm(tmp_path, mutate(_events()), _users())
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert phrase in msg
    assert "events.csv" in msg  # names the file
    assert _prepared(tmp_path) == []  # nothing half-written


def test_bad_users_tables(tmp_path):
    dup = pd.concat([_users(), _users().iloc[[3]]])
    with pytest.raises(DataError, match="duplicate user row"):
        _files_dm(tmp_path, _events(), dup).prepare_data()
    with pytest.raises(DataError, match="declared both as tabular inputs and as labels"):
        _files_dm(tmp_path, _events(), _users(), tabular_inputs=["age", "churn"]).prepare_data()
    with pytest.raises(DataError, match="lacks declared column"):
        _files_dm(tmp_path, _events(), _users().drop(columns=["churn"])).prepare_data()
    with pytest.raises(DataError, match="missing from the users table"):
        _files_dm(tmp_path, _events(), _users().iloc[2:]).prepare_data()
    assert _prepared(tmp_path) == []


def test_empty_file(tmp_path):
    (tmp_path / "events.csv").write_text("")
    dm = UserDataModule(dataset="files", loader_args={"events": str(tmp_path / "events.csv"), "sources": ["pay"],
                                                      "tabular_inputs": [], "labels": []},
                        text_encoder="hashing", cache_dir=str(tmp_path / "cache"), progress=False)
    with pytest.raises(DataError, match="empty"):
        dm.prepare_data()


def test_users_without_events_are_kept_and_reported(tmp_path):
    users = pd.concat([_users(), pd.DataFrame({"user_id": [99], "age": [1], "churn": [0]})])
    dm = _files_dm(tmp_path, _events(), users)
    meta = dm.prepare_data()
    assert meta["users"] == 13 and meta["empty_users"] == 1
    dm.setup()
    assert any("1 without events" in line for line in dm.summary())


def test_cli_error_is_one_paragraph_without_traceback(tmp_path):
    ev = _events().drop(columns=["source"])
    ev.to_csv(tmp_path / "events.csv", index=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"data": {"dataset": "files", "text_encoder": "hashing",
                                        "cache_dir": str(tmp_path / "cache"),
                                        "loader_args": {"events": str(tmp_path / "events.csv"),
                                                        "sources": ["pay", "search"],
                                                        "tabular_inputs": [], "labels": []}}}))
    res = subprocess.run([sys.executable, "-m", "foundv2", "data", "--config", str(cfg)], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "missing required event column(s) 'source'" in res.stderr
    assert _prepared(tmp_path) == []


def test_corrupt_cache_is_reported(tmp_path):
    dm = _files_dm(tmp_path, _events(), _users())
    dm.prepare_data()
    shard = next(dm.prepared_dir.glob("users-*.arrow"))
    shard.write_bytes(b"not arrow at all")
    dm2 = UserDataModule(**dm.hparams)
    with pytest.raises(DataError, match="corrupt"):
        dm2.setup()


def test_split_is_deterministic_and_near_80_10_10():
    ids = np.arange(100_000)
    s1, s2 = user_split(ids, 0), user_split(ids, 0)
    assert (s1 == s2).all()
    shares = np.bincount(s1, minlength=3) / len(ids)
    assert abs(shares[0] - 0.8) < 0.01 and abs(shares[1] - 0.1) < 0.01
    assert (user_split(ids, 1) != s1).mean() > 0.2  # the seed matters


def test_history_precedes_future_and_batches_hold_no_future(tmp_path):
    dm = _files_dm(tmp_path, _events(), _users())
    dm.prepare_data()
    dm.setup()
    t = dm.table
    for i in range(len(t)):
        h, f = t[i]["h_time"], t[i]["f_time"]
        assert len(f) == int(np.ceil(0.2 * (len(h) + len(f))))
        assert max(h) <= min(f)
    seen = set()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for b in loader:
            fut_times = {int(uid): set(t[int(r)]["f_time"]) for uid, r in zip(b["user_id"], b["row"], strict=True)}
            for i, uid in enumerate(b["user_id"].tolist()):
                times = set(b["ev_time"][i][b["ev_mask"][i]].tolist())
                assert not (times & fut_times[uid]) or max(times) <= min(fut_times[uid])
                seen.add(uid)
    assert len(seen) == 12  # the three splits cover every user once


def test_movielens_100k_from_the_wheel(tmp_path):
    dm = UserDataModule(dataset="movielens-100k", window_mode="events", window_size=8, text_encoder="hashing",
                        cache_dir=str(tmp_path / "cache"), batch_size=16, progress=False)
    meta = dm.prepare_data()
    assert meta["users"] == 943
    assert meta["events_per_source"]["rating"] == 100_000
    assert meta["spec"]["sources"] == ["rating", "title_text", "genre"]
    assert "gender" not in meta["spec"]["tabular_inputs"]  # labels are never inputs
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["ev_text_emb"].shape[-1] == 64 and b["tabular"].shape[1] == 10
    # a rating's three views share its moment: every history rating has a title view at the same time
    row = dm.table[0]
    src, ts = np.asarray(row["h_source"]), np.asarray(row["h_time"])
    assert set(ts[src == 0]) == set(ts[src == 1])
    # the future is the last ceil(20%) ratings of the user, and the rest of the moment the cut falls in
    f_src, f_ts = np.asarray(row["f_source"]), np.asarray(row["f_time"])
    n_r = (src == 0).sum() + (f_src == 0).sum()
    assert (f_src == 0).sum() >= int(np.ceil(0.2 * n_r))
    assert ts.max() < f_ts.min()  # no moment on both sides
    for r in dm.table.select(range(0, len(dm.table), 7)):
        assert not set(r["h_time"]) & set(r["f_time"])


def test_prepared_cache_and_text_cache_reused(tmp_path):
    dm = _files_dm(tmp_path, _events(), _users())
    meta1 = dm.prepare_data()
    text_dir = tmp_path / "cache" / "text"
    shards_before = sorted(p.name for p in text_dir.rglob("*") if p.is_file())
    meta2 = UserDataModule(**dm.hparams).prepare_data()  # same config and files: cache hit, no work
    assert meta2["prepare_seconds"] == meta1["prepare_seconds"]
    # another window config re-prepares but reuses every text encoding: no new cache shard
    meta3 = UserDataModule(**{**dm.hparams, "window_mode": "week"}).prepare_data()
    assert meta3["config"]["key"] != meta1["config"]["key"]
    assert sorted(p.name for p in text_dir.rglob("*") if p.is_file()) == shards_before
