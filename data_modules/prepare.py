"""From a source's raw events and users to the prepared, memory-mapped per-user dataset.

Data of any size, on one process or many (:func:`prepare_dataset` has the phases): the rows are
first partitioned by user into a fixed number of hash buckets, out of core
(:mod:`data_modules.buckets`; every row validated there, naming its file and row), then each
bucket, which holds every event of its users, becomes one shard:

1. check it (users appear once; every user with events has a users-table row);
2. sort each user's events by time (stable), split them into history and the last ceil(20%)
   *future* events of the primary source (the other views of a moment follow it); the rows of
   one moment (same user and timestamp) always land on the same side, so the cut rounds
   towards the future. ``future_frac: 0`` holds nothing back (labels from a separate period);
3. cut the history into windows: calendar ``day`` / ``week`` or every ``size`` distinct moments
   (``events``), and number the non-empty windows 0..W-1 per user;
4. map items, texts and categories to indices; write a templated summary of the future for
   *training* users only (the semantic objective's target);
5. record the calendar position of each user's history (first/last day, active days) and of
   each window (its first day), see :func:`calendar_features` and :func:`window_calendar`.

Items and texts are numbered per bucket first, then every bucket's tables are joined in bucket
order (each key at its first occurrence) and the shards rewritten in the global numbering, so the
result depends on the bucket count but never on the number of processes. Peak memory is one
bucket (about 500,000 events by default), never the data set.

Everything is written into a temporary folder that is renamed into place only when the whole
data set has passed; a crash or a DataError leaves nothing half-written, and the leftovers of a
killed run are removed by the next one. The text table is encoded once through the fp16
TextCache and stored beside the shards. ``meta.json`` records a checksum of every file, verified
whenever the folder is opened (:func:`load_meta`).

Layout of a shard (one row per user; ``h_*`` history, ``f_*`` future, lists in time order)::

    user_id, split, n_hist, n_fut, n_windows                       scalars
    h_source, h_item, h_text, h_value, h_time, h_category, h_window  lists over history events
    w_key, w_day                                                   lists over windows
    f_source, f_item, f_text, f_category, f_time                   lists over future events
    fut_text                                                       templated future summary row
    first_day, last_day, active_days                               calendar of the history
    tabular, label/<name>                                          from the users table
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from data_modules.buckets import (
    GOLDEN64,
    SEQ_ROW_BITS,
    Partitioner,
    bucket_bytes,
    event_schema,
    read_bucket,
    splitmix64,
    users_schema,
    where_row,
)
from data_modules.loaders import Source, Unit
from data_modules.ranks import Ranks
from data_modules.schema import MAX_ITEM_ID, DataError, DatasetSpec, check_label_classes, codes_of
from data_modules.store import (
    TMP_MARK,
    atomic_write_json,
    check_writable,
    file_digest,
    replace_dir,
    tmp_name,
)
from data_modules.text import pid_alive

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: calendar columns, checksums, moment-aligned future; 3: users in hash buckets
SECONDS_PER_DAY = 86_400
EPOCH_WEEKDAY_SHIFT = 3  # 1970-01-01 was a Thursday: +3 days makes weeks start on Monday
ITEM_KEY_STRIDE = MAX_ITEM_ID  # item ids stay below 2**40 (schema checks) to share one int64 key with the source
CALENDAR_MIN_DAY = 365  # timestamps before 1971 are taken for ordinals, not calendar time
STALE_TMP_S = 6 * 3600  # a temporary folder of another host untouched this long is a crash leftover
OWNER_FILE = ".owner"  # host and pid of the run writing a temporary folder
CALENDAR_FEATURES = ("first_day", "last_day", "tenure_days", "active_days", "days_since_last", "has_history")
WINDOW_CALENDAR = ("position", "tenure")  # per window, in the data set's span: see window_calendar
SPLIT_FRACTIONS = (0.8, 0.1)  # train, val; the rest is test (benchmark protocol §8)
UNKNOWN_CATEGORY = "unknown_category_as_none"  # the filtered count of events whose category is not declared


@dataclass
class WindowConfig:
    """How a user's history is cut into windows.

    mode: ``day`` or ``week`` (calendar) or ``events`` (every ``size`` distinct moments; use it
    for MovieLens, where most users rated everything within a day or two).
    period: windows this far apart in key are periodic partners (same weekday in different
    weeks for days: 7). Defaults: day 7, week 4, events 2.
    """

    mode: str = "day"
    size: int = 16
    period: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("day", "week", "events"):
            raise DataError(f"window mode must be 'day', 'week' or 'events', not '{self.mode}'.")
        if self.size < 1:
            raise DataError(f"window size must be >= 1, not {self.size}.")
        if self.period is None:
            self.period = {"day": 7, "week": 4, "events": 2}[self.mode]


def calendar_key(day: np.ndarray, mode: str) -> np.ndarray:
    """The window key of calendar days (days since the epoch) for ``day`` or ``week`` windows
    (weeks start on Monday)."""
    return day if mode == "day" else (day + EPOCH_WEEKDAY_SHIFT) // 7


def user_split(user_ids: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic train/val/test (0/1/2) per user id: a splitmix64 hash of (id, seed).

    It does not depend on chunking or on which other users exist, so a user keeps its split
    when a data set grows.
    """
    with np.errstate(over="ignore"):
        z = splitmix64(user_ids.astype(np.uint64) + np.uint64(seed) * GOLDEN64)
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.where(u < SPLIT_FRACTIONS[0], 0, np.where(u < sum(SPLIT_FRACTIONS), 1, 2)).astype(np.int8)


def _segment_starts(keys: np.ndarray) -> np.ndarray:
    """Boolean: True where a new run of equal consecutive keys starts."""
    start = np.ones(len(keys), dtype=bool)
    if len(keys) > 1:
        start[1:] = keys[1:] != keys[:-1]
    return start


def _rank_within(group_start: np.ndarray, new_value: np.ndarray) -> np.ndarray:
    """Dense rank of a sorted value inside each group: 0 at each group start, +1 at each change."""
    inc = (new_value & ~group_start).astype(np.int64)
    c = np.cumsum(inc)
    base = np.maximum.accumulate(np.where(group_start, c, 0))
    return c - base


def window_keys(ustart: np.ndarray, ts: np.ndarray, window: WindowConfig, first_key: np.ndarray | int = 0) -> np.ndarray:
    """Each event's window key, events sorted by user then time (``ustart``: True at each user's
    first event): the calendar key of its day for ``day``/``week`` windows; for ``events`` windows,
    the rank of its moment (distinct time) within its user over ``window.size``, plus
    ``first_key`` (per event; an append numbers on from the user's last window). Preparation and
    append cut windows with this one function."""
    if window.mode in ("day", "week"):
        return calendar_key(ts // SECONDS_PER_DAY, window.mode)
    moment = _rank_within(ustart, _segment_starts(ts) | ustart)
    return first_key + moment // window.size


def window_ordinals(ustart: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each event's window ordinal within its user, 0 for its first window; True where a window
    starts) of events sorted by user then key."""
    starts = _segment_starts(key) | ustart
    return _rank_within(ustart, starts), starts


def _list_array(values: np.ndarray, offsets: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, typ))


class _Vocab:
    """A growing key → index map (items, texts)."""

    def __init__(self, first_index: int = 0):
        self.index: dict = {}
        self.keys: list = []
        self.first = first_index

    def map(self, values: np.ndarray) -> np.ndarray:
        codes, uniques = pd.factorize(values)
        lut = np.empty(len(uniques), dtype=np.int64)
        for i, key in enumerate(uniques.tolist() if hasattr(uniques, "tolist") else uniques):
            idx = self.index.get(key)
            if idx is None:
                idx = self.first + len(self.keys)
                self.index[key] = idx
                self.keys.append(key)
            lut[i] = idx
        return lut[codes] if len(codes) else np.zeros(0, dtype=np.int64)


def _count_bins(n: np.ndarray) -> np.ndarray:
    """How many future events, in words: a few (<= 3), several (<= 10), many (<= 40), a great many."""
    return np.select([n <= 3, n <= 10, n <= 40], ["a few", "several", "many"], "a great many").astype(object)


def future_summaries(uid: np.ndarray, cat: np.ndarray, src: np.ndarray, text: np.ndarray,
                     spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Templated text describing each user's future events (binned, frequency-aware).

    Coarse on purpose: the two most frequent categories (or, without categories, the most
    frequent text), the binned number of events and the dominant source. The number of distinct
    summaries stays bounded however many users there are, so encoding them stays cheap.
    ``uid`` etc. hold the future events of *training* users only; the caller guarantees it.
    Returns (users in ascending order, their summaries); ties go to the lower category, text or
    source. Vectorised: one sort per statistic, no loop over users.
    """
    if len(uid) == 0:
        return np.zeros(0, np.int64), np.zeros(0, object)
    df = pd.DataFrame({"u": uid, "c": cat, "s": src, "t": text})
    n_events = df.groupby("u").size()
    users = n_events.index.to_numpy()

    def top(keys: list[str], frame: pd.DataFrame, k: int) -> pd.DataFrame:
        counts = frame.groupby(keys).size().rename("n").reset_index()
        counts = counts.sort_values(["u", "n", keys[1]], ascending=[True, False, True], kind="stable")
        return counts.groupby("u").head(k)

    dominant = top(["u", "s"], df, 1).set_index("u")["s"].reindex(users).to_numpy()
    what = pd.Series("varied things", index=users, dtype=object)
    with_cat = df[df["c"] >= 0]
    if len(with_cat):
        cc = top(["u", "c"], with_cat, 2)
        names = np.asarray(spec.categories, dtype=object)[cc["c"].to_numpy()]
        cc = cc.assign(name=names, pos=cc.groupby("u").cumcount())
        first = cc[cc["pos"] == 0].set_index("u")["name"]
        second = cc[cc["pos"] == 1].set_index("u")["name"].reindex(first.index)
        joined = ("mostly " + first + (" and " + second).where(second.notna(), "")).astype(object)
        what.loc[joined.index] = joined
    rest = df[~df["u"].isin(what.index[what != "varied things"]) & (df["t"] != "")]
    if len(rest):
        tc = top(["u", "t"], rest, 1).set_index("u")["t"]
        what.loc[tc.index] = ("things like " + tc.astype(str)).astype(object)
    source_names = np.asarray(spec.sources, dtype=object)[dominant]
    text = ("Next, this user will engage with " + what.to_numpy() + ": " + _count_bins(n_events.to_numpy())
            + " events, mostly " + source_names + ".")
    return users.astype(np.int64), text.astype(object)


@dataclass
class PrepareConfig:
    """Everything that decides the prepared data; its hash names the cache folder.

    future_frac: share of each user's (primary-source) events held out as the future, in
    [0, 1). 0 holds nothing back: every event is history (labels from a separate period).
    primary_source: the source whose events are counted for the cut (None: every event).
    buckets: users are partitioned into this many hash buckets, each prepared as one shard
    (None: the loader's default, about one per 500,000 events); it decides the shards, never the
    number of processes that prepare them.
    """

    dataset: str
    loader_args: dict
    window: WindowConfig
    split_seed: int = 0
    future_frac: float = 0.2
    primary_source: str | None = None
    text_encoder: str = "hashing"
    buckets: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.future_frac) < 1.0:
            raise DataError(f"future_frac must be in [0, 1) (0: no future held back), not {self.future_frac}.")
        if self.buckets is not None and int(self.buckets) < 1:
            raise DataError(f"buckets must be >= 1 (or null: the loader's default), not {self.buckets}.")

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": FORMAT_VERSION}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


class _Stats:
    """The figures of the summary and meta.json, per bucket; buckets merge in bucket order."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.users = 0
        self.empty_users = 0  # no event at all
        self.no_history = 0  # no history event, so no window
        self.no_future = 0
        self.events_per_source = np.zeros(len(spec.sources), dtype=np.int64)
        self.hist_events = 0
        self.fut_events = 0
        self.windows = np.zeros(1, dtype=np.int64)  # users per number of windows
        self.splits = np.zeros(3, dtype=np.int64)
        self.label_counts: dict[str, np.ndarray] = {
            lab.name: np.zeros(lab.num_classes, dtype=np.int64) for lab in spec.labels if lab.kind != "multilabel"
        }
        f = len(spec.tabular_inputs)
        self.tab_sum = np.zeros(f)
        self.tab_sq = np.zeros(f)
        self.tab_n = 0
        self.filtered: dict[str, int] = {}
        self.first_day = int(np.iinfo(np.int64).max)  # calendar span of the training users' history
        self.last_day = -1

    _ARRAYS = ("events_per_source", "windows", "splits", "tab_sum", "tab_sq")
    _COUNTS = ("users", "empty_users", "no_history", "no_future", "hist_events", "fut_events", "tab_n")

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in self._COUNTS}, **{k: getattr(self, k).tolist() for k in self._ARRAYS},
                "label_counts": {k: v.tolist() for k, v in self.label_counts.items()}, "filtered": self.filtered,
                "first_day": self.first_day, "last_day": self.last_day}

    def add(self, d: dict) -> None:
        """Add the figures of one bucket (:meth:`to_json`)."""
        for k in self._COUNTS:
            setattr(self, k, getattr(self, k) + int(d[k]))
        for k in self._ARRAYS:
            a, b = getattr(self, k), np.asarray(d[k], dtype=getattr(self, k).dtype)
            if len(b) > len(a):
                a = np.concatenate([a, np.zeros(len(b) - len(a), a.dtype)])
            a[: len(b)] += b
            setattr(self, k, a)
        for k, v in d["label_counts"].items():
            self.label_counts[k] += np.asarray(v, np.int64)
        for k, v in d["filtered"].items():
            self.filtered[k] = self.filtered.get(k, 0) + int(v)
        self.first_day = min(self.first_day, int(d["first_day"]))
        self.last_day = max(self.last_day, int(d["last_day"]))

    def add_bucket(self, split: np.ndarray, hcounts: np.ndarray, fcounts: np.ndarray, src: np.ndarray,
                   hist: np.ndarray, is_fut: np.ndarray, wk_counts: np.ndarray) -> None:
        """Count one bucket's users (per split; without events, history or future), events (per
        source; history and future) and windows per user."""
        self.users += len(split)
        self.empty_users += int((hcounts + fcounts == 0).sum())
        self.no_history += int((hcounts == 0).sum())
        self.no_future += int((fcounts == 0).sum())
        self.events_per_source += np.bincount(src, minlength=len(self.events_per_source))
        self.hist_events += int(hist.sum())
        self.fut_events += int(is_fut.sum())
        per_count = np.bincount(wk_counts.astype(np.int64))
        if len(per_count) > len(self.windows):
            self.windows = np.concatenate([self.windows, np.zeros(len(per_count) - len(self.windows), np.int64)])
        self.windows[: len(per_count)] += per_count
        self.splits += np.bincount(split, minlength=3)

    def window_figures(self) -> dict:
        n = int(self.windows.sum())
        if n == 0:
            return {"mean": 0.0, "median": 0.0, "max": 0}
        counts = np.arange(len(self.windows))
        cum = np.cumsum(self.windows)
        lo, hi = counts[np.searchsorted(cum, (n - 1) // 2, side="right")], counts[np.searchsorted(cum, n // 2,
                                                                                                   side="right")]
        return {"mean": float((counts * self.windows).sum() / n), "median": float((lo + hi) / 2),
                "max": int(counts[self.windows > 0].max())}


def _future_mask(uid: np.ndarray, ts: np.ndarray, prim: np.ndarray, frac: float) -> np.ndarray:
    """Per event (sorted by user, then time): True for the future.

    The future is each user's last ceil(frac * n) primary events and whatever follows the first of
    them; a moment (same user and timestamp) cut in two goes to the future whole.
    """
    ustart = _segment_starts(uid)
    ugroup = np.cumsum(ustart) - 1
    pc = np.cumsum(prim)
    pc_before = np.concatenate([[0], pc[:-1]])
    prim_inclusive = pc - pc_before[ustart][ugroup]  # primary events so far within the user, inclusive
    n_prim = np.bincount(ugroup, weights=prim, minlength=ugroup.max() + 1 if len(ugroup) else 0).astype(np.int64)
    n_fut = np.ceil(n_prim * frac - 1e-9).astype(np.int64)
    is_fut = prim_inclusive > (n_prim - n_fut)[ugroup]  # monotone within a user
    moment_start = ustart | _segment_starts(ts)
    moment = np.cumsum(moment_start) - 1
    moment_last = np.append(moment_start[1:], True)
    return is_fut[moment_last][moment]  # a moment is future when its last row is


def _check_users(ev: pd.DataFrame, users: pd.DataFrame, units: list[Unit], users_where: str) -> None:
    """A bucket's users appear once each and every user with events has a row (the rest of the
    users table was checked while it was partitioned)."""
    uid = users["user_id"].to_numpy()
    dup = users["user_id"].duplicated(keep=False).to_numpy()
    if dup.any():
        first = ", ".join(f"{where_row(units, s)} (user_id {u})" for u, s in
                          zip(uid[dup][:3], users["seq"].to_numpy()[dup][:3], strict=True))
        raise DataError(f"{users_where}: {int(users['user_id'].duplicated().sum())} duplicate user row(s): each user "
                        f"must appear once. First duplicated rows: {first}.")
    known = np.isin(ev["user_id"].to_numpy(), uid)
    if not known.all():
        seqs = ev["seq"].to_numpy()[~known]
        first = int(seqs.min())
        bad = pd.unique(ev["user_id"].to_numpy()[~known])[:5].tolist()
        raise DataError(
            f"{units[first >> SEQ_ROW_BITS].where}: at least {int((~known).sum())} event row(s) belong to user_id(s) "
            f"missing from the users table {users_where}, e.g. {bad} (first at {where_row(units, first)}). Every "
            f"user with events needs a row in the users table."
        )


def _encoded_events(ev: pd.DataFrame, spec: DatasetSpec, items: _Vocab, texts: _Vocab,
                    stats: _Stats) -> tuple[np.ndarray, ...]:
    """A bucket's events sorted by (user, time), the order they were given in breaking ties, and
    encoded: (user id, time, source index, bucket-local item index (0: none; one key per (source,
    item id)), text strings as read, text index (-1: none), category (-1: none or unknown, counted
    in ``stats``), value)."""
    uid = ev["user_id"].to_numpy()
    ts = ev["timestamp"].to_numpy()
    order = np.lexsort((ev["seq"].to_numpy(), ts, uid))  # by user, then time; the given order breaks ties
    ev = ev.iloc[order].reset_index(drop=True)
    uid, ts = uid[order], ts[order]
    src = ev["source"].to_numpy().astype(np.int64)
    raw_item = ev["item_id"].to_numpy()
    has_item = raw_item >= 0
    item = np.zeros(len(ev), dtype=np.int64)
    if has_item.any():
        # one integer key per (source, item id): the same id in two sources is two items
        item[has_item] = items.map(src[has_item] * ITEM_KEY_STRIDE + raw_item[has_item])
    text_str = ev["text"].array  # strings as read (Arrow-backed): never a Python object per event
    has_text = (ev["text"] != "").to_numpy()
    text = np.full(len(ev), -1, dtype=np.int64)
    if has_text.any():
        text[has_text] = texts.map(text_str[has_text])
    cat = codes_of(ev["category"], spec.categories)
    unknown_cat = (cat < 0) & (ev["category"] != "").to_numpy()
    if unknown_cat.any():
        stats.filtered[UNKNOWN_CATEGORY] = stats.filtered.get(UNKNOWN_CATEGORY, 0) + int(unknown_cat.sum())
    return uid, ts, src, item, text_str, text, cat, ev["value"].to_numpy().astype(np.float32)


def _bucket_table(ev: pd.DataFrame, users: pd.DataFrame | None, spec: DatasetSpec, cfg: PrepareConfig,
                  items: _Vocab, texts: _Vocab, stats: _Stats) -> pa.Table:
    """One bucket's users as one shard: ``ev`` holds every canonical event of the bucket (from
    :mod:`data_modules.buckets`), ``users`` its users table rows (None: the users are those with
    events), both checked; users keep the order they were given in, events are sorted by (user,
    time) with the order they were given in breaking ties."""
    src_index = {s: i for i, s in enumerate(spec.sources)}
    if users is not None:
        users = users.sort_values("seq", kind="stable").reset_index(drop=True)
        user_ids = users["user_id"].to_numpy()
    else:
        user_ids = np.unique(ev["user_id"].to_numpy())

    uid, ts, src, item, text_str, text, cat, value = _encoded_events(ev, spec, items, texts, stats)
    day = ts // SECONDS_PER_DAY

    # --- history / future ---------------------------------------------------------------
    ustart = _segment_starts(uid)
    prim = np.ones(len(ev), dtype=bool) if cfg.primary_source is None else src == src_index[cfg.primary_source]
    is_fut = _future_mask(uid, ts, prim, cfg.future_frac)
    hist = ~is_fut

    # --- windows over the history ----------------------------------------------------------
    key = np.where(hist, window_keys(ustart, ts, cfg.window), np.iinfo(np.int64).max)  # future events: no window
    h_idx = np.flatnonzero(hist)
    h_uid, h_key = uid[h_idx], key[h_idx]
    h_window, _ = window_ordinals(_segment_starts(h_uid), h_key)

    # --- per-user assembly -----------------------------------------------------------------
    ev_users = np.unique(uid)
    sorter = np.argsort(user_ids, kind="stable")
    user_sorted = user_ids[sorter]
    pos = sorter[np.searchsorted(user_sorted, ev_users)]
    n_users = len(user_ids)

    def lists(idx_user: np.ndarray, columns: dict[str, tuple[np.ndarray, pa.DataType]]) -> dict[str, pa.Array]:
        # idx_user: for each selected event, the row (0..n_users-1) of its user; events are sorted by user
        counts = np.bincount(idx_user, minlength=n_users)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return {name: _list_array(vals, offsets, typ) for name, (vals, typ) in columns.items()}, counts

    row_of_event = (pos[np.cumsum(ustart) - 1]).astype(np.int64)
    # events are sorted by user id; user_ids may be in another order: reorder events by row
    by_row = np.argsort(row_of_event, kind="stable")
    hist_sel = by_row[hist[by_row]]
    fut_sel = by_row[is_fut[by_row]]
    win_of_event = np.zeros(len(ev), dtype=np.int64)
    win_of_event[h_idx] = h_window
    hcols, hcounts = lists(row_of_event[hist_sel], {
        "h_source": (src[hist_sel], pa.int8()), "h_item": (item[hist_sel], pa.int64()),
        "h_text": (text[hist_sel], pa.int32()), "h_value": (value[hist_sel], pa.float32()),
        "h_time": (ts[hist_sel], pa.int64()), "h_category": (cat[hist_sel], pa.int16()),
        "h_window": (win_of_event[hist_sel], pa.int32()),
    })
    fcols, fcounts = lists(row_of_event[fut_sel], {
        "f_source": (src[fut_sel], pa.int8()), "f_item": (item[fut_sel], pa.int64()),
        "f_text": (text[fut_sel], pa.int32()), "f_category": (cat[fut_sel], pa.int16()),
        "f_time": (ts[fut_sel], pa.int64()),
    })
    # window keys and first days: one per (user, window ordinal), users in row order
    h_rows = row_of_event[hist_sel]
    wk_first = hist_sel[_segment_starts(h_rows) | _segment_starts(win_of_event[hist_sel])]
    wk_rows = row_of_event[wk_first]
    wk_counts = np.bincount(wk_rows, minlength=n_users)
    wk_offsets = np.concatenate([[0], np.cumsum(wk_counts)])
    wk = _list_array(key[wk_first], wk_offsets, pa.int64())
    w_day = _list_array(day[wk_first], wk_offsets, pa.int32())

    # calendar of each user's history: first and last day, distinct active days (-1 / 0 without history)
    first_day = np.full(n_users, -1, dtype=np.int64)
    last_day = np.full(n_users, -1, dtype=np.int64)
    h_day = day[hist_sel]
    if len(hist_sel):
        u_start = _segment_starts(h_rows)
        first_day[h_rows[u_start]] = h_day[u_start]
        last_day[h_rows[np.append(u_start[1:], True)]] = h_day[np.append(u_start[1:], True)]
    active_days = np.bincount(h_rows[_segment_starts(h_rows) | _segment_starts(h_day)], minlength=n_users)

    split = user_split(user_ids, cfg.split_seed)
    train_hist = (split == 0) & (last_day >= 0)  # the calendar's reference comes from training users only
    if train_hist.any():
        stats.first_day = min(stats.first_day, int(first_day[train_hist].min()))
        stats.last_day = max(stats.last_day, int(last_day[train_hist].max()))
    # future summaries of training users only: validation and test futures are never read
    train_fut = fut_sel[split[row_of_event[fut_sel]] == 0]
    rows, summaries = future_summaries(row_of_event[train_fut], cat[train_fut], src[train_fut],
                                       text_str[train_fut], spec)
    fut_text = np.full(n_users, -1, dtype=np.int64)
    if len(rows):
        fut_text[rows] = texts.map(summaries)

    table = {
        "user_id": pa.array(user_ids, pa.int64()),
        "split": pa.array(split, pa.int8()),
        "n_hist": pa.array(hcounts, pa.int32()),
        "n_fut": pa.array(fcounts, pa.int32()),
        "n_windows": pa.array(wk_counts, pa.int32()),
        **hcols, "w_key": wk, "w_day": w_day, **fcols,
        "fut_text": pa.array(fut_text, pa.int32()),
        "first_day": pa.array(first_day, pa.int32()),
        "last_day": pa.array(last_day, pa.int32()),
        "active_days": pa.array(active_days, pa.int32()),
    }
    if spec.tabular_inputs:
        tab = users[spec.tabular_inputs].to_numpy(np.float32)
        table["tabular"] = pa.FixedSizeListArray.from_arrays(pa.array(tab.reshape(-1)), len(spec.tabular_inputs))
        tr = tab[split == 0]
        stats.tab_sum += tr.sum(0)
        stats.tab_sq += (tr.astype(np.float64) ** 2).sum(0)
        stats.tab_n += len(tr)
    for lab in spec.labels:
        if lab.kind == "multilabel":
            continue
        vals = users[lab.name].to_numpy(np.int64)
        table[f"label/{lab.name}"] = pa.array(vals, pa.int64())
        stats.label_counts[lab.name] += np.bincount(vals, minlength=lab.num_classes)[: lab.num_classes]

    stats.add_bucket(split, hcounts, fcounts, src, hist, is_fut, wk_counts)
    return pa.table(table)


def _write_stream(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


# ------------------------------------------------------------------ the cache folder's housekeeping
def remove_stale_tmp(folder: Path) -> list[Path]:
    """Remove the temporary folders that killed runs left in ``folder``; return what was removed.

    A temporary folder (``<name>.tmp-<pid>-<id>``, see store.atomic_dir) is stale when its owner
    (``.owner``: host and pid) ran on this host and is dead, or when it is untouched for
    STALE_TMP_S (another host's run, or no owner recorded).
    """
    removed = []
    host = socket.gethostname()
    for p in Path(folder).glob(f"*{TMP_MARK}*"):
        try:
            pid_part = p.name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0]
            owner = (p / OWNER_FILE).read_text().split() if (p / OWNER_FILE).exists() else []
            stale = time.time() - p.stat().st_mtime > STALE_TMP_S
            if not stale and len(owner) == 2 and owner[0] == host and pid_part.isdigit():
                stale = not pid_alive(int(pid_part))
            if stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p)
                log.info("prepared data: removed %s, left by a killed run", p)
        except OSError:  # gone already, or not ours to remove
            continue
    return removed


def _read_stream(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_stream(src).read_all()


def _lut(local: np.ndarray | pd.Index, global_index: pd.Index) -> np.ndarray:
    return global_index.get_indexer(pd.Index(local)).astype(np.int64)


def _remap_shard(path: Path, item_lut: np.ndarray, text_lut: np.ndarray) -> None:
    """Rewrite a shard's bucket-local item and text indices as global ones. ``item_lut[i]`` is
    the global index of local item ``i`` (0 stays 0: no item), ``text_lut[j + 1]`` that of local
    text ``j`` (-1 stays -1: no text). A shard whose tables are the global tables' head is left as
    it is."""
    if (item_lut == np.arange(len(item_lut))).all() and (text_lut == np.arange(-1, len(text_lut) - 1)).all():
        return
    table = _read_stream(path)

    def remap(name: str, lut: np.ndarray, shift: int, typ: pa.DataType) -> None:
        nonlocal table
        col = table.column(name).combine_chunks()
        idx = table.schema.get_field_index(name)
        if pa.types.is_list(col.type):
            values = np.asarray(col.values.to_numpy(zero_copy_only=False), np.int64)
            new = pa.ListArray.from_arrays(col.offsets, pa.array(lut[values + shift], typ))
        else:
            new = pa.array(lut[np.asarray(col.to_numpy(zero_copy_only=False), np.int64) + shift], typ)
        table = table.set_column(idx, table.schema.field(idx), new)

    for name in ("h_item", "f_item"):
        remap(name, item_lut, 0, pa.int64())
    for name, typ in (("h_text", pa.int32()), ("f_text", pa.int32()), ("fut_text", pa.int32())):
        remap(name, text_lut, 1, typ)
    tmp = tmp_name(path)
    _write_stream(table, tmp)
    del table
    os.replace(tmp, path)


def _prepare_bucket(b: int, parts: Path, tmp: Path, source: Source, spec: DatasetSpec, cfg: PrepareConfig) -> dict | None:
    """Bucket ``b`` → shard ``users-<b>.arrow`` with bucket-local item and text indices, its local
    tables under ``parts/vocab/`` and its figures (None: the bucket holds no user)."""
    ev = read_bucket(parts, "events", b, event_schema())
    users = read_bucket(parts, "users", b, users_schema(spec)) if source.users_where else None
    if ev is None:
        ev = event_schema().empty_table().drop(["bucket"]).to_pandas()
    if users is not None:
        _check_users(ev, users, source.units, source.users_where)
    elif len(ev) == 0:
        return None
    items, texts, stats = _Vocab(first_index=1), _Vocab(), _Stats(spec)
    table = _bucket_table(ev, users, spec, cfg, items, texts, stats)
    del ev, users
    if stats.users == 0:
        return None
    _write_stream(table, tmp / f"users-{b:05d}.arrow")
    vocab = parts / "vocab"
    vocab.mkdir(exist_ok=True)
    np.save(vocab / f"items-{b:05d}.npy", np.asarray(items.keys, np.int64))
    _write_stream(pa.table({"text": pa.array([str(t) for t in texts.keys], pa.string())}), vocab / f"texts-{b:05d}.arrow")
    return stats.to_json()


def _global_tables(parts: Path, buckets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The item keys and texts of the whole data set: every bucket's local tables in bucket order,
    each key at its first occurrence (so one bucket gives the order a single pass would)."""
    vocab = parts / "vocab"
    keys = [np.load(vocab / f"items-{b:05d}.npy") for b in buckets]
    texts = [np.asarray(_read_stream(vocab / f"texts-{b:05d}.arrow").column("text").to_numpy(zero_copy_only=False),
                        dtype=object) for b in buckets]
    all_keys = pd.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    all_texts = pd.unique(np.concatenate(texts)) if texts else np.zeros(0, object)
    return np.asarray(all_keys, np.int64), np.asarray(all_texts, dtype=object)


def prepare_dataset(
    cfg: PrepareConfig,
    source: Source,
    out_dir: Path,
    encoder_factory,
    text_cache_dir: Path,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> dict:
    """Prepare ``source`` into ``out_dir`` (published atomically); return the meta dict.

    Every rank of ``ranks`` (one process by default) calls this with the same arguments; each does
    its share of every phase, and rank 0 the merges and the publishing:

    1. **partition** (:mod:`data_modules.buckets`): the source's units are shared out; every row
       is validated and written to its user's bucket;
    2. **buckets**: the buckets are shared out; each is checked (duplicate users, events of
       unknown users), windowed and written as one shard with bucket-local item and text tables;
    3. **tables**: rank 0 joins the local tables into the global item and text tables; every
       rank rewrites its shards' indices as global ones and records their checksums;
    4. **texts**: the distinct texts are shared out and encoded into the shared text cache; rank 0
       then writes ``text_emb.npy``, ``meta.json`` and renames the folder into place.

    Before the pass the text encoder is built (an unknown one fails now, not after the pass), the
    cache folders are checked writable and the leftovers of killed runs removed. Any error on any
    rank stops every rank and leaves nothing behind (:meth:`Ranks.step`).
    """
    return _Preparation(cfg, source, Path(out_dir), Path(text_cache_dir), progress, ranks or Ranks()).run(encoder_factory)


class _Preparation:
    """One run of :func:`prepare_dataset`: its phases, each run on every rank (:meth:`Ranks.step`)."""

    def __init__(self, cfg: PrepareConfig, source: Source, out_dir: Path, text_cache_dir: Path, progress: bool,
                 ranks: Ranks):
        self.cfg, self.source, self.spec, self.out_dir = cfg, source, source.spec, out_dir
        self.text_cache_dir, self.ranks = text_cache_dir, ranks
        self.bar = progress and ranks.is_zero
        self.n_buckets = int(cfg.buckets or source.buckets)
        self.phases: dict[str, float] = {}

    def _phase(self, name: str) -> None:
        """Record the seconds since the last phase ended as phase ``name``'s."""
        self.phases[name] = time.perf_counter() - self.t0 - sum(self.phases.values())

    def run(self, encoder_factory) -> dict:
        ranks = self.ranks
        self.t0 = time.perf_counter()
        self.encoder = ranks.step(encoder_factory)
        self.tmp = Path(ranks.broadcast(ranks.step(self._start)))
        self.parts = self.tmp / "parts"
        try:
            self._partition()
            self._buckets()
            self._tables()
            self._texts()
            meta = ranks.step(self._publish)
        finally:
            if ranks.is_zero and self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        # the other ranks read the manifest rank 0 just wrote and checked (hashing every shard again
        # would keep them, and the launcher, waiting)
        return meta if meta is not None else load_meta(self.out_dir, verify=False)

    def _start(self) -> str | None:
        """Rank 0: the cache folders writable, killed runs' leftovers gone, the staging folder made."""
        if not self.ranks.is_zero:
            return None
        fix = "point `cache_dir` at a folder you can write, or fix its permissions"
        check_writable(self.out_dir.parent, "prepared-data cache", fix)
        check_writable(self.text_cache_dir, "text cache", fix)
        remove_stale_tmp(self.out_dir.parent)
        tmp = tmp_name(self.out_dir)
        tmp.mkdir(parents=True)
        (tmp / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        return str(tmp)

    def _partition(self) -> None:
        """1. Every rank validates its share of the units into the user buckets."""
        from tqdm.auto import tqdm

        ranks, source = self.ranks, self.source
        partitioner = Partitioner(source, self.parts, self.n_buckets)

        def partition() -> dict:
            mine = ranks.share([u.size for u in source.units])
            return {k: partitioner.unit(k) for k in tqdm(mine, desc=f"partition {self.cfg.dataset}", unit="part",
                                                         disable=not self.bar)}

        units = {k: v for part in ranks.gather(ranks.step(partition)) for k, v in part.items()}
        self._phase("partition")
        if source.categories_from_data:
            self.spec.categories = sorted({c for u in units.values() for c in u["categories"]})

    def _buckets(self) -> None:
        """2. Every rank windows its share of the buckets, each into one shard; the counts merged."""
        from tqdm.auto import tqdm

        ranks, cfg, spec = self.ranks, self.cfg, self.spec
        self.sizes = sizes = ranks.broadcast(bucket_bytes(self.parts, self.n_buckets) if ranks.is_zero else None)
        full = [b for b in range(self.n_buckets) if sizes[b] > 0]

        def prepare_buckets() -> dict:
            mine = [full[i] for i in ranks.share([sizes[b] for b in full])]
            return {b: _prepare_bucket(b, self.parts, self.tmp, self.source, spec, cfg)
                    for b in tqdm(mine, desc=f"prepare {cfg.dataset}", unit="bucket", disable=not self.bar)}

        figures = {b: v for part in ranks.gather(ranks.step(prepare_buckets)) for b, v in part.items()
                   if v is not None}
        self.shards_of = sorted(figures)

        def merge() -> _Stats:
            stats = _Stats(spec)
            for b in self.shards_of:
                stats.add(figures[b])
            if stats.users == 0:
                raise DataError(f"{cfg.dataset}: no users were found; nothing to prepare.")
            check_label_classes(spec.labels, stats.label_counts, self.source.users_where or cfg.dataset)
            return stats

        self.stats = ranks.step(merge)
        self._phase("buckets")
        if self.stats.filtered.get(UNKNOWN_CATEGORY) and ranks.is_zero:
            log.warning("%s: %d event(s) have a category outside the declared vocabulary; kept with no category",
                        cfg.dataset, self.stats.filtered[UNKNOWN_CATEGORY])

    def _tables(self) -> None:
        """3. Rank 0 joins the buckets' item and text tables; every rank rewrites its shards'
        indices as global ones and records their checksums."""
        ranks, tmp, parts = self.ranks, self.tmp, self.parts

        def tables() -> None:
            if ranks.is_zero:
                keys, texts = _global_tables(parts, self.shards_of)
                _write_stream(pa.table({"source": keys // ITEM_KEY_STRIDE, "item_id": keys % ITEM_KEY_STRIDE}),
                              tmp / "items.arrow")
                _write_stream(pa.table({"text": pa.array(texts.tolist(), pa.string())}), tmp / "texts.arrow")

        ranks.step(tables)
        items_t = _read_stream(tmp / "items.arrow")
        self.item_index = item_index = pd.Index(np.asarray(items_t.column("source"), np.int64) * ITEM_KEY_STRIDE
                                                + np.asarray(items_t.column("item_id"), np.int64))
        self.all_texts = np.asarray(_read_stream(tmp / "texts.arrow").column("text").to_numpy(zero_copy_only=False),
                                    dtype=object)

        def remap() -> dict:
            text_index = pd.Index(self.all_texts)
            out = {}
            for i in ranks.share([self.sizes[b] for b in self.shards_of]):
                b = self.shards_of[i]
                local_items = np.load(parts / "vocab" / f"items-{b:05d}.npy")
                local_texts = _read_stream(parts / "vocab" / f"texts-{b:05d}.arrow").column("text").to_numpy(
                    zero_copy_only=False)
                item_lut = np.concatenate([[0], _lut(local_items, item_index) + 1])
                text_lut = np.concatenate([[-1], _lut(local_texts, text_index)])
                shard = tmp / f"users-{b:05d}.arrow"
                _remap_shard(shard, item_lut, text_lut)
                out[shard.name] = file_digest(shard)
            return out

        self.digests = {k: v for part in ranks.gather(ranks.step(remap)) for k, v in part.items()}
        self._phase("tables")

    def _texts(self) -> None:
        """4. Every rank encodes its share of the distinct texts into the shared text cache."""
        from data_modules.text import TextCache

        ranks = self.ranks
        self.cache = TextCache(self.text_cache_dir, self.encoder)
        ranks.step(lambda: self.cache.embed([str(t) for t in self.all_texts[ranks.rank::ranks.world]],
                                            progress=self.bar))
        self._phase("texts")

    def _publish(self) -> dict | None:
        """Rank 0: the text embeddings and meta.json written, the folder renamed into place."""
        if not self.ranks.is_zero:
            return None
        tmp, all_texts = self.tmp, self.all_texts
        emb = self.cache.embed([str(t) for t in all_texts]) if len(all_texts) else np.zeros((0, self.encoder.dim),
                                                                                              np.float16)
        np.save(tmp / "text_emb.npy", emb.astype(np.float16))
        meta = self._meta()
        atomic_write_json(tmp / "meta.json", meta)
        shutil.rmtree(self.parts)
        (tmp / OWNER_FILE).unlink()
        replace_dir(tmp, self.out_dir)
        return meta

    def _meta(self) -> dict:
        """meta.json: the config, the spec, every count, the calendar, the tables' sizes, the
        shards and every file's checksum, and the phases' seconds."""
        cfg, spec, stats, encoder = self.cfg, self.spec, self.stats, self.encoder
        shards = [f"users-{b:05d}.arrow" for b in self.shards_of]
        files = ["text_emb.npy", "texts.arrow", "items.arrow"]
        mean = stats.tab_sum / max(stats.tab_n, 1)
        std = np.sqrt(np.maximum(stats.tab_sq / max(stats.tab_n, 1) - mean**2, 0.0))
        has_hist = stats.last_day >= 0
        return {
            "format_version": FORMAT_VERSION,
            "config": {**asdict(cfg), "key": cfg.key()},
            "spec": spec.to_dict(),
            "users": stats.users,
            "empty_users": stats.empty_users,
            "users_without_history": stats.no_history,
            "users_without_future": stats.no_future,
            "splits": dict(zip(("train", "val", "test"), stats.splits.tolist(), strict=True)),
            "events_per_source": dict(zip(spec.sources, stats.events_per_source.tolist(), strict=True)),
            "history_events": stats.hist_events,
            "future_events": stats.fut_events,
            "windows_per_user": stats.window_figures(),
            "window_period": cfg.window.period,
            "calendar": {
                # days since the epoch: the first and last day of the training users' history
                "reference_day": stats.first_day if has_hist else 0,
                "end_day": stats.last_day if has_hist else 0,
                "has_calendar": bool(has_hist and stats.first_day >= CALENDAR_MIN_DAY),
            },
            "label_balance": {k: v.tolist() for k, v in stats.label_counts.items()},
            "num_items": len(self.item_index),
            "num_texts": len(self.all_texts),
            "text_dim": int(encoder.dim),
            "text_encoder": encoder.name,
            "tabular_mean": mean.tolist(),
            "tabular_std": np.where(std > 0, std, 1.0).tolist(),
            "filtered": stats.filtered,
            "buckets": self.n_buckets,
            "ranks": self.ranks.world,
            "shards": shards,
            "checksums": {**{s: self.digests[s] for s in shards}, **{f: file_digest(self.tmp / f) for f in files}},
            "prepare_seconds": time.perf_counter() - self.t0,
            "phase_seconds": {**self.phases, "publish": time.perf_counter() - self.t0 - sum(self.phases.values())},
        }


def load_meta(prepared_dir: Path, verify: bool = True) -> dict | None:
    """meta.json of a prepared folder, or None when it is missing or from another format version.

    With ``verify`` every file's checksum is checked: a missing or damaged file raises DataError
    naming it (delete the folder and ``foundv2 data`` rebuilds it). Leftovers of killed runs
    beside the folder are removed.
    """
    prepared_dir = Path(prepared_dir)
    remove_stale_tmp(prepared_dir.parent)
    p = prepared_dir / "meta.json"
    if not p.exists():
        return None
    rebuild = f"delete the folder (rm -r {prepared_dir}) and run `foundv2 data` again to rebuild it"
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{p}: the prepared-data cache is corrupt ({err}); {rebuild}.") from err
    if meta.get("format_version") != FORMAT_VERSION:
        return None
    sums = meta.get("checksums", {})
    missing = [s for s in sums if not (prepared_dir / s).exists()]
    if missing:
        raise DataError(f"{prepared_dir}: the prepared-data cache is incomplete (missing {missing[:3]}); {rebuild}.")
    if verify:
        for name, digest in sums.items():
            if file_digest(prepared_dir / name) != digest:
                raise DataError(f"{prepared_dir / name}: checksum mismatch, the prepared-data cache is corrupt "
                                f"(changed since it was written); {rebuild}.")
    return meta


def calendar_features(table, meta: dict) -> dict[str, np.ndarray]:
    """Each user's calendar position, from the history only (never the future), as float32 arrays.

    ``table`` is a prepared table (``UserDataModule.table``, the column dict a collate function
    receives, or anything whose columns read as arrays); the keys are :data:`CALENDAR_FEATURES`,
    in that order, in days (scale them, e.g. by 1/365, before a model reads them). Days count from
    ``meta['calendar']['reference_day']``, the first day of the training users' history (validation
    and test users never set it; theirs may come before it); users without history get 0
    everywhere and ``has_history`` 0:

    - ``first_day``, ``last_day``: days since the reference date of the first and last history event;
    - ``tenure_days``: last minus first day; ``active_days``: distinct days with an event;
    - ``days_since_last``: days from the last history event to ``end_day``, the training users'
      last history day;
    - ``has_history``: 1 for users with at least one history event.

    Per window, the day of the window's first event is the list column ``w_day`` (days since the
    epoch; subtract the reference day). On data without calendar time (``has_calendar`` false:
    timestamps before 1971 are ordinals) the figures are still computed but mean little.
    """
    cal = meta["calendar"]
    first = np.asarray(table["first_day"], dtype=np.int64)
    last = np.asarray(table["last_day"], dtype=np.int64)
    has = (last >= 0).astype(np.float32)
    ref, end = int(cal["reference_day"]), int(cal["end_day"])

    def where_history(x):
        return (np.where(has > 0, x, 0)).astype(np.float32)

    return {  # in the order of CALENDAR_FEATURES
        "first_day": where_history(first - ref),
        "last_day": where_history(last - ref),
        "tenure_days": where_history(last - first),
        "active_days": np.asarray(table["active_days"], dtype=np.float32),
        "days_since_last": where_history(end - last),
        "has_history": has,
    }


def calendar_span(meta: dict) -> int:
    """Days from the reference day to the end day, both included (the training users' history
    span; at least 1): the unit of :func:`window_calendar`."""
    cal = meta["calendar"]
    return max(int(cal["end_day"]) - int(cal["reference_day"]) + 1, 1)


def window_calendar(win_day: np.ndarray, win_mask: np.ndarray, first_day: np.ndarray, meta: dict) -> np.ndarray:
    """Each window's calendar position, the absolute time the models read: [B, W, 2] float32.

    ``win_day`` [B, W]: each window's first day, days since ``meta['calendar']['reference_day']``
    (what ``EventCollate`` hands over as ``win_day``); ``win_mask`` [B, W]: real windows (zeros
    elsewhere); ``first_day`` [B]: the user's first history day, days since the epoch (the
    prepared column; -1 without history). The features
    (:data:`WINDOW_CALENDAR`), in units of :func:`calendar_span`:

    - ``position``: the window's day since the reference day (0 at the first, ~1 at the last day
      of the training users' history; val/test users may fall outside);
    - ``tenure``: days since the user's first history event (their age as a user at that window).

    Both depend only on the window and what came before it (the first day precedes every window),
    so a causal model stays causal. The user's first day is ``position - tenure`` of any window and
    the last day the ``position`` of the last window: a signup cohort or a lifecycle stage is a
    linear read-out. Zeros where the data has no calendar time (``has_calendar`` false).
    """
    win_day = np.asarray(win_day, np.int64)
    out = np.zeros(win_day.shape + (len(WINDOW_CALENDAR),), np.float32)
    if not meta["calendar"]["has_calendar"]:
        return out
    span = float(calendar_span(meta))
    first = np.asarray(first_day, np.int64) - int(meta["calendar"]["reference_day"])
    out[..., 0] = win_day / span
    out[..., 1] = np.maximum(win_day - first[:, None], 0) / span
    return out * np.asarray(win_mask, bool)[..., None]


def lopsided(meta: dict, no_history: float = 0.25, future_share: float = 0.5) -> list[str]:
    """What a preparation did that a user would not expect, one paragraph each with the likely
    fix: a large share of the users with events left without any history window (above
    ``no_history``), a future that takes most of the events (above ``future_share``), a declared
    source without a single event. A threshold of 1 silences its paragraph."""
    cfg = meta["config"]
    frac = float(cfg["future_frac"])
    out = []
    active = meta["users"] - meta["empty_users"]
    if active and meta["users_without_history"] / active > no_history:
        share = meta["users_without_history"] / active
        held = (f"future_frac {frac:g} holds back the last {math.ceil(frac * 100)}% of each user's events "
                "(whole moments, rounded up), so a user with few events keeps none as history"
                if frac > 0 else "every event is history, yet these users' events fall in no window")
        fix = ("If your labels describe a later period than the events, set `future_frac: 0` (nothing held back); "
               "else lower future_frac" if frac > 0 else "Check window_mode and primary_source")
        out.append(f"{share:.0%} of the users with events ({meta['users_without_history']:,} of {active:,}) have no "
                   f"history window: no model sees anything of them. {held}. {fix}. "
                   f"(data.warn_no_history {no_history:g}: 1 silences this.)")
    events = meta["history_events"] + meta["future_events"]
    if events and frac > 0 and meta["future_events"] / events > future_share:
        out.append(f"the future takes {meta['future_events'] / events:.0%} of all events "
                   f"({meta['future_events']:,} of {events:,}), more than the future_frac {frac:g} of each user's "
                   "events: a moment (one user and timestamp) is never cut in two, so users whose events share few "
                   "timestamps lose most of them to the future. If your labels describe a later period, set "
                   "`future_frac: 0`; else lower future_frac or declare a primary_source. "
                   f"(data.warn_future_share {future_share:g}: 1 silences this.)")
    for source, n in meta["events_per_source"].items():
        if n == 0:
            out.append(f"source '{source}' is declared but has no events: check the `source` column of the events "
                       "files, or leave it out of loader_args.sources.")
    return out


def summary_lines(meta: dict, where: Path) -> list[str]:
    """The human summary printed by ``foundv2 data``."""
    spec = meta["spec"]
    cfg = meta["config"]
    frac = float(cfg["future_frac"])
    primary = f" {cfg['primary_source']}" if cfg.get("primary_source") else ""
    future = (f"future = last {math.ceil(frac * 100)}% of each user's{primary} events" if frac > 0
              else "no future held back (future_frac 0): every event is history")
    cal = meta["calendar"]
    lines = [
        f"data set        {spec['name']}  ({cfg['window']['mode']} windows, split seed {cfg['split_seed']})",
        f"users           {meta['users']:,}  (train {meta['splits']['train']:,} / val {meta['splits']['val']:,} / "
        f"test {meta['splits']['test']:,}; {meta['empty_users']:,} without events, "
        f"{meta['users_without_history']:,} without history windows"
        + (f", {meta['users_without_future']:,} without future events)" if frac > 0 else ")"),
        "events/source   " + ", ".join(f"{k} {v:,}" for k, v in meta["events_per_source"].items()),
        f"windows/user    mean {meta['windows_per_user']['mean']:.1f}, median {meta['windows_per_user']['median']:.0f}, "
        f"max {meta['windows_per_user']['max']}",
        f"history/future  {meta['history_events']:,} / {meta['future_events']:,} events ({future})",
        f"items, texts    {meta['num_items']:,} items, {meta['num_texts']:,} distinct texts "
        f"({meta['text_encoder']}, {meta['text_dim']}-d)",
    ]
    if cal["has_calendar"]:
        day = np.datetime64(int(cal["reference_day"]), "D")
        lines.append(f"calendar        history {day} to {np.datetime64(int(cal['end_day']), 'D')} "
                     f"({cal['end_day'] - cal['reference_day'] + 1:,} days)")
    for lab, counts in meta["label_balance"].items():
        tot = max(sum(counts), 1)
        shares = ", ".join(f"{c / tot:.0%}" for c in counts[:8]) + (" ..." if len(counts) > 8 else "")
        lines.append(f"label {lab:<11} {len(counts)} classes: {shares}")
    if meta.get("filtered"):
        lines.append("filtered        " + ", ".join(f"{k}: {v}" for k, v in meta["filtered"].items()))
    lines.append(f"cache           {where}")
    return lines
