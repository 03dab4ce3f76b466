"""The bench's users: which users it reads, and their data read a batch at a time.

The bench reads three groups of users of the prepared table: a seeded sample of the train users
(``probe_users``: what every probe and every fitted baseline learns from), a seeded sample of the
validation users (``val_users``: what chooses C, weight decay, λ, k and early stopping) and every
test user (what every metric is computed on). The two samples are read once and held
(:attr:`BenchUsers.fit`); the test users are read, featurised and scored ``batch_users`` at a
time (:meth:`BenchUsers.test_batches`), so no step holds every user's data at once. With samples
at least as large as their splits (every data set up to ~25,000 users at the defaults) the bench
reads every user, as a bench over all users in memory does.

Files are read through :class:`ArrowRows`: one Arrow file (a prepared shard, a stage output's
part) is memory-mapped at a time, the rows needed are copied out, and the file is unmapped, so
the pages read never pile up in the process's memory whatever the data set's size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from data_modules.schema import DataError
from data_modules.store import Split

#: columns of the prepared table the bench's own features and targets read
USER_COLUMNS = ("h_item", "f_item", "f_category", "h_source", "h_time", "h_value")


def sample_rows(split: np.ndarray, part: int, n: int | None, seed: int, stream: int) -> np.ndarray:
    """The rows of ``split == part``: a seeded sample of ``n`` of them (all when ``n`` is None or
    not smaller), sorted. The draw depends only on ``(seed, stream)`` and the split, so the same
    settings read the same users on every run."""
    rows = np.flatnonzero(split == part)
    if n is None or n >= len(rows):
        return rows
    if n < 1:
        raise DataError(f"bench: a sample of {n} users; give a positive number, or null for every user.")
    pick = np.random.default_rng([int(seed), int(stream)]).choice(len(rows), int(n), replace=False)
    return np.sort(rows[pick])


def _read_table(path: Path) -> tuple[pa.MemoryMappedFile, pa.Table]:
    """A memory-mapped Arrow file (IPC stream, else IPC file) as a zero-copy table."""
    src = pa.memory_map(str(path))
    try:
        try:
            return src, pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            src.seek(0)
            return src, pa.ipc.open_file(src).read_all()
    except Exception:
        src.close()
        raise


class ArrowRows:
    """Rows of a list of Arrow files, read by prepared row a batch at a time.

    Args:
        files: the files, in order.
        row_column: None when the files' rows are the prepared rows in order (the prepared
            shards); else the column that holds each row's prepared row (a stage output).
        n_rows: the prepared table's size (with ``row_column``).
        what: how errors name the data.
    """

    def __init__(self, files: Sequence[Path], row_column: str | None = None, n_rows: int | None = None,
                 what: str = "data"):
        self.files = [Path(f) for f in files]
        self.what = what
        self.schema: pa.Schema | None = None
        sizes = []
        where = None
        if row_column is not None:
            where = np.full(int(n_rows), -1, np.int64)  # prepared row → global position in the files
        offset = 0
        for f in self.files:
            src, table = _read_table(f)
            try:
                self.schema = self.schema or table.schema
                sizes.append(table.num_rows)
                if where is not None:
                    rows = np.asarray(table.column(row_column).to_numpy(), np.int64)
                    if len(rows) and (rows.min() < 0 or rows.max() >= len(where)):
                        raise DataError(f"{what}: rows outside the prepared table's {len(where)} users; was it made "
                                        f"from other data?")
                    where[rows] = offset + np.arange(len(rows))
            finally:
                del table
                src.close()
            offset += sizes[-1]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.where = where

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names) if self.schema is not None else []

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Each prepared row's position in the files (-1: not there)."""
        rows = np.asarray(rows, np.int64)
        return rows if self.where is None else self.where[rows]

    def read(self, rows: np.ndarray, columns: Sequence[str] | None = None) -> tuple[pa.Table, np.ndarray]:
        """``(table, found)``: ``columns`` (default: all) of the prepared ``rows`` that the files
        hold, in the order of ``rows``, and the bool mask of the rows found."""
        pos = self.positions(rows)
        found = pos >= 0
        take = pos[found]
        order = np.argsort(take, kind="stable")
        sorted_pos = take[order]
        file_of = np.searchsorted(self.starts, sorted_pos, side="right") - 1
        parts = []
        for f in np.unique(file_of):
            local = sorted_pos[file_of == f] - self.starts[f]
            src, table = _read_table(self.files[f])
            try:
                if columns is not None:
                    missing = [c for c in columns if c not in table.column_names]
                    if missing:
                        raise DataError(f"{self.what}: no column(s) {missing} in {self.files[f]}; columns are "
                                        f"{table.column_names}.")
                    table = table.select(list(columns))
                parts.append(table.take(pa.array(local)))
            finally:
                del table
                src.close()
        if not parts:
            empty = self.schema.empty_table()
            return (empty if columns is None else empty.select(list(columns))), found
        out = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return out.take(pa.array(inverse)), found


def prepared_rows_reader(dm) -> ArrowRows:
    """The prepared table's shards of a set-up UserDataModule."""
    return ArrowRows([Path(dm.prepared_dir) / s for s in dm.meta["shards"]], what=str(dm.prepared_dir))


def ragged(column: pa.ChunkedArray | pa.Array, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A list column → ``(flat values, per-row lengths)``."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = np.asarray(pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype), lengths


def item_matrix(column, n_rows: int, n_items: int) -> tuple[sp.csr_matrix, list[np.ndarray]]:
    """A list column of 1-based item ids (0: none) → ``([n_rows, n_items]`` CSR of counts, the
    0-based ids of each row in order)."""
    flat, lengths = ragged(column, np.int64)
    row = np.repeat(np.arange(n_rows), lengths)
    keep = flat > 0
    ids = flat[keep] - 1
    m = sp.csr_matrix((np.ones(ids.size), (row[keep], ids)), shape=(n_rows, n_items))
    per_row = np.bincount(row[keep], minlength=n_rows)
    return m, np.split(ids, np.cumsum(per_row)[:-1]) if n_rows else []


@dataclass
class UserBatch:
    """Some users' data, indexed by their position in ``rows`` (prepared rows)."""

    rows: np.ndarray
    split: np.ndarray
    history: sp.csr_matrix  # [n, I] history item counts
    future: sp.csr_matrix  # [n, I] 0/1 future items
    sequences: list[np.ndarray]  # per user: history item ids (0-based) in time order
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # task → [n] classes or [n, C] 0/1
    sources: list[np.ndarray] = field(default_factory=list)  # per user: history event sources
    times: list[np.ndarray] = field(default_factory=list)  # ... timestamps (s)
    values: list[np.ndarray] = field(default_factory=list)  # ... values (NaN: none)

    def __len__(self) -> int:
        return len(self.rows)

    def part(self, code: int) -> np.ndarray:
        """Positions of the users of one split."""
        return np.flatnonzero(self.split == code)


@dataclass
class Task:
    """A task of the bench and what its labels are read from: a label column, or (multi-label)
    the future categories; ``y``: every user's labels when they are held in memory."""

    name: str
    kind: str  # binary | multiclass | multilabel | ranking
    column: str | None = None  # label/<name>; None: future categories (multilabel) or none (ranking)
    y: np.ndarray | None = None


def _labels(table: pa.Table, tasks: Sequence[Task], n_categories: int) -> dict[str, np.ndarray]:
    n = table.num_rows
    labels = {}
    for t in tasks:
        if t.column:
            labels[t.name] = np.asarray(table.column(t.column).to_numpy(), np.int64)
        elif t.kind == "multilabel":
            cat, lengths = ragged(table.column("f_category"), np.int64)
            fut = np.zeros((n, n_categories), np.int64)
            owner = np.repeat(np.arange(n), lengths)
            ok = cat >= 0
            fut[owner[ok], cat[ok]] = 1
            labels[t.name] = fut
    return labels


def _label_columns(tasks: Sequence[Task]) -> list[str]:
    return [t.column for t in tasks if t.column] + (["f_category"] if any(t.kind == "multilabel" for t in tasks)
                                                      else [])


def read_users(reader: ArrowRows, rows: np.ndarray, split: np.ndarray, n_items: int, n_categories: int,
               tasks: Sequence[Task], items_only: bool = False) -> UserBatch:
    """One :class:`UserBatch` of the prepared ``rows`` (any order); ``items_only``: the history
    item matrix alone (no future, sequences, labels or events)."""
    rows = np.asarray(rows, np.int64)
    n = len(rows)
    if items_only:
        table, _ = reader.read(rows, ["h_item"])
        history, _ = item_matrix(table.column("h_item"), n, n_items)
        return UserBatch(rows, np.asarray(split, np.int64)[rows], history, sp.csr_matrix((n, n_items)), [])
    table, _ = reader.read(rows, list(dict.fromkeys([*USER_COLUMNS, *_label_columns(tasks)])))
    history, sequences = item_matrix(table.column("h_item"), n, n_items)
    future, _ = item_matrix(table.column("f_item"), n, n_items)
    future.data[:] = 1.0
    labels = _labels(table, tasks, n_categories)
    cuts = None
    per_user = {}
    for name, col, dtype in (("sources", "h_source", np.int64), ("times", "h_time", np.int64),
                             ("values", "h_value", np.float64)):
        flat, lengths = ragged(table.column(col), dtype)
        cuts = np.cumsum(lengths)[:-1] if cuts is None else cuts
        per_user[name] = np.split(flat, cuts) if n else []
    return UserBatch(rows, np.asarray(split, np.int64)[rows], history, future, sequences, labels, **per_user)


class BenchUsers:
    """The users the bench reads (module docstring) and their data.

    Args:
        dm: a set-up UserDataModule (its split and prepared shards).
        tasks: what labels to read.
        probe_users, val_users: the sizes of the train and validation samples (None: all).
        sample_seed: the samples' seed.
        batch_users: test users read at a time.
    """

    def __init__(self, dm, tasks: Sequence[Task], probe_users: int | None = None, val_users: int | None = None,
                 sample_seed: int = 0, batch_users: int = 4096):
        if batch_users < 1:
            raise DataError(f"bench.batch_users must be at least 1, got {batch_users}.")
        self.split = np.asarray(dm.split, np.int64)
        self.n_items = int(dm.meta["num_items"])
        self.n_categories = len(dm.spec.categories)
        self.tasks = list(tasks)
        self.reader = prepared_rows_reader(dm)
        self.batch_users = int(batch_users)
        self.train = sample_rows(self.split, Split.TRAIN, probe_users, sample_seed, 0)
        self.val = sample_rows(self.split, Split.VAL, val_users, sample_seed, 1)
        self.test = np.flatnonzero(self.split == Split.TEST)
        self._fit: UserBatch | None = None

    def read(self, rows: np.ndarray) -> UserBatch:
        return read_users(self.reader, rows, self.split, self.n_items, self.n_categories, self.tasks)

    @property
    def fit(self) -> UserBatch:
        """The train and validation samples, read once (prepared-row order)."""
        if self._fit is None:
            self._fit = self.read(np.union1d(self.train, self.val))
        return self._fit

    def test_batches(self, items_only: bool = False) -> Iterator[UserBatch]:
        """Every test user, ``batch_users`` at a time, in prepared-row order (``items_only``: the
        history item matrix alone, :func:`read_users`)."""
        for start in range(0, len(self.test), self.batch_users):
            rows = self.test[start:start + self.batch_users]
            yield read_users(self.reader, rows, self.split, self.n_items, self.n_categories, self.tasks, items_only)

    def test_labels(self, tasks: Sequence[Task]) -> dict[str, np.ndarray]:
        """Every test user's labels of ``tasks`` (the label columns alone, a batch at a time)."""
        cols = _label_columns(tasks)
        if not cols:
            return {}
        parts = []
        for start in range(0, len(self.test), self.batch_users):
            table, _ = self.reader.read(self.test[start:start + self.batch_users], cols)
            parts.append(_labels(table, tasks, self.n_categories))
        return {t.name: np.concatenate([p[t.name] for p in parts]) for t in tasks if parts}

    def column(self, name: str) -> np.ndarray:
        """One scalar column of every user (a label), read a file at a time."""
        table, _ = self.reader.read(np.arange(len(self.split)), [name])
        return np.asarray(table.column(name).to_numpy(), np.int64)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per split: the users it has and the users the bench reads."""
        read = {Split.TRAIN: len(self.train), Split.VAL: len(self.val), Split.TEST: len(self.test)}
        return {s.name.lower(): {"users": int((self.split == s).sum()), "read": int(read[s])} for s in Split}
