"""A user's own data: Parquet or CSV files in the canonical schema (see data_modules/schema.py).

``events`` (and ``users``) is a file, a folder (every ``.parquet``/``.pq``/``.csv``/``.tsv`` file in
it, sorted by name), a glob (``data/events-*.parquet``) or a list of any of those. One user's events
may be spread over every file: preparation partitions them by user out of core
(:mod:`data_modules.prepare`), so no file is ever read whole. A Parquet file is read in record
batches, split into units of whole row groups that different ranks can read; a CSV file in chunks
of rows. Each piece keeps the row numbers of its file, so a bad row is named by file and row.

The sources, the tabular input columns and the label columns are declared in the config; the
files are checked against those declarations before anything is written. An integer timestamp
column is in seconds unless ``timestamp_unit`` says otherwise (``ms``, ``us``, ``ns``); datetime
columns need no unit.
"""

from __future__ import annotations

import glob as globlib
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from data_modules.schema import DataError, DatasetSpec, LabelSpec

SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".txt")
FOLDER_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv")  # what a folder contributes (.txt files are left alone)
BATCH_ROWS = 262_144  # rows per record batch or CSV chunk: memory per piece, never per file
UNIT_ROWS = 4_000_000  # about this many rows of a Parquet file make one unit of work


def _is_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def expand_paths(spec: str | list[str], what: str) -> list[Path]:
    """The files named by ``spec``: a file, a folder, a glob or a list of these, in the order given
    (a folder's and a glob's files sorted by name), each once. Nothing found raises DataError."""
    items = [spec] if isinstance(spec, str | Path) else list(spec)
    if not items:
        raise DataError(f"files loader: `{what}` names no file; give a file, a folder, a glob or a list of them.")
    out: list[Path] = []
    for item in items:
        s = str(item)
        p = Path(s)
        if _is_glob(s) and not p.exists():
            found = sorted(Path(f) for f in globlib.glob(s) if Path(f).is_file())
            if not found:
                raise DataError(f"{s}: the pattern of `{what}` matches no file.")
        elif p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FOLDER_SUFFIXES)
            if not found:
                raise DataError(f"{p}: the folder given as `{what}` holds no .parquet, .csv or .tsv file.")
        elif not p.exists():
            raise DataError(f"{p}: no such file.")
        else:
            found = [p]
        out.extend(f for f in found if f not in out)
    return out


def _check_file(p: Path) -> str:
    """The file's kind (``parquet`` or ``csv``) after the checks every reader makes."""
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty (0 bytes).")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    raise DataError(f"{p}: unsupported file type '{suffix}'; use .csv, .tsv or .parquet.")


def _unreadable(p: Path, err: Exception) -> DataError:
    kind = p.suffix.lower()[1:].upper()
    return DataError(f"{p}: cannot be read as {kind} ({type(err).__name__}: {err}).")


def read_table(path: str | Path) -> pd.DataFrame:
    """Read one small CSV or Parquet file whole (new events to append); a missing, empty or
    unreadable file raises DataError. Preparation never reads a file whole: :func:`read_pieces`."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file.")
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a file; give the path of a .csv, .tsv or .parquet file.")
    kind = _check_file(p)
    try:
        if kind == "parquet":
            return pd.read_parquet(p)
        return pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",", keep_default_na=True)
    except Exception as err:  # pyarrow and pandas raise many parser errors: one clear message
        raise _unreadable(p, err) from err


def file_units(p: Path) -> list[tuple[int, int, int]]:
    """Units of work of one file: ``(first row group, stop row group, first row)`` for Parquet
    (runs of whole row groups of about :data:`UNIT_ROWS` rows), ``(0, 0, 0)`` (the whole file)
    for CSV."""
    if _check_file(p) != "parquet":
        return [(0, 0, 0)]
    import pyarrow.parquet as pq

    try:
        md = pq.ParquetFile(p).metadata
    except Exception as err:
        raise _unreadable(p, err) from err
    units, start, first_row, rows, row = [], 0, 0, 0, 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if rows and rows + n > UNIT_ROWS:
            units.append((start, g, first_row))
            start, first_row, rows = g, row, 0
        rows += n
        row += n
    units.append((start, md.num_row_groups, first_row))
    return units


def estimated_rows(p: Path) -> int:
    """Rows of a Parquet file (from its footer), or an estimate for CSV (bytes / 48)."""
    if _check_file(p) == "parquet":
        import pyarrow.parquet as pq

        try:
            return int(pq.ParquetFile(p).metadata.num_rows)
        except Exception as err:
            raise _unreadable(p, err) from err
    return max(1, p.stat().st_size // 48)


def read_pieces(p: Path, unit: tuple[int, int, int] | None = None, rows: int = BATCH_ROWS) -> Iterator[pd.DataFrame]:
    """The rows of one unit of ``p`` (:func:`file_units`; None: the whole file) as DataFrames of at
    most ``rows`` rows whose index is the row number in the file (0 = the first data row). A file
    with no rows yields one empty frame."""
    kind = _check_file(p)
    first_group, stop_group, first_row = unit or (0, -1, 0)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            f = pq.ParquetFile(p)
            groups = list(range(first_group, stop_group)) if stop_group >= 0 else None
            start = first_row
            any_rows = False
            for batch in f.iter_batches(batch_size=rows, row_groups=groups, use_threads=True):
                if batch.num_rows == 0:
                    continue
                df = batch.to_pandas()
                df.index = pd.RangeIndex(start, start + len(df))
                start += len(df)
                any_rows = True
                yield df
            if not any_rows and first_group == 0:
                yield f.schema_arrow.empty_table().to_pandas()
            return
        reader = pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",", keep_default_na=True,
                             chunksize=rows)
        with reader:
            empty = True
            for df in reader:
                if len(df):
                    empty = False
                    yield df
            if empty:
                yield pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",", nrows=0)
    except DataError:
        raise
    except Exception as err:  # pyarrow and pandas raise many parser errors: one clear message
        raise _unreadable(p, err) from err


def file_spec(
    sources: list[str],
    tabular_inputs: list[str] = (),
    labels: list[dict] = (),
    categories: list[str] | None = None,
    name: str = "files",
    has_users: bool = False,
) -> DatasetSpec:
    """The spec of a user's files from the config's declarations (``categories`` None: found in
    the data while it is partitioned). Labels are declared as ``{name, kind, num_classes,
    class_names}`` (see schema.LabelSpec)."""
    if not sources:
        raise DataError("files loader: declare the event sources in the config (`sources: [...]`).")
    label_specs = []
    for lab in labels:
        try:
            label_specs.append(LabelSpec(**lab))
        except TypeError as err:
            raise DataError(f"files loader: bad label declaration {lab}: {err}; use name, kind, num_classes, "
                            f"class_names.") from err
    if not has_users and (tabular_inputs or label_specs):
        raise DataError("files loader: tabular inputs or labels are declared but no users file is given (`users:`).")
    return DatasetSpec(name=name, sources=list(sources), tabular_inputs=list(tabular_inputs), labels=label_specs,
                       categories=list(categories or []), description="user files")
