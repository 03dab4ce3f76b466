"""A user's own data: Parquet or CSV files in the canonical schema (see data_modules/schema.py).

An events file (or several, concatenated) and an optional users file. The sources, the tabular
input columns and the label columns are declared in the config; the files are checked against
those declarations before anything is written. An integer timestamp column is in seconds unless
``timestamp_unit`` says otherwise (``ms``, ``us``, ``ns``); datetime columns need no unit.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from data_modules.schema import DataError, DatasetSpec, LabelSpec


def read_table(path: str | Path) -> pd.DataFrame:
    """Read one CSV or Parquet file; a missing, empty or unreadable file raises DataError."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file.")
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a file; give the path of a .csv, .tsv or .parquet file "
                        f"(several events files go in a list).")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty (0 bytes).")
    suffix = p.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(p)
        if suffix in (".csv", ".tsv", ".txt"):
            return pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",", keep_default_na=True)
    except Exception as err:  # pyarrow and pandas raise many parser errors: one clear message
        raise DataError(f"{p}: cannot be read as {suffix[1:].upper()} ({type(err).__name__}: {err}).") from err
    raise DataError(f"{p}: unsupported file type '{suffix}'; use .csv, .tsv or .parquet.")


def load_files(
    events: str | list[str],
    sources: list[str],
    users: str | None = None,
    tabular_inputs: list[str] = (),
    labels: list[dict] = (),
    categories: list[str] | None = None,
    name: str = "files",
) -> tuple[DatasetSpec, list[tuple[pd.DataFrame, str]], pd.DataFrame | None, str]:
    """Read the declared files. Returns the spec, (frame, path) per events file, users, users path.

    Labels are declared as ``{name, kind, num_classes, class_names}`` (see schema.LabelSpec).
    """
    if not sources:
        raise DataError("files loader: declare the event sources in the config (`sources: [...]`).")
    label_specs = []
    for lab in labels:
        try:
            label_specs.append(LabelSpec(**lab))
        except TypeError as err:
            raise DataError(f"files loader: bad label declaration {lab}: {err}; use name, kind, num_classes, "
                            f"class_names.") from err
    paths = [events] if isinstance(events, str) else list(events)
    frames = [(read_table(p), str(p)) for p in paths]
    users_df = read_table(users) if users else None
    if users_df is None and (tabular_inputs or label_specs):
        raise DataError("files loader: tabular inputs or labels are declared but no users file is given (`users:`).")
    if users_df is not None and len(users_df) == 0:
        raise DataError(f"{users}: the users table has no rows.")
    if categories is None:
        cats: set[str] = set()
        for df, _ in frames:
            if "category" in df.columns:
                cats.update(df["category"].dropna().astype(str).unique().tolist())
        categories = sorted(c for c in cats if c)
    spec = DatasetSpec(name=name, sources=list(sources), tabular_inputs=list(tabular_inputs),
                       labels=label_specs, categories=list(categories), description="user files")
    return spec, frames, users_df, str(users) if users else ""
