"""Out-of-core partitioning of raw rows by user: the first phase of preparation.

Each unit of a :class:`~data_modules.loaders.Source` is read piece by piece (record batches);
every piece is validated (:mod:`data_modules.schema`, naming the file and the row), put in the
canonical dtypes, given each row's ``seq`` (the unit's index in the high bits, the row number in
its file in the low ones: the order in which the rows were given, which breaks timestamp ties) and
the user's bucket, and handed to ``pyarrow.dataset.write_dataset``, which appends each bucket's rows
to that bucket's files. Memory is one piece, never a file; a bucket then holds every row of its
users, from every file, and is read back whole by :func:`read_bucket` (about
:data:`~data_modules.loaders.BUCKET_EVENTS` events).

A user's bucket is a hash of the user id and the bucket count only, so it depends neither on the
files nor on how many ranks do the work: the shards written from the buckets are the same whatever
the rank count.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from data_modules.loaders import Piece, Source, Unit
from data_modules.schema import DataError, DatasetSpec, codes_of, validate_events, validate_users

SEQ_ROW_BITS = 40  # a row number below 2**40 in its file; the unit's index above it
_BUCKET_SALT = 0xB0C4E7  # keeps the bucket hash apart from the split hash (prepare.user_split)
KINDS = ("events", "users")


GOLDEN64 = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment


def splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser of uint64 values: the hash behind the users' split, their bucket and
    the code tuples' collision count."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def user_bucket(user_ids: np.ndarray, buckets: int) -> np.ndarray:
    """The bucket (0..buckets-1) of each user id: a splitmix64 hash, independent of everything else."""
    with np.errstate(over="ignore"):
        z = splitmix64(np.asarray(user_ids).astype(np.uint64) + np.uint64(_BUCKET_SALT) * GOLDEN64)
    return (z % np.uint64(buckets)).astype(np.int32)


def _strings(values: pd.Series) -> pa.Array:
    """A string column as one Arrow array. pandas' Arrow-backed strings may come in several chunks
    (a CSV piece of a couple of hundred thousand rows does), and a record batch takes arrays, not
    chunked ones."""
    arr = pa.array(values, pa.string())
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def event_schema() -> pa.Schema:
    return pa.schema([("user_id", pa.int64()), ("source", pa.int8()), ("timestamp", pa.int64()),
                      ("item_id", pa.int64()), ("text", pa.string()), ("value", pa.float32()),
                      ("category", pa.string()), ("seq", pa.int64()), ("bucket", pa.int32())])


def users_schema(spec: DatasetSpec) -> pa.Schema:
    return pa.schema([("user_id", pa.int64()), *((c, pa.float32()) for c in spec.tabular_inputs),
                      *((lab.name, pa.int64()) for lab in spec.labels if lab.kind != "multilabel"),
                      ("seq", pa.int64()), ("bucket", pa.int32())])


def where_row(units: list[Unit], seq: int) -> str:
    """``<file> row <n>`` of a row's ``seq``."""
    return f"{units[int(seq) >> SEQ_ROW_BITS].where} row {int(seq) & ((1 << SEQ_ROW_BITS) - 1)}"


class Partitioner:
    """Validates and partitions the units of one source into ``folder/<kind>/<bucket>/`` files."""

    def __init__(self, source: Source, folder: Path, buckets: int):
        self.source = source
        self.spec = source.spec
        self.folder = Path(folder)
        self.buckets = int(buckets)

    # ------------------------------------------------------------------ one piece
    def _seq(self, k: int, frame: pd.DataFrame) -> np.ndarray:
        rows = np.asarray(frame.index, dtype=np.int64)
        return (np.int64(k) << np.int64(SEQ_ROW_BITS)) | rows

    def events_batch(self, k: int, unit: Unit, frame: pd.DataFrame, categories: set[str]) -> pa.RecordBatch:
        ev = validate_events(frame, self.spec.sources, unit.where, self.source.timestamp_unit)
        uid = ev["user_id"].to_numpy()
        cat = ev["category"]
        categories.update(str(c) for c in pd.unique(cat) if c)
        return pa.record_batch([
            pa.array(uid, pa.int64()),
            pa.array(codes_of(ev["source"], self.spec.sources).astype(np.int8)),
            pa.array(ev["timestamp"].to_numpy(), pa.int64()),
            pa.array(ev["item_id"].to_numpy(), pa.int64()),
            _strings(ev["text"]),
            pa.array(ev["value"].to_numpy(), pa.float32()),
            _strings(cat),
            pa.array(self._seq(k, frame), pa.int64()),
            pa.array(user_bucket(uid, self.buckets)),
        ], schema=event_schema())

    def users_batch(self, k: int, unit: Unit, frame: pd.DataFrame) -> pa.RecordBatch:
        where = unit.where if unit.kinds == ("users",) else self.source.users_where or unit.where
        if len(frame) == 0 and len(frame.columns):
            raise DataError(f"{where}: the users table has no rows.")
        us = validate_users(frame, self.spec.tabular_inputs, self.spec.labels, where)
        uid = us["user_id"].to_numpy()
        schema = users_schema(self.spec)
        cols = [pa.array(uid, pa.int64())]
        cols += [pa.array(us[c].to_numpy(np.float32)) for c in self.spec.tabular_inputs]
        cols += [pa.array(us[lab.name].to_numpy(np.int64)) for lab in self.spec.labels if lab.kind != "multilabel"]
        cols += [pa.array(self._seq(k, frame), pa.int64()), pa.array(user_bucket(uid, self.buckets))]
        return pa.record_batch(cols, schema=schema)

    # ------------------------------------------------------------------ one unit
    def unit(self, k: int) -> dict:
        """Partition unit ``k``; return its summary (rows per kind, categories seen)."""
        unit = self.source.units[k]
        pieces = _Peekable(self.source.read(unit))
        categories: set[str] = set()
        rows = dict.fromkeys(KINDS, 0)
        part = 0
        while pieces.has_next():
            kind = pieces.peek().kind

            def convert(frame: pd.DataFrame, kind=kind) -> pa.RecordBatch:
                batch = (self.events_batch(k, unit, frame, categories) if kind == "events"
                         else self.users_batch(k, unit, frame))
                rows[kind] += batch.num_rows
                return batch

            first = convert(next(pieces).frame)  # validated before the writer is set up for its schema

            def batches(kind=kind, first=first) -> Iterator[pa.RecordBatch]:
                yield first
                while pieces.has_next() and pieces.peek().kind == kind:
                    yield convert(next(pieces).frame)

            schema = event_schema() if kind == "events" else users_schema(self.spec)
            pads.write_dataset(
                pa.RecordBatchReader.from_batches(schema, batches()), str(self.folder / kind), format="arrow",
                partitioning=pads.partitioning(pa.schema([("bucket", pa.int32())])),
                basename_template=f"u{k:07d}-{part}-{{i}}.arrow", existing_data_behavior="overwrite_or_ignore",
                use_threads=False, max_partitions=self.buckets + 1)
            part += 1
        if unit.kinds == ("events",) and rows["events"] == 0 or unit.kinds == ("users",) and rows["users"] == 0:
            raise DataError(f"{unit.where}: the {unit.kinds[0]} table is empty (0 rows).")
        return {"rows": rows, "categories": sorted(categories)}


class _Peekable:
    def __init__(self, it: Iterator[Piece]):
        self.it = iter(it)
        self.head: list[Piece] = []

    def has_next(self) -> bool:
        if not self.head:
            try:
                self.head.append(next(self.it))
            except StopIteration:
                return False
        return True

    def peek(self) -> Piece:
        self.has_next()
        return self.head[0]

    def __iter__(self):
        return self

    def __next__(self) -> Piece:
        if not self.has_next():
            raise StopIteration
        return self.head.pop()


def bucket_bytes(folder: Path, buckets: int) -> list[int]:
    """Bytes each bucket holds over both kinds (to share the buckets out over ranks)."""
    out = [0] * buckets
    for kind in KINDS:
        for b in range(buckets):
            d = Path(folder) / kind / str(b)
            if d.exists():
                out[b] += sum(f.stat().st_size for f in d.iterdir())
    return out


def read_bucket(folder: Path, kind: str, b: int, schema: pa.Schema) -> pd.DataFrame | None:
    """Every row of bucket ``b`` of ``kind`` (None when it has none), in no particular order."""
    d = Path(folder) / kind / str(b)
    if not d.exists():
        return None
    files = sorted(str(f) for f in d.iterdir())
    table = pads.dataset(files, format="arrow", schema=schema.remove(schema.get_field_index("bucket"))).to_table()
    return table.to_pandas() if table.num_rows else None
