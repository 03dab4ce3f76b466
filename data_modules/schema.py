"""The canonical schema every loader produces and every stage reads, and its validation.

Events (one row per event):
    user_id   int64    the user
    source    str      one of the declared sources
    timestamp int64    seconds since the epoch, >= 0, never NaN; a datetime column (Parquet
                       timestamp, ISO-8601 strings) is converted; epochs in ms/us/ns are
                       refused unless their unit is declared (``timestamp_unit``)
    item_id   int64    optional; the item the event is about, >= 0 (null: none)
    text      str      optional; free text of the event (title, query, merchant ...)
    value     float    optional; amount, rating ...
    category  str|int  optional; a coarse class of the event (genre, merchant type ...)

Users (one row per user): ``user_id`` plus profile fields (the *tabular* source) and label
columns. Each non-id column is declared as an input or a label, never both, so that no label
leaks into an input. A label holds class indices, or class names when the label declares
``class_names``.

Validation raises :class:`DataError` with one paragraph that names the file, the column and
the first offending rows. The CLI prints that paragraph and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

EVENT_REQUIRED = ("user_id", "source", "timestamp")
EVENT_OPTIONAL = ("item_id", "text", "value", "category")
EVENT_COLUMNS = EVENT_REQUIRED + EVENT_OPTIONAL
LABEL_KINDS = ("binary", "multiclass", "multilabel")

TIMESTAMP_UNITS = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}  # the declarable ``timestamp_unit``s
MAX_SECONDS = 10**11  # about the year 5100: a larger "seconds" value is an epoch in a finer unit
MAX_ITEM_ID = 1 << 40  # item ids share one int64 key with the source in preparation
_INT64_LIMIT = 2.0**63


class DataError(ValueError):
    """Bad input: the message is one paragraph that says what is wrong and where."""


def _cell(v) -> str:
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _rows(df: pd.DataFrame, mask, limit: int = 3) -> str:
    """The first bad rows as ``row <n> (column=value, ...)``; ``n`` is the row's number in its file
    (the first data row is row 0) when the frame is a piece of a file."""
    bad = df[np.asarray(mask)].head(limit)
    return "; ".join(f"row {i} (" + ", ".join(f"{c}={_cell(v)}" for c, v in rec.items()) + ")"
                     for i, rec in zip(bad.index, bad.to_dict("records"), strict=True))


@dataclass
class LabelSpec:
    """A label column of the users table.

    kind: ``binary`` (0/1), ``multiclass`` (0..num_classes-1) or ``multilabel`` (a list of
    0/1 of length num_classes, stored as one column of lists).
    num_classes: at least 2; a binary label has 2. Default: the number of ``class_names``
    (2 for a binary label without names).
    class_names: the name of class i at position i; a label column holding these names (text)
    is mapped to the indices.
    """

    name: str
    kind: Literal["binary", "multiclass", "multilabel"]
    num_classes: int | None = None
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        what = f"label '{self.name}'"
        if self.kind not in LABEL_KINDS:
            raise DataError(f"{what}: unknown kind '{self.kind}'; a label is one of {list(LABEL_KINDS)}.")
        if self.class_names is not None:
            self.class_names = [str(c) for c in self.class_names]
            if len(set(self.class_names)) != len(self.class_names):
                raise DataError(f"{what}: class_names {self.class_names} repeat a name; each class needs its own.")
        if self.num_classes is None:
            if self.class_names is None and self.kind != "binary":
                raise DataError(f"{what} ({self.kind}): declare num_classes or class_names.")
            self.num_classes = len(self.class_names) if self.class_names is not None else 2
        self.num_classes = int(self.num_classes)
        if self.num_classes < 2:
            raise DataError(f"{what}: num_classes is {self.num_classes}, but a label needs at least 2 classes "
                            f"(a single class tells no user from another).")
        if self.kind == "binary" and self.num_classes != 2:
            raise DataError(f"{what}: a binary label has 2 classes, not {self.num_classes}; use kind multiclass.")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise DataError(f"{what}: {len(self.class_names)} class_names for num_classes {self.num_classes}.")


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


def codes_of(values: pd.Series, vocabulary: Sequence[str]) -> np.ndarray:
    """The index of each string of ``values`` in ``vocabulary`` (-1: not in it), int64: one
    factorisation of the column and a lookup of its few distinct values."""
    codes, uniques = pd.factorize(values)
    lut = np.append(pd.Index(list(vocabulary), dtype=object).get_indexer(pd.Index(uniques, dtype=object)), -1)
    return lut[codes].astype(np.int64)  # factorize gives -1 to missing values: the appended -1


def _int64(df: pd.DataFrame, col: str, where: str, nullable: bool = False, hint: str = "") -> np.ndarray:
    """Column ``col`` as int64 (nulls as -1 when ``nullable``); NaN, fractions and values beyond int64
    raise DataError."""
    s = df[col]
    null = s.isna()
    if null.any() and not nullable:
        raise DataError(f"{where}: column '{col}' has {int(null.sum())} NaN/empty value(s); first bad rows: "
                        f"{_rows(df, null)}.")
    num = pd.to_numeric(s, errors="coerce")
    bad = ~null & (num.isna() | (num != np.floor(num)))
    if bad.any():
        raise DataError(f"{where}: column '{col}' must hold integers (int64{', or be empty' if nullable else ''}) "
                        f"but {int(bad.sum())} value(s) are not; first bad rows: {_rows(df, bad)}.{hint}")
    huge = ~null & (num.abs() >= _INT64_LIMIT)
    if huge.any():
        raise DataError(f"{where}: column '{col}' has {int(huge.sum())} value(s) beyond the int64 range "
                        f"(|value| < 2**63 = 9.2e18), up to {num[huge].abs().max():.4g}; first bad rows: "
                        f"{_rows(df, huge)}.{hint}")
    return num.fillna(-1).astype(np.int64).to_numpy()


def _datetime_seconds(s: pd.Series) -> np.ndarray:
    if getattr(s.dt, "tz", None) is not None:
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    return s.dt.as_unit("s").astype(np.int64).to_numpy()  # floors fractions of a second


def _timestamps(df: pd.DataFrame, where: str, unit: str) -> np.ndarray:
    """The timestamp column as int64 seconds since the epoch (datetime columns converted)."""
    if unit not in TIMESTAMP_UNITS:
        raise DataError(f"{where}: unknown timestamp_unit '{unit}'; use one of {list(TIMESTAMP_UNITS)}.")
    s = df["timestamp"]
    if s.isna().any():
        raise DataError(f"{where}: column 'timestamp' has {int(s.isna().sum())} NaN/empty value(s); first bad rows: "
                        f"{_rows(df, s.isna())}.")
    is_date = True  # a date carries its own unit
    if pd.api.types.is_datetime64_any_dtype(s):
        secs = _datetime_seconds(s)
    elif not pd.api.types.is_numeric_dtype(s) and pd.to_numeric(s, errors="coerce").isna().all():
        dt = pd.to_datetime(s, format="ISO8601", utc=True, errors="coerce")  # no number at all: dates?
        if dt.isna().any():
            raise DataError(f"{where}: column 'timestamp' holds neither integers (seconds since the epoch) nor "
                            f"ISO-8601 dates; {int(dt.isna().sum())} value(s) are neither; first bad rows: "
                            f"{_rows(df, dt.isna())}.")
        secs = _datetime_seconds(dt)
    else:
        hint = (" A timestamp is an integer epoch (seconds, or ms/us/ns with `timestamp_unit`) or a date; "
                "nothing this large is a date in any of those units.")
        secs = _int64(df, "timestamp", where, hint=hint)
        is_date = False
    neg = secs < 0
    if neg.any():
        raise DataError(f"{where}: column 'timestamp' has {int(neg.sum())} negative value(s) (seconds since the "
                        f"epoch must be >= 0: no date before 1970-01-01); first bad rows: {_rows(df, neg)}.")
    if is_date:
        return secs
    if unit != "s":
        return secs // TIMESTAMP_UNITS[unit]
    far = secs >= MAX_SECONDS
    if far.any():
        top = int(secs.max())
        guess = next(u for u, f in TIMESTAMP_UNITS.items() if top // f < MAX_SECONDS)
        raise DataError(
            f"{where}: column 'timestamp' holds values up to {top}, which as seconds since the epoch lie after the "
            f"year 5000: they look like {guess} since the epoch. Declare the unit in the loader arguments "
            f"(`timestamp_unit: {guess}`) or divide the column by {TIMESTAMP_UNITS[guess]:_} to get seconds. "
            f"First such rows: {_rows(df, far)}."
        )
    return secs


def _strings(df: pd.DataFrame, col: str, where: str) -> pd.Series:
    """Column ``col`` as str ("" for null); a cell holding a list or array raises DataError."""
    s = df[col]
    if s.dtype == object and pd.api.types.infer_dtype(s, skipna=True) not in ("string", "empty"):
        nested = s.map(lambda v: isinstance(v, list | tuple | set | dict | np.ndarray))
        if nested.any():
            raise DataError(
                f"{where}: column '{col}' must hold one string per row, but {int(nested.sum())} row(s) hold a "
                f"list or array (a Parquet list column?); join each into one string, or give one event per "
                f"element. First bad rows: {_rows(df, nested)}."
            )
    return s.fillna("").astype(str)


def validate_events(df: pd.DataFrame, sources: list[str], where: str, timestamp_unit: str = "s") -> pd.DataFrame:
    """Check an events table against the schema and return it with canonical dtypes.

    Missing optional columns are added (item_id -1, text "", value 0.0, category ""); ``item_id``
    -1 means no item afterwards. ``timestamp_unit`` is the unit of an integer timestamp column.
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
    out["user_id"] = _int64(df, "user_id", where, hint=" Re-number the users (a dense index) before loading.")
    out["timestamp"] = _timestamps(df, where, timestamp_unit)
    src = df["source"]
    if src.isna().any():
        raise DataError(f"{where}: column 'source' has empty values; first bad rows: {_rows(df, src.isna())}.")
    src = _strings(df, "source", where)
    unknown = ~src.isin(sources)
    if unknown.any():
        names = sorted(src[unknown].unique().tolist())[:5]
        raise DataError(
            f"{where}: column 'source' has {int(unknown.sum())} row(s) with unknown source(s) {names}; "
            f"declared sources are {sources}. First bad rows: {_rows(df, unknown)}."
        )
    out["source"] = src
    if "item_id" in df.columns:
        item = _int64(df, "item_id", where, nullable=True)
        neg = df["item_id"].notna().to_numpy() & (item < 0)
        if neg.any():
            raise DataError(
                f"{where}: column 'item_id' has {int(neg.sum())} negative value(s); item ids are >= 0, and an "
                f"event without an item leaves the cell empty. First bad rows: {_rows(df, neg)}."
            )
        big = item >= MAX_ITEM_ID
        if big.any():
            raise DataError(f"{where}: column 'item_id' has values >= 2**40; re-number the items first. "
                            f"First bad rows: {_rows(df, big)}.")
        out["item_id"] = item
    else:
        out["item_id"] = np.int64(-1)
    out["text"] = _strings(df, "text", where) if "text" in df.columns else ""
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
    out["category"] = _strings(df, "category", where) if "category" in df.columns else ""
    return out.reset_index(drop=True)


def _label_indices(df: pd.DataFrame, lab: LabelSpec, where: str) -> np.ndarray:
    """A binary/multiclass label column as class indices; names are mapped through ``class_names``."""
    col = df[lab.name]
    num = pd.to_numeric(col, errors="coerce")
    textual = col.notna() & num.isna()
    if textual.any():
        if lab.class_names is None:
            examples = sorted(col[textual].astype(str).unique().tolist())[:5]
            raise DataError(
                f"{where}: label column '{lab.name}' holds names such as {examples}, but the label declares no "
                f"class_names; declare them (`class_names: [...]`, the i-th name is class i) or store the class "
                f"indices 0..{lab.num_classes - 1}. First such rows: {_rows(df, textual)}."
            )
        num = col.astype(str).map({n: i for i, n in enumerate(lab.class_names)}).where(col.notna())
        unknown = col.notna() & num.isna()
        if unknown.any():
            names = sorted(col[unknown].astype(str).unique().tolist())[:5]
            raise DataError(
                f"{where}: label column '{lab.name}' has {int(unknown.sum())} value(s) {names} outside its "
                f"class_names {lab.class_names}; first bad rows: {_rows(df, unknown)}."
            )
    bad = num.isna() | (num < 0) | (num >= lab.num_classes) | (num != np.floor(num))
    if bad.any():
        raise DataError(
            f"{where}: label column '{lab.name}' ({lab.kind}, {lab.num_classes} classes) needs integers in "
            f"[0, {lab.num_classes - 1}]{' or its class_names' if lab.class_names else ''}; {int(bad.sum())} bad "
            f"value(s) (empty counts as bad); first bad rows: {_rows(df, bad)}."
        )
    return num.astype(np.int64).to_numpy()


def validate_users(
    df: pd.DataFrame, inputs: list[str], labels: list[LabelSpec], where: str
) -> pd.DataFrame:
    """Check a users table: ids unique, declared columns present, numeric inputs, no label as input,
    labels as class indices."""
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
    uid = pd.Series(_int64(df, "user_id", where, hint=" Re-number the users (a dense index) before loading."),
                    index=df.index)
    dup = uid.duplicated(keep=False)
    if dup.any():
        raise DataError(
            f"{where}: {int(uid.duplicated().sum())} duplicate user row(s): each user must appear once. "
            f"First duplicated rows: {_rows(df, dup)}."
        )
    out = df.copy()
    out["user_id"] = uid
    for c in inputs:
        num = pd.to_numeric(out[c], errors="coerce")
        bad = num.isna() | np.isinf(num.fillna(0.0))
        if bad.any():
            raise DataError(
                f"{where}: tabular input column '{c}' must be numeric and finite (not NaN); {int(bad.sum())} bad "
                f"value(s); first bad rows: {_rows(out, bad)}. Encode categorical fields as integers first."
            )
        out[c] = num.astype(np.float32)
    for lab in labels:
        if lab.kind != "multilabel":
            out[lab.name] = _label_indices(out, lab, where)
    return out.reset_index(drop=True)


def check_label_classes(labels: Sequence[LabelSpec], counts: dict[str, np.ndarray], where: str) -> None:
    """Refuse a label that holds fewer than two classes over all users: no probe can learn from it."""
    for lab in labels:
        c = counts.get(lab.name)
        if c is None or (c > 0).sum() >= 2:
            continue
        only = int(np.argmax(c))
        name = f" ('{lab.class_names[only]}')" if lab.class_names else ""
        raise DataError(
            f"{where}: label column '{lab.name}' holds a single class: all {int(c.sum())} users are class "
            f"{only}{name}. A label needs at least two classes among the users; fix the column or drop the label."
        )
