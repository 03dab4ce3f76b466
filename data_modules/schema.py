"""The canonical schema every loader produces and every stage reads, and its validation.

Events (one row per event):
    user_id   int64    the user
    source    str      one of the declared sources
    timestamp int64    seconds since the epoch, >= 0, never NaN
    item_id   int64    optional; the item the event is about (-1 or null: none)
    text      str      optional; free text of the event (title, query, merchant ...)
    value     float    optional; amount, rating ...
    category  str|int  optional; a coarse class of the event (genre, merchant type ...)

Users (one row per user): ``user_id`` plus profile fields (the *tabular* source) and label
columns. Each non-id column is declared as an input or a label, never both, so that no label
leaks into an input.

Validation raises :class:`DataError` with one paragraph that names the file, the column and
the first offending rows. The CLI prints that paragraph and exits with status 2.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

EVENT_REQUIRED = ("user_id", "source", "timestamp")
EVENT_OPTIONAL = ("item_id", "text", "value", "category")
EVENT_COLUMNS = EVENT_REQUIRED + EVENT_OPTIONAL


class DataError(ValueError):
    """Bad input: the message is one paragraph that says what is wrong and where."""


def _rows(df: pd.DataFrame, mask, limit: int = 3) -> str:
    bad = df[np.asarray(mask)].head(limit)
    lines = bad.to_string(max_colwidth=40).splitlines()
    return " | ".join(line.strip() for line in lines)


@dataclass
class LabelSpec:
    """A label column of the users table.

    kind: ``binary`` (0/1), ``multiclass`` (0..num_classes-1) or ``multilabel`` (a list of
    0/1 of length num_classes, stored as one column of lists).
    """

    name: str
    kind: Literal["binary", "multiclass", "multilabel"]
    num_classes: int = 2
    class_names: list[str] | None = None


@dataclass
class DatasetSpec:
    """What a loaded data set holds: its sources, its user columns and their roles."""

    name: str
    sources: list[str]
    tabular_inputs: list[str] = field(default_factory=list)
    labels: list[LabelSpec] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)  # vocabulary of event categories
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DatasetSpec:
        d = dict(d)
        d["labels"] = [LabelSpec(**x) for x in d.get("labels", [])]
        return cls(**d)


def validate_events(df: pd.DataFrame, sources: list[str], where: str) -> pd.DataFrame:
    """Check an events table against the schema and return it with canonical dtypes.

    Missing optional columns are added (item_id -1, text "", value 0.0, category "").
    Raises DataError naming ``where`` (a file or a loader) for every kind of bad input.
    """
    if len(df) == 0:
        raise DataError(f"{where}: the events table is empty (0 rows); a data set needs events.")
    missing = [c for c in EVENT_REQUIRED if c not in df.columns]
    if missing:
        norm = {"".join(ch for ch in str(c).lower() if ch.isalnum()): c for c in df.columns}
        near = {m: [norm[n] for n in difflib.get_close_matches(m.replace("_", ""), list(norm), n=2, cutoff=0.75)]
                for m in missing}
        hint = "; ".join(f"'{m}' (did you mean {near[m]}?)" if near[m] else f"'{m}'" for m in missing)
        raise DataError(
            f"{where}: missing required event column(s) {hint}. Found columns {list(df.columns)}; "
            f"the events schema needs {list(EVENT_REQUIRED)} and may have {list(EVENT_OPTIONAL)}."
        )
    out = pd.DataFrame(index=df.index)
    for col in ("user_id", "timestamp"):
        s = df[col]
        if s.isna().any():
            raise DataError(
                f"{where}: column '{col}' has {int(s.isna().sum())} NaN/empty value(s); first bad rows: "
                f"{_rows(df, s.isna())}."
            )
        num = pd.to_numeric(s, errors="coerce")
        bad = num.isna() | (num != np.floor(num))
        if bad.any():
            raise DataError(
                f"{where}: column '{col}' must hold integers (int64) but {int(bad.sum())} value(s) are not; "
                f"first bad rows: {_rows(df, bad)}."
            )
        out[col] = num.astype(np.int64)
    neg = out["timestamp"] < 0
    if neg.any():
        raise DataError(
            f"{where}: column 'timestamp' has {int(neg.sum())} negative value(s) (seconds since the epoch "
            f"must be >= 0); first bad rows: {_rows(df, neg)}."
        )
    src = df["source"]
    if src.isna().any():
        raise DataError(f"{where}: column 'source' has empty values; first bad rows: {_rows(df, src.isna())}.")
    src = src.astype(str)
    unknown = ~src.isin(sources)
    if unknown.any():
        names = sorted(src[unknown].unique().tolist())[:5]
        raise DataError(
            f"{where}: column 'source' has {int(unknown.sum())} row(s) with unknown source(s) {names}; "
            f"declared sources are {sources}. First bad rows: {_rows(df, unknown)}."
        )
    out["source"] = src
    if "item_id" in df.columns:
        item = pd.to_numeric(df["item_id"], errors="coerce")
        bad = df["item_id"].notna() & (item.isna() | (item != np.floor(item)))
        if bad.any():
            raise DataError(
                f"{where}: column 'item_id' must hold integers (or be empty) but {int(bad.sum())} value(s) are "
                f"not; first bad rows: {_rows(df, bad)}."
            )
        out["item_id"] = item.fillna(-1).astype(np.int64)
    else:
        out["item_id"] = np.int64(-1)
    out["text"] = df["text"].fillna("").astype(str) if "text" in df.columns else ""
    if "value" in df.columns:
        val = pd.to_numeric(df["value"], errors="coerce")
        bad = df["value"].notna() & val.isna()
        if bad.any():
            raise DataError(
                f"{where}: column 'value' must hold numbers but {int(bad.sum())} value(s) are not; "
                f"first bad rows: {_rows(df, bad)}."
            )
        inf = np.isinf(val.fillna(0.0))
        if inf.any():
            raise DataError(f"{where}: column 'value' has infinite values; first bad rows: {_rows(df, inf)}.")
        out["value"] = val.fillna(0.0).astype(np.float32)
    else:
        out["value"] = np.float32(0.0)
    out["category"] = df["category"].fillna("").astype(str) if "category" in df.columns else ""
    return out.reset_index(drop=True)


def validate_users(
    df: pd.DataFrame, inputs: list[str], labels: list[LabelSpec], where: str
) -> pd.DataFrame:
    """Check a users table: ids unique, declared columns present, numeric inputs, no label as input."""
    if "user_id" not in df.columns:
        raise DataError(f"{where}: the users table has no 'user_id' column; found {list(df.columns)}.")
    label_names = [lab.name for lab in labels]
    both = sorted(set(inputs) & set(label_names))
    if both:
        raise DataError(
            f"{where}: column(s) {both} are declared both as tabular inputs and as labels; a label used as "
            f"an input leaks the answer. Remove them from the inputs."
        )
    missing = [c for c in list(inputs) + label_names if c not in df.columns]
    if missing:
        raise DataError(
            f"{where}: the users table lacks declared column(s) {missing}; found {list(df.columns)}."
        )
    uid = pd.to_numeric(df["user_id"], errors="coerce")
    bad = uid.isna() | (uid != np.floor(uid))
    if bad.any():
        raise DataError(f"{where}: column 'user_id' must hold integers; first bad rows: {_rows(df, bad)}.")
    dup = uid.duplicated(keep=False)
    if dup.any():
        raise DataError(
            f"{where}: {int(uid.duplicated().sum())} duplicate user row(s): each user must appear once. "
            f"First duplicated rows: {_rows(df, dup)}."
        )
    out = df.copy()
    out["user_id"] = uid.astype(np.int64)
    for c in inputs:
        num = pd.to_numeric(out[c], errors="coerce")
        bad = num.isna()
        if bad.any():
            raise DataError(
                f"{where}: tabular input column '{c}' must be numeric and not NaN; {int(bad.sum())} bad value(s); "
                f"first bad rows: {_rows(out, bad)}. Encode categorical fields as integers first."
            )
        out[c] = num.astype(np.float32)
    for lab in labels:
        if lab.kind == "multilabel":
            continue
        num = pd.to_numeric(out[lab.name], errors="coerce")
        bad = num.isna() | (num < 0) | (num >= lab.num_classes)
        if bad.any():
            raise DataError(
                f"{where}: label column '{lab.name}' ({lab.kind}, {lab.num_classes} classes) needs integers in "
                f"[0, {lab.num_classes - 1}]; {int(bad.sum())} bad value(s); first bad rows: {_rows(out, bad)}."
            )
        out[lab.name] = num.astype(np.int64)
    return out.reset_index(drop=True)
