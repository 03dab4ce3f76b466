"""Bad and unusual own-data inputs, each through the real CLI (``foundv2 data``) on real files.

Every refused case asserts exit 2, a one-paragraph message that names the file and the column,
no traceback, and that nothing was written into the cache. Accepted unusual inputs (datetime
columns, declared epoch units, string labels, no future) assert what was prepared.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_modules.prepare import CALENDAR_FEATURES, OWNER_FILE, calendar_features, load_meta
from foundv2.cli import main
from tests.helpers import kill_when, read_only

T0 = 1_718_000_000  # 2024-06-10, seconds
N_USERS = 12


def _events(n_users: int = N_USERS, per_user: int = 10) -> pd.DataFrame:
    rows = []
    for u in range(1, n_users + 1):
        for k in range(per_user):
            rows.append({"user_id": u, "source": ["pay", "search"][k % 2], "timestamp": T0 + u * 60 + k * 86_400,
                         "item_id": (u + k) % 7, "text": f"shop {k % 3}", "value": float(k), "category": "c"})
    return pd.DataFrame(rows)


def _users(n_users: int = N_USERS) -> pd.DataFrame:
    return pd.DataFrame({"user_id": range(1, n_users + 1), "age": np.arange(n_users) % 5,
                         "churn": np.arange(n_users) % 2})


def _write(df: pd.DataFrame, path: Path) -> str:
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return str(path)


class Case:
    """One data folder: the files, the config, the CLI run and what it left in the cache."""

    def __init__(self, tmp_path: Path, events: pd.DataFrame | None = None, users: pd.DataFrame | None = None,
                 ext: str = "csv", **data):
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.dir = tmp_path
        self.cache = tmp_path / "cache"
        self.events = _write(_events() if events is None else events, tmp_path / f"events.{ext}")
        self.users = _write(_users() if users is None else users, tmp_path / f"users.{ext}")
        args = {"events": self.events, "users": self.users, "sources": ["pay", "search"], "tabular_inputs": ["age"],
                "labels": [{"name": "churn", "kind": "binary"}]}
        args.update(data.pop("loader_args", {}))
        self.data = {"dataset": "files", "loader_args": args, "window_mode": "day", "text_encoder": "hashing",
                     "cache_dir": str(self.cache), "progress": False, **data}

    def run(self, capsys, **override) -> tuple[int, str, str]:
        cfg = self.dir / "data.yaml"
        cfg.write_text(json.dumps({"data": {**self.data, **override}}))
        code = main(["data", "--config", str(cfg)])
        out, err = capsys.readouterr()
        return code, out, err

    def refused(self, capsys, *phrases: str, **override) -> str:
        code, _, err = self.run(capsys, **override)
        assert code == 2, err
        assert "Traceback" not in err and err.startswith("foundv2: error: ") and err.count("\n") == 1
        for phrase in phrases:
            assert phrase in err, f"{phrase!r} not in {err!r}"
        assert self.written() == [], "a refused run wrote into the cache"
        return err

    def written(self) -> list[Path]:
        return sorted(p for p in self.cache.rglob("*") if p.is_file()) if self.cache.exists() else []

    def prepared(self, capsys, **override) -> tuple[dict, str]:
        code, out, err = self.run(capsys, **override)
        assert code == 0, err
        folder = next((self.cache / "prepared").iterdir())
        return load_meta(folder), out

    def table(self):
        import datasets

        folder = next((self.cache / "prepared").iterdir())
        meta = load_meta(folder)
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(folder / s)) for s in meta["shards"]])


# ------------------------------------------------------------------------------------------- timestamps
def test_parquet_datetime_timestamps_are_converted_to_seconds(tmp_path, capsys):
    ev = _events()
    ev["timestamp"] = pd.to_datetime(ev["timestamp"], unit="s").astype("datetime64[us]")
    case = Case(tmp_path, ev, ext="parquet")
    meta, _ = case.prepared(capsys)
    t = case.table()
    times = np.concatenate([np.asarray(t["h_time"][i] + t["f_time"][i]) for i in range(len(t))])
    assert sorted(times) == sorted(_events()["timestamp"])  # seconds, not microseconds
    assert meta["calendar"]["reference_day"] == T0 // 86_400


def test_timezone_aware_and_iso_string_timestamps(tmp_path, capsys):
    ev = _events()
    ev["timestamp"] = pd.to_datetime(ev["timestamp"], unit="s", utc=True).dt.tz_convert("Europe/Paris")
    case = Case(tmp_path, ev, ext="parquet")
    case.prepared(capsys)
    t = case.table()
    assert min(min(x) for x in t["h_time"]) == _events()["timestamp"].min()  # UTC seconds

    iso = _events()
    iso["timestamp"] = pd.to_datetime(iso["timestamp"], unit="s").dt.strftime("%Y-%m-%dT%H:%M:%S")
    case2 = Case(tmp_path / "iso", iso)
    case2.prepared(capsys)
    assert min(min(x) for x in case2.table()["h_time"]) == _events()["timestamp"].min()


@pytest.mark.parametrize("unit,factor", [("ms", 1_000), ("us", 1_000_000), ("ns", 1_000_000_000)])
def test_finer_epochs_are_refused_with_the_fix(tmp_path, capsys, unit, factor):
    ev = _events()
    ev["timestamp"] = ev["timestamp"] * factor
    err = Case(tmp_path, ev).refused(capsys, "events.csv", "'timestamp'", f"look like {unit}",
                                     f"timestamp_unit: {unit}")
    assert "negative" not in err


def test_declared_timestamp_unit_is_converted(tmp_path, capsys):
    ev = _events()
    ev["timestamp"] = ev["timestamp"] * 1000 + 999  # ms, with a fraction of a second
    case = Case(tmp_path, ev, loader_args={"timestamp_unit": "ms"})
    case.prepared(capsys)
    assert min(min(x) for x in case.table()["h_time"]) == _events()["timestamp"].min()
    Case(tmp_path / "b", ev, loader_args={"timestamp_unit": "minutes"}).refused(capsys, "unknown timestamp_unit")


def test_huge_timestamp_is_out_of_range_not_negative(tmp_path, capsys):
    ev = _events().astype({"timestamp": float})
    ev.loc[4, "timestamp"] = 1e20
    err = Case(tmp_path, ev).refused(capsys, "events.csv", "'timestamp'", "beyond the int64 range")
    assert "negative" not in err


def test_timestamps_neither_numbers_nor_dates(tmp_path, capsys):
    ev = _events().astype({"timestamp": object})
    ev["timestamp"] = "last tuesday"
    Case(tmp_path, ev).refused(capsys, "events.csv", "'timestamp'", "ISO-8601")


# ------------------------------------------------------------------------------------------- columns
def test_parquet_text_column_holding_lists(tmp_path, capsys):
    ev = _events()
    ev["text"] = [["shop", str(k)] for k in range(len(ev))]
    Case(tmp_path, ev, ext="parquet").refused(capsys, "events.parquet", "'text'", "list or array")


def test_negative_item_ids_are_refused_not_no_item(tmp_path, capsys):
    ev = _events()
    ev.loc[[3, 8], "item_id"] = -1
    Case(tmp_path, ev).refused(capsys, "events.csv", "'item_id'", "2 negative value(s)", "leaves the cell empty")


def test_empty_item_cell_is_no_item(tmp_path, capsys):
    ev = _events().astype({"item_id": "Int64"})
    ev.loc[[3, 8], "item_id"] = pd.NA
    meta, _ = Case(tmp_path, ev).prepared(capsys)
    assert meta["num_items"] == 7 * 2  # 7 ids in 2 sources: the empty cells made none


@pytest.mark.parametrize("file", ["events", "users"])
def test_user_id_above_int64(tmp_path, capsys, file):
    ev, us = _events(), _users()
    big = str(2**64 + 5)
    frame = ev if file == "events" else us
    frame["user_id"] = frame["user_id"].astype(str).where(frame.index != 0, big)
    err = Case(tmp_path, ev, us).refused(capsys, f"{file}.csv", "'user_id'", "beyond the int64 range")
    assert "missing" not in err


def test_a_folder_without_data_files_or_a_glob_without_matches(tmp_path, capsys):
    case = Case(tmp_path)
    (tmp_path / "events_dir").mkdir()
    (tmp_path / "events_dir" / "notes.txt").write_text("not data")
    case.data["loader_args"]["events"] = str(tmp_path / "events_dir")
    case.refused(capsys, "events_dir", "holds no .parquet, .csv or .tsv file")
    case.data["loader_args"]["events"] = str(tmp_path / "events-*.parquet")
    case.refused(capsys, "events-*.parquet", "matches no file")


# ------------------------------------------------------------------------------------------- users file
@pytest.mark.parametrize("damage,phrase", [
    (lambda u: u.astype({"age": float}).assign(age=lambda d: d["age"].where(d.index != 2, np.nan)), "'age'"),
    (lambda u: pd.concat([u, u.iloc[[1]]]), "duplicate user row"),
    (lambda u: u.drop(columns=["churn"]), "lacks declared column"),
    (lambda u: u.assign(churn=u["churn"] + 5), "'churn'"),
])
def test_users_file_problems_name_the_users_file(tmp_path, capsys, damage, phrase):
    err = Case(tmp_path, users=damage(_users())).refused(capsys, "users.csv", phrase)
    assert "events.csv" not in err  # not "events.csv (users)"


def test_events_of_users_missing_from_the_users_file(tmp_path, capsys):
    Case(tmp_path, users=_users().iloc[2:]).refused(capsys, "events.csv", "users.csv", "missing from the users table")


# ------------------------------------------------------------------------------------------- labels
def test_label_with_a_single_class(tmp_path, capsys):
    Case(tmp_path, users=_users().assign(churn=0)).refused(capsys, "users.csv", "'churn'", "single class")


@pytest.mark.parametrize("label,phrase", [
    ({"name": "churn", "kind": "multiclass", "num_classes": 1}, "at least 2 classes"),
    ({"name": "churn", "kind": "binary", "num_classes": 1}, "at least 2 classes"),
    ({"name": "churn", "kind": "ordinal", "num_classes": 3}, "unknown kind 'ordinal'"),
    ({"name": "churn", "kind": "multiclass"}, "declare num_classes or class_names"),
    ({"name": "churn", "kind": "binary", "class_names": ["a", "b", "c"]}, "binary label has 2 classes"),
])
def test_bad_label_declarations(tmp_path, capsys, label, phrase):
    Case(tmp_path, loader_args={"labels": [label]}).refused(capsys, "label 'churn'", phrase)


def test_string_labels_are_mapped_through_class_names(tmp_path, capsys):
    us = _users()
    us["churn"] = np.where(us["churn"] == 1, "churns", "stays")
    label = {"name": "churn", "kind": "binary", "class_names": ["stays", "churns"]}
    case = Case(tmp_path, users=us, loader_args={"labels": [label]})
    meta, _ = case.prepared(capsys)
    t = case.table()
    by_user = dict(zip(t["user_id"], t["label/churn"], strict=True))
    assert by_user == {u: (u - 1) % 2 for u in range(1, N_USERS + 1)}
    assert meta["label_balance"]["churn"] == [6, 6]


def test_string_labels_without_or_outside_class_names(tmp_path, capsys):
    us = _users()
    us["churn"] = np.where(us["churn"] == 1, "churns", "stays")
    Case(tmp_path, users=us).refused(capsys, "users.csv", "'churn'", "declares no class_names")
    label = {"name": "churn", "kind": "binary", "class_names": ["stays", "leaves"]}
    Case(tmp_path / "b", users=us, loader_args={"labels": [label]}).refused(capsys, "users.csv", "['churns']",
                                                                      "outside its class_names")


# ------------------------------------------------------------------------------------------- encoder
def test_unknown_text_encoder_fails_before_the_validation_pass(tmp_path, capsys):
    ev = _events().drop(columns=["source"])  # bad data too: the encoder is checked first
    err = Case(tmp_path, ev).refused(capsys, "unknown text encoder 'word2vec'", text_encoder="word2vec")
    assert "source" not in err


# ------------------------------------------------------------------------------------------- splits
def test_one_event_on_several_rows_is_never_split(tmp_path, capsys):
    ev = _events(per_user=7)
    twin = ev.copy()
    twin["source"] = "search"  # every moment has a second row (another view of the same event)
    ev = pd.concat([ev, twin]).sort_values(["user_id", "timestamp"], kind="stable")
    case = Case(tmp_path, ev)
    case.prepared(capsys)
    t = case.table()
    for h, f in zip(t["h_time"], t["f_time"], strict=True):
        assert not set(h) & set(f) and max(h) < min(f)
        assert len(f) == 4  # 14 rows: the cut after ceil(2.8) = 3 rows falls inside a moment, which goes whole


def test_no_future_held_back(tmp_path, capsys):
    case = Case(tmp_path, future_frac=0.0)
    meta, out = case.prepared(capsys)
    assert meta["future_events"] == 0 and meta["history_events"] == N_USERS * 10
    assert "no future held back" in out and "without future" not in out
    t = case.table()
    assert all(n == 0 for n in t["n_fut"]) and all(x == -1 for x in t["fut_text"])
    Case(tmp_path / "b", future_frac=1.0).refused(capsys, "future_frac must be in [0, 1)")


def test_summary_counts_users_without_windows(tmp_path, capsys):
    ev = _events()
    ev["source"] = np.where(ev["user_id"] <= 8, "pay", ev["source"])
    ev = ev[(ev["user_id"] > 8) | (ev.groupby("user_id").cumcount() == 0)]  # users 1..8: one event only
    us = pd.concat([_users(), pd.DataFrame({"user_id": [99], "age": [1], "churn": [0]})])
    case = Case(tmp_path, ev, us, loader_args={"primary_source": "pay"})
    meta, out = case.prepared(capsys)
    assert meta["windows_per_user"]["median"] == 0
    assert meta["empty_users"] == 1 and meta["users_without_history"] == 9  # users 1..8 and 99
    assert "1 without events, 9 without history windows" in out


def test_calendar_features_from_the_history(tmp_path, capsys):
    case = Case(tmp_path)
    meta, out = case.prepared(capsys)
    t = case.table()
    cal = calendar_features(t, meta)
    day0 = T0 // 86_400
    assert meta["calendar"]["has_calendar"] and "calendar        history 2024-06-10" in out
    assert (cal["first_day"] == (T0 + 60 * np.asarray(t["user_id"])) // 86_400 - day0).all()
    assert (cal["tenure_days"] == 7).all() and (cal["active_days"] == 8).all()  # 8 history days of 10
    assert (cal["days_since_last"] == meta["calendar"]["end_day"] - day0 - cal["last_day"]).all()
    w_day = np.asarray(t["w_day"][0]) - day0
    assert list(w_day) == list(range(8))  # day windows: one per day
    batch_cols = t[:3]  # what a collate function receives: a dict of lists
    assert list(calendar_features(batch_cols, meta)) == list(CALENDAR_FEATURES)
    assert (calendar_features(batch_cols, meta)["tenure_days"] == 7).all()


# ------------------------------------------------------------------------------------------- caches
def test_bit_flip_in_a_prepared_shard_is_refused(tmp_path, capsys):
    case = Case(tmp_path)
    case.prepared(capsys)
    shard = next((case.cache / "prepared").rglob("users-*.arrow"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    code, _, err = case.run(capsys)
    assert code == 2 and str(shard) in err and "checksum mismatch" in err and "rm -r" in err


def test_nan_in_the_text_cache_is_rebuilt(tmp_path, capsys, caplog):
    case = Case(tmp_path)
    case.prepared(capsys)
    shard = next((case.cache / "text").rglob("shard-*.npz"))
    with np.load(shard) as z:
        keys, emb = z["keys"], z["emb"].copy()
    emb[:] = np.nan
    np.savez(shard, keys=keys, emb=emb)  # a shard without a checksum, as old ones are
    with caplog.at_level("WARNING"):
        meta, _ = case.prepared(capsys, window_mode="week")  # another config: the texts are read again
    assert "corrupt" in caplog.text and shard.name in caplog.text
    folder = (case.cache / "prepared") / f"files-{meta['config']['key']}"
    assert np.isfinite(np.load(folder / "text_emb.npy")).all()


def test_read_only_cache_folder_fails_up_front(tmp_path, capsys):
    case = Case(tmp_path)
    with read_only(case.cache):
        case.refused(capsys, str(case.cache), "not writable", "cache_dir")


def test_killed_run_leftovers_are_removed_by_the_next_run(tmp_path, capsys):
    """Kill a real ``data`` run in the middle of its pass; the next run removes its temporary folder."""
    case = Case(tmp_path)
    marker = tmp_path / "first-chunk-written"
    code = f"""
import sys, time
from pathlib import Path
from data_modules.loaders import open_dataset
from data_modules.prepare import PrepareConfig, WindowConfig, prepare_dataset
from data_modules.text import HashingEncoder

args = {case.data['loader_args']!r}
source = open_dataset("files", args)
read = source.read

def slow(unit):
    if unit.kinds == ("users",):  # the events file is partitioned by now
        Path({str(marker)!r}).touch()
        time.sleep(600)  # killed here
    yield from read(unit)

source.read = slow
cfg = PrepareConfig("files", args, WindowConfig("day"))
prepare_dataset(cfg, source, Path({str(case.cache)!r}) / "prepared" / "files-x", HashingEncoder,
                Path({str(case.cache)!r}) / "text", progress=False)
"""
    kill_when([sys.executable, "-c", code], marker, 120, "run")
    leftovers = [p for p in (case.cache / "prepared").iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and (leftovers[0] / OWNER_FILE).exists()
    assert list(leftovers[0].rglob("*.arrow"))
    case.prepared(capsys)
    assert [p.name for p in (case.cache / "prepared").iterdir() if ".tmp-" in p.name] == []
    shutil.rmtree(case.cache)


def test_every_framework_command_has_its_runner():
    """``foundv2 <name>`` runs ``cli.<name>_command``: one table of commands, no second one to keep in step."""
    from foundv2 import cli

    assert all(callable(getattr(cli, f"{name}_command", None)) for name in cli.OWN_COMMANDS)
