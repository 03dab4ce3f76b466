"""UserDataModule: one DataModule that hands every stage the columns it needs.

Heavy work happens once in ``prepare_data`` (validation, windows, text encoding, Arrow shards in
a cache folder named by the config's hash); ``setup`` only memory-maps what is there, per
process. Batches are user-level (a user's windows stay together). Under DDP, Lightning's
distributed sampler gives each rank a disjoint shard of users (predict uses the unrepeated
sampler, so every user is predicted exactly once).

At scale: training and validation read a seeded sample of users (``fit_users``, ``val_users``:
:meth:`UserDataModule.fit_rows`), the same on every rank; ``predict`` streams every user, a batch
at a time, optionally ordered by length (``predict_order``). No step holds every user's columns:
rows are read per batch as Arrow (:class:`UserRows`), and the pages of the memory-mapped files a
pass has read are handed back as it goes (:func:`release_pages`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset

from data_modules.activity import activity_dim, activity_features, activity_reference_from_calendar
from data_modules.batch import as_table, fixed, pad_rows, ragged, scalars
from data_modules.prepare import (
    WINDOW_CALENDAR,
    load_meta,
    summary_lines,
    window_calendar,
)
from data_modules.representations import REPRESENTATION_COLUMNS, RepresentationCollate
from data_modules.schema import DataError, DatasetSpec
from data_modules.settings import DataSettings
from data_modules.store import Split, read_stage_output
from data_modules.tokens import TeacherVectors, TokenCollate, read_vectors

log = logging.getLogger(__name__)



def _open_shards(folder: Path, names: list[str]):
    import datasets

    parts = []
    for name in names:
        try:
            parts.append(datasets.Dataset.from_file(str(folder / name)))
        except Exception as err:  # pyarrow raises ArrowInvalid & co on a damaged file
            raise DataError(f"{folder / name}: cannot be read as an Arrow shard ({err}); the cache is corrupt, "
                            f"delete {folder} to rebuild it.") from err
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def release_pages(paths) -> int:
    """Hand back the resident pages of this process's read-only memory mappings of ``paths``
    (``madvise(MADV_DONTNEED)``; Linux, elsewhere nothing). The Arrow files the DataModule reads are
    memory-mapped, and every page a pass over the users touches would otherwise stay in the
    process's resident set until the end: a predict over a million users' features would hold the
    whole file. The data stays in the page cache and a later read maps it again; only mappings of
    those files, and only read-only ones, are touched. Returns the bytes of the mappings released."""
    if not sys.platform.startswith("linux") or not paths:
        return 0
    targets = {os.path.realpath(str(p)) for p in paths}
    libc = ctypes.CDLL(None, use_errno=True)
    released = 0
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or "w" in fields[1] or fields[5].strip() not in targets:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4) == 0:  # 4: MADV_DONTNEED
            released += end - start
    return released


def data_files(*tables) -> list[str]:
    """The files behind these ``datasets.Dataset`` objects (what :func:`release_pages` takes)."""
    return sorted({f["filename"] for t in tables if t is not None for f in getattr(t, "cache_files", [])})


#: users read between two releases of the mapped pages in a shuffled pass (UserRows)
SHUFFLED_RELEASE_EVERY = 256


class UserRows(Dataset):
    """A map-style view of some users' rows; fetching a batch of indices reads them as one Arrow
    table (``pyarrow.Table``, what the collates take), never as Python objects.

    ``files`` (and the table's own files): memory-mapped data files whose pages are handed back
    (:func:`release_pages`) every ``release_every`` users read, so that the resident memory of a
    pass over every user stays that of a few thousand users. A shuffled pass (training) reads
    users scattered over the file, and the kernel's read-ahead brings in far more than each
    user's bytes (a tokenizer fit on 4,000 of 100,000 users' features held 1.5 GB at 4,096 users
    per release): :data:`SHUFFLED_RELEASE_EVERY` users then.
    """

    def __init__(self, table, rows: np.ndarray, files: list[str] | None = None, release_every: int = 4096):
        self.table = table.with_format("arrow")
        self.rows = np.asarray(rows, dtype=np.int64)
        self.files = sorted(set(files or []) | set(data_files(table)))
        self.release_every = release_every
        self._read = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]) -> pa.Table:
        rows = self.rows[np.asarray(idx, dtype=np.int64)]
        batch = self.table[rows.tolist()]
        if "row" not in batch.column_names:  # a stage output carries the prepared row itself
            batch = batch.append_column("row", pa.array(rows, pa.int64()))
        self._read += len(rows)
        if self._read >= self.release_every:
            self._read = 0
            release_pages(self.files)
        return batch


class EpochShuffleSampler(torch.utils.data.DistributedSampler):
    """A random order that depends only on (seed, epoch): a resumed run sees the same batches.

    Lightning calls ``set_epoch`` at every epoch. Under DDP each rank takes every world_size-th
    user of the same order (a DistributedSampler, so Lightning does not wrap it in a second
    shuffle): ``world_size`` ranks with ``batch_size / world_size`` users each see the same
    global batches as one process.
    """

    def __init__(self, n: int, seed: int = 0):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        super().__init__(range(n), num_replicas=torch.distributed.get_world_size() if distributed else 1,
                         rank=torch.distributed.get_rank() if distributed else 0, shuffle=True,
                         seed=seed * 100_003)
        self.n = n


class EventCollate:
    """Columns of a few users → the padded event batch of data_modules/batch.py."""

    def __init__(self, meta: dict, text_emb: np.ndarray, max_windows: int, max_events: int):
        self.meta = meta
        self.spec = DatasetSpec.from_dict(meta["spec"])
        self.text_emb = text_emb
        self.max_windows = max_windows
        self.max_events = max_events
        self.tab_mean = np.asarray(meta["tabular_mean"], np.float32)
        self.tab_std = np.asarray(meta["tabular_std"], np.float32)
        self.activity_reference = activity_reference_from_calendar(meta["calendar"])

    def _text(self, ids: np.ndarray) -> np.ndarray:
        emb = np.zeros(ids.shape + (self.text_emb.shape[1],), np.float32)
        has = ids >= 0
        if has.any():
            emb[has] = self.text_emb[ids[has]]
        return emb

    def __call__(self, cols) -> dict:
        t = as_table(cols)
        B = t.num_rows
        # per user: the latest max_windows windows, and of their events the latest max_events
        off, win = ragged(t, "h_window", np.int64)
        n_ev = np.diff(off)
        user = np.repeat(np.arange(B), n_ev)
        first_win = np.maximum(scalars(t, "n_windows", np.int64) - self.max_windows, 0)
        start = np.bincount(user, weights=win < first_win[user], minlength=B).astype(np.int64)  # sorted by window
        start = np.maximum(start, n_ev - self.max_events)
        kept = n_ev - start
        win_off = np.where(kept > 0, win[np.minimum(off[:-1] + start, max(len(win) - 1, 0))] if len(win) else 0, 0)

        def hist(name, pad, dtype):
            o, v = ragged(t, name, dtype)
            return pad_rows(o, v, start, kept, pad, dtype)

        source = hist("h_source", -1, np.int64)
        ev_mask = source >= 0
        ev_window = np.where(ev_mask, hist("h_window", 0, np.int64) - win_off[:, None], 0)
        # the windows from the first kept event's on, at most max_windows of them
        w_off, _ = ragged(t, "w_key", np.int64)
        n_w = np.clip(np.diff(w_off) - win_off, 0, self.max_windows)
        w_keys = pad_rows(w_off, ragged(t, "w_key", np.int64)[1], win_off, n_w, 0, np.int64)
        w_days = pad_rows(*ragged(t, "w_day", np.int64), win_off, n_w, 0, np.int64)
        win_mask = np.arange(w_keys.shape[1])[None, :] < n_w[:, None]
        ref_day = int(self.meta["calendar"]["reference_day"])
        win_day = np.where(win_mask, w_days - ref_day, 0)
        ev_text = hist("h_text", -1, np.int64)
        split = scalars(t, "split", np.int64)
        out = {
            "user_id": torch.as_tensor(scalars(t, "user_id", np.int64)),
            "row": torch.as_tensor(scalars(t, "row", np.int64)),
            "split": torch.as_tensor(split),
            "ev_source": torch.as_tensor(np.maximum(source, 0)),
            "ev_item": torch.as_tensor(hist("h_item", 0, np.int64)),
            "ev_text": torch.as_tensor(ev_text),
            "ev_text_emb": torch.as_tensor(self._text(ev_text)),
            "ev_value": torch.as_tensor(hist("h_value", 0.0, np.float32)),
            "ev_time": torch.as_tensor(hist("h_time", 0, np.int64)),
            "ev_category": torch.as_tensor(hist("h_category", -1, np.int64)),
            "ev_window": torch.as_tensor(ev_window),
            "ev_mask": torch.as_tensor(ev_mask),
            "win_key": torch.as_tensor(w_keys),
            "win_mask": torch.as_tensor(win_mask),
            "ref_day": torch.full((B,), ref_day, dtype=torch.int64),
            "win_day": torch.as_tensor(win_day),
            "win_calendar": torch.as_tensor(window_calendar(win_day, win_mask, scalars(t, "first_day", np.int64),
                                                            self.meta)),
            "fut_item": torch.as_tensor(pad_rows(*ragged(t, "f_item", np.int64), pad=0, dtype=np.int64)),
        }
        # from the whole history, before the latest-events cap
        out["activity"] = torch.as_tensor(activity_features(
            off, ragged(t, "h_source", np.int64)[1], ragged(t, "h_time", np.int64)[1],
            ragged(t, "h_value", np.float64)[1], len(self.spec.sources), self.activity_reference))
        fut_text = scalars(t, "fut_text", np.int64)
        out["fut_text_emb"] = torch.as_tensor(self._text(fut_text))
        out["has_fut_text"] = torch.as_tensor((fut_text >= 0) & (split == Split.TRAIN))
        if "tabular" in t.column_names:
            out["tabular"] = torch.as_tensor((fixed(t, "tabular", np.float32) - self.tab_mean) / self.tab_std)
        else:
            out["tabular"] = torch.zeros(B, 0)
        for lab in self.spec.labels:
            key = f"label/{lab.name}"
            if key in t.column_names:
                out[key] = torch.as_tensor(scalars(t, key, np.int64))
        return out


class SliceCollate:
    """Rows of a features dataset → the flat slice batch of data_modules/batch.py."""

    def __call__(self, cols) -> dict:
        t = as_table(cols)
        B = t.num_rows
        off, window = ragged(t, "slice_window", np.int64)
        _, feat = ragged(t, "feat", np.float32)
        return {
            "user_id": torch.as_tensor(scalars(t, "user_id", np.int64)),
            "row": torch.as_tensor(scalars(t, "row", np.int64)),
            "split": torch.as_tensor(scalars(t, "split", np.int64)),
            "slice_user": torch.as_tensor(np.repeat(np.arange(B), np.diff(off))),
            "slice_window": torch.as_tensor(window),
            "slice_source": torch.as_tensor(ragged(t, "slice_source", np.int64)[1]),
            "slice_key": torch.as_tensor(ragged(t, "slice_key", np.int64)[1]),
            "feat": torch.as_tensor(feat.reshape(len(window), -1)),
        }


@dataclass(frozen=True)
class BatchKind:
    """One kind of batch the DataModule hands out: which dataset its rows come from and how a
    few rows become a batch (the contracts are in data_modules/batch.py).

    ``input_arg`` names the UserDataModule argument that points at its dataset (a stage output
    whose ``meta.json`` kind is ``output_kind``, any kind when None, and which holds ``columns``);
    None means the prepared table itself. A stage output carries each user's ``split`` and
    prepared ``row``. ``only_columns``: batches read just ``columns`` of the dataset (a stage
    output may hold much more).
    """

    name: str
    input_arg: str | None
    output_kind: str | None
    columns: tuple[str, ...]
    collate: Callable[[UserDataModule], Callable]
    only_columns: bool = False


BATCH_KINDS = {k.name: k for k in (
    BatchKind("events", None, None, ("user_id", "split", "h_source", "h_window", "w_key", "w_day", "first_day"),
              lambda dm: EventCollate(dm.meta, dm.text_emb, dm.hparams.max_windows, dm.hparams.max_events)),
    BatchKind("slices", "features_dir", "features",
              ("user_id", "row", "split", "slice_window", "slice_source", "slice_key", "feat"),
              lambda dm: SliceCollate()),
    BatchKind("tokens", "tokens_dir", "tokens",
              ("user_id", "row", "split", "slice_source", "slice_key", "token_ids"),
              lambda dm: TokenCollate(dm.table, dm.text_emb, [lab.name for lab in dm.spec.labels],
                                      dm.hparams.max_windows, dm.teacher)),
    BatchKind("representations", "representation_dir", None, REPRESENTATION_COLUMNS,
              lambda dm: RepresentationCollate(dm.table, dm.spec), only_columns=True),
    # question/answer pairs the same way
)}


class UserDataModule(DataSettings, L.LightningDataModule):
    """Users' multi-source histories for every stage: :class:`~data_modules.settings.DataSettings`
    (the ``data:`` settings, every argument, and the preparation) on a LightningDataModule, with
    the loaders the stages read.

    The batch kind (:data:`BATCH_KINDS`) is chosen once in ``setup`` from which input folder is
    given: ``batch_kind``, ``input_meta`` (the stage output's ``meta.json``, None for events).
    """

    meta: dict | None = None
    table = None
    text_emb = None
    batch_kind: str | None = None
    input_meta: dict | None = None
    input_table = None  # the dataset batches are read from (the prepared table for events)
    input_split: np.ndarray | None = None
    input_row: np.ndarray | None = None  # each input row's prepared row
    _fit_rows: np.ndarray | None = None
    _val_rows: np.ndarray | None = None
    teacher: TeacherVectors | None = None  # the teacher's vectors of the sampled users
    _pairs: dict  # split → the query/answer pairs (questions set), built on first use
    #: positions in the predict order that ``predict`` reads instead of all (a measurement's spread
    #: sample: :func:`foundv2.throughput.predict_throughput`); None: every user
    predict_subset: np.ndarray | None = None

    def _keep_settings(self, settings: dict) -> None:
        self.save_hyperparameters(settings)  # Lightning's hparams: checkpoints carry them

    # ---------------------------------------------------------------- set-up
    def setup(self, stage: str | None = None) -> None:
        if self.table is not None:
            return
        meta = load_meta(self.prepared_dir)
        if meta is None:
            raise DataError(f"{self.prepared_dir}: no prepared data; run prepare_data first (foundv2 data).")
        self.meta = meta
        self._pairs = {}
        self.spec = DatasetSpec.from_dict(meta["spec"])
        self.table = _open_shards(self.prepared_dir, meta["shards"])
        try:
            self.text_emb = np.load(self.prepared_dir / "text_emb.npy", mmap_mode="r")
        except (ValueError, OSError) as err:
            raise DataError(f"{self.prepared_dir / 'text_emb.npy'}: corrupt ({err}); delete the folder to rebuild.") from err
        self.split = self.table.data.column("split").to_numpy().astype(np.int64)
        self._open_input(self._choose_batch_kind())
        if self.hparams.teacher_dir:
            self.teacher = self._open_teacher(self.hparams.teacher_dir)
        release_pages(self.data_files())  # what reading the per-user scalars (split, row) mapped in

    def _open_teacher(self, folder: str) -> TeacherVectors:
        """``teacher_dir`` → the ``user_emb`` of the users a fit reads (the ``fit_users`` and
        ``val_users`` samples: no other user's vector reaches a loss), standardised with the mean and
        spread of the training users among them (:class:`~data_modules.tokens.TeacherVectors`).
        Only those users' vectors are read, a few thousand at a time."""
        if self.batch_kind != "tokens":
            raise DataError(f"data.teacher_dir {folder}: a teacher is read by token batches only (stage 3's "
                            f"distill term); give data.tokens_dir too, or drop data.teacher_dir.")
        ds, _ = read_stage_output(folder)
        missing = [c for c in ("row", "user_emb") if c not in ds.column_names]
        if missing:
            raise DataError(f"data.teacher_dir {folder}: the dataset lacks the column(s) {missing}; point it at a "
                            f"stage output with one user_emb per user (stage 1's features, say).")
        rows = np.asarray(ds.data.column("row").to_numpy(), np.int64)
        n = len(self.split)
        if rows.min(initial=0) < 0 or rows.max(initial=-1) >= n:
            raise DataError(f"data.teacher_dir {folder}: its rows do not fit this data set ({n} users); was it "
                            f"made from other data?")
        where = np.full(n, -1, np.int64)  # prepared row → the teacher dataset's row
        where[rows] = np.arange(len(rows))
        wanted = np.union1d(self.prepared_rows(self.fit_rows()), self.prepared_rows(self.val_rows()))
        wanted = wanted[where[wanted] >= 0]
        emb = read_vectors(ds, "user_emb", where[wanted])
        if emb.ndim != 2 or (len(wanted) and emb.shape[1] == 0):
            raise DataError(f"data.teacher_dir {folder}: user_emb is not one vector per user; was it made from "
                            f"other data?")
        bad = ~np.isfinite(emb).all(1)
        if bad.any():
            raise DataError(f"data.teacher_dir {folder}: user_emb holds NaN or infinite values for {int(bad.sum())} "
                            f"user(s) (first row {int(wanted[bad][0])}); refit or re-predict the stage that wrote it.")
        release_pages(data_files(ds))  # the pages read for the sample, not held for the run
        train = self.split[wanted] == Split.TRAIN
        if not train.any():
            raise DataError(f"data.teacher_dir {folder}: no training user has a vector, so there is nothing to "
                            f"learn from; predict that stage for the training split too.")
        mean, std = emb[train].mean(0), emb[train].std(0) + 1e-6
        return TeacherVectors(wanted, (emb - mean) / std, n)

    def _choose_batch_kind(self) -> BatchKind:
        given = [k for k in BATCH_KINDS.values() if k.input_arg and self.hparams[k.input_arg]]
        if len(given) > 1:
            raise DataError(f"data: give at most one input dataset, not {[k.input_arg for k in given]}.")
        return given[0] if given else BATCH_KINDS["events"]

    def _open_input(self, kind: BatchKind) -> None:
        self.batch_kind = kind.name
        if kind.input_arg is None:
            self.input_meta, self.input_table = None, self.table
        else:
            folder = self.hparams[kind.input_arg]
            self.input_table, self.input_meta = read_stage_output(folder)
            if kind.output_kind is not None and self.input_meta.get("kind") != kind.output_kind:
                raise DataError(f"data.{kind.input_arg} {folder}: a {self.input_meta.get('kind')!r} dataset, not a "
                                f"{kind.output_kind!r} one; point it at the predict output of the right stage.")
        missing = [c for c in kind.columns if c not in self.input_table.column_names]
        if missing:
            where = self.hparams[kind.input_arg] if kind.input_arg else self.prepared_dir
            raise DataError(f"{where}: the dataset lacks the column(s) {missing} that {kind.name} batches read "
                            f"(written by an older foundv2?); run the step that writes it again.")
        if kind.only_columns:
            self.input_table = self.input_table.select_columns(list(kind.columns))
        self.input_split = self.input_table.data.column("split").to_numpy().astype(np.int64)
        self.input_row = (np.arange(len(self.input_table)) if kind.input_arg is None
                          else np.asarray(self.input_table.data.column("row").to_numpy(), np.int64))

    def summary(self) -> list[str]:
        return summary_lines(self.meta or load_meta(self.prepared_dir), self.prepared_dir)

    def dims(self) -> dict:
        """What a stage needs to size itself."""
        m = self.meta
        return {
            "num_sources": len(m["spec"]["sources"]),
            "sources": list(m["spec"]["sources"]),
            "num_items": int(m["num_items"]),
            "num_categories": len(m["spec"]["categories"]),
            "text_dim": int(m["text_dim"]),
            "tabular_dim": len(m["spec"]["tabular_inputs"]),
            "window_period": int(m["window_period"]),
            "max_windows": int(self.hparams.max_windows),
            # width of win_calendar the models read: 0 without calendar time or with calendar off
            "calendar_dim": len(WINDOW_CALENDAR) if self.hparams.calendar and m["calendar"]["has_calendar"] else 0,
            # width of the activity features event batches carry (data_modules.activity)
            "activity_dim": activity_dim(len(m["spec"]["sources"])),
            # width of the teacher vectors token batches carry (0: no data.teacher_dir)
            "teacher_dim": self.teacher.dim if self.teacher is not None else 0,
        }

    # ---------------------------------------------------------------- loaders
    def rows(self, splits: list[str] | str) -> np.ndarray:
        """Rows of the input dataset whose users are in ``splits``."""
        splits = [splits] if isinstance(splits, str) else splits
        return np.flatnonzero(np.isin(self.input_split, [Split.code(s) for s in splits]))

    def _sample(self, split: Split, n: int | None, stream: int) -> np.ndarray:
        """Rows of the input dataset: a seeded sample of ``n`` of its users of ``split`` (all of them
        when ``n`` is None or not smaller), in input order. Drawn over those users ordered by
        prepared row, so inputs that hold the same users give the same users."""
        rows = np.flatnonzero(self.input_split == split)
        if n is None or n >= len(rows):
            return rows
        if n < 1:
            raise DataError(f"data: a sample of {n} users; give a positive number, or null for every user.")
        by_user = rows[np.argsort(self.input_row[rows], kind="stable")]
        pick = np.random.default_rng([int(self.hparams.sample_seed), stream]).choice(len(rows), int(n), replace=False)
        return np.sort(by_user[pick])

    def fit_rows(self) -> np.ndarray:
        """Rows of the input dataset that training reads: the ``fit_users`` sample of the training
        users (every training user without one); the same on every rank."""
        if self._fit_rows is None:
            self._fit_rows = self._sample(Split.TRAIN, self.hparams.fit_users, 0)
        return self._fit_rows

    def val_rows(self) -> np.ndarray:
        """Rows of the input dataset that validation reads: the ``val_users`` sample (or every
        validation user); the same on every rank."""
        if self._val_rows is None:
            self._val_rows = self._sample(Split.VAL, self.hparams.val_users, 1)
        return self._val_rows

    def prepared_rows(self, rows: np.ndarray) -> np.ndarray:
        """The prepared-table rows of these rows of the input dataset."""
        return self.input_row[np.asarray(rows, np.int64)]

    def data_files(self) -> list[str]:
        """The memory-mapped files this DataModule reads users from (the prepared shards, the input
        stage output's parts, the text embeddings): :func:`release_pages` hands their pages back."""
        files = data_files(self.table, self.input_table)
        return files + [str(self.prepared_dir / "text_emb.npy")]

    def predict_rows(self) -> np.ndarray:
        """Rows of the input dataset that ``predict`` covers (``predict_splits``), in the order it
        reads them (``predict_order``)."""
        rows = self.rows(self.hparams.predict_splits or [s.name.lower() for s in Split])
        if self.hparams.predict_order == "length":
            rows = rows[np.argsort(self.row_lengths(rows), kind="stable")]
        return rows if self.predict_subset is None else rows[self.predict_subset]

    def row_lengths(self, rows: np.ndarray) -> np.ndarray:
        """How much padding a user brings to a batch of this kind, to order ``predict`` by
        (``predict_order: length``): events, its kept windows then kept events; tokens, its token
        count; slices and representations, nothing (flat batches) — zeros."""
        rows = np.asarray(rows, np.int64)
        table = self.input_table.data
        if self.batch_kind == "events":
            windows = np.minimum(table.column("n_windows").to_numpy().astype(np.int64)[rows], self.hparams.max_windows)
            events = np.minimum(table.column("n_hist").to_numpy().astype(np.int64)[rows], self.hparams.max_events)
            return windows * (self.hparams.max_events + 1) + events
        if self.batch_kind == "tokens":
            return pc.list_value_length(table.column("token_ids")).to_numpy().astype(np.int64)[rows]
        return np.zeros(len(rows), np.int64)

    def collate(self):
        """The collate function of this DataModule's batch kind."""
        return BATCH_KINDS[self.batch_kind].collate(self)

    def _loader(self, rows: np.ndarray, shuffle: bool) -> DataLoader:
        sampler = EpochShuffleSampler(len(rows), self.hparams.split_seed) if shuffle else None
        users = UserRows(self.input_table, rows, self.data_files(),
                         **({"release_every": SHUFFLED_RELEASE_EVERY} if shuffle else {}))
        return DataLoader(users, batch_size=self.hparams.batch_size,
                          sampler=sampler,
                          collate_fn=self.collate(), num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def qa_pairs(self, split: str = "train"):
        """The query/answer pairs (``questions`` set; built once per split) of the training users
        (``fit_rows``), or of the validation users (``val_rows``) answered with the training
        users' bins (:func:`~data_modules.questions.build_pairs`)."""
        from data_modules.questions import build_pairs, questions_from_config

        if split not in self._pairs:
            q = self.hparams.questions
            texts = _open_shards(self.prepared_dir, ["texts.arrow"])["text"]
            self._pairs[split] = pairs = build_pairs(
                self.table.data.table, self.meta, list(texts), questions_from_config(None if q is True else q),
                rows=self.prepared_rows(self.fit_rows()),
                answer_rows=None if split == "train" else self.prepared_rows(self.val_rows()))
            for name, why in pairs.skipped.items():
                log.warning("question '%s' gives no %s pairs: %s", name, split, why)
        return self._pairs[split]

    def _pair_loader(self, split: str, shuffle: bool) -> DataLoader:
        """Batches of query/answer pairs with their users' prefix inputs (events, or token rows
        for Q-Anchor's token prefix); validation pairs in (question, user) order, so a batch
        mostly asks one question of many users."""
        from data_modules.questions import PairRows, QACollate

        pairs = self.qa_pairs(split)
        if self.batch_kind == "tokens":  # the users' token rows (Q-Anchor's token prefix)
            users, collate = PairRows(self.input_table, pairs, table_rows="row"), self.collate()
        else:
            users, collate = PairRows(self.table, pairs), BATCH_KINDS["events"].collate(self)
        sampler = EpochShuffleSampler(len(pairs), self.hparams.split_seed) if shuffle else None
        return DataLoader(users, batch_size=self.hparams.batch_size, sampler=sampler,
                          collate_fn=QACollate(collate, pairs), num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if self.hparams.questions:
            return self._pair_loader("train", shuffle=True)
        return self._loader(self.fit_rows(), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.hparams.questions:
            return self._pair_loader("val", shuffle=False)
        return self._loader(self.val_rows(), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.rows("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_rows(), shuffle=False)

    def state_dict(self) -> dict:
        return {"prepared_key": self.prepare_config().key()}
