"""The batch contract: what :class:`UserDataModule` hands each stage.

Batch kinds, all dicts of tensors, user-level (a user's windows stay together); the
DataModule picks one in ``setup`` from ``datamodule.BATCH_KINDS`` (kind → dataset, collate):

**Event batch** (kind ``events``, ``EventCollate``; stage 1 and the pooled extractor read it). B users,
E = the most history events of a user in the batch (after the ``max_events`` cap, which keeps
the *latest* events), W = the most windows, d = text-embedding width, F = tabular width::

    user_id      [B]        int64
    row          [B]        int64   the user's row in the prepared table
    split        [B]        int64   ``store.Split``: 0 train, 1 val, 2 test
    ev_source    [B, E]     int64   source index into DatasetSpec.sources (0 on padding)
    ev_item      [B, E]     int64   global item index, 1..num_items; 0 = no item / padding
    ev_text      [B, E]     int64   row of the text table; -1 = no text / padding
    ev_text_emb  [B, E, d]  float32 the text embedding of that row (zeros where none)
    ev_value     [B, E]     float32
    ev_time      [B, E]     int64   seconds
    ev_category  [B, E]     int64   index into DatasetSpec.categories; -1 = none
    ev_window    [B, E]     int64   window ordinal 0..n_windows-1 (0 on padding)
    ev_mask      [B, E]     bool    True on real events
    win_key      [B, W]     int64   calendar key of each window (day or week number, or the
                                    event-chunk number); windows k apart in key are periodic
                                    partners when k is the data set's ``window_period``
    win_mask     [B, W]     bool
    ref_day      [B]        int64   the data set's reference day (days since the epoch: the first
                                    day of the training users' history), the same for every user
    win_day      [B, W]     int64   each window's first day, days since ``ref_day`` (0 on padding)
    win_calendar [B, W, 2]  float32 absolute time per window (``prepare.window_calendar``): its
                                    position in the data set's calendar and the user's tenure at
                                    it, in units of the calendar span; zeros on padding and where
                                    the data has no calendar time. Models read it when
                                    ``UserDataModule.dims()['calendar_dim']`` is 2
    tabular      [B, F]     float32 standardised profile inputs (F may be 0)
    fut_item     [B, Ef]    int64   future items (0 = padding); used by probes, never by stages
    fut_text_emb [B, d]     float32 embedding of the templated future summary (zeros if none)
    has_fut_text [B]        bool    True only for *training* users: no val/test future leaks
    label/<name> [B] int64, or [B, C] float32 for multilabel

**Slice batch** (kind ``slices``, ``SliceCollate``, from ``features_dir``; the tokenizer reads
it): N = all (user, window, source) slices of the B users in the batch, flattened, D = feature
width::

    user_id      [B]  int64
    row          [B]  int64
    split        [B]  int64
    slice_user   [N]  int64   row in the batch of the slice's user
    slice_window [N]  int64   window number from the user's oldest kept window
    slice_source [N]  int64   source index (the profile source, if any, is the last index)
    slice_key    [N]  int64   the window key the prepared data assigned (``win_key`` of that
                              window); -1 for the profile slice
    feat         [N, D] float32

Every stage output (features, tokens) keeps ``user_id, row, split`` per user and
``slice_window, slice_source, slice_key`` per slice, so the next stage's batches carry them on.

The collates read the users' rows as one Arrow table (:func:`as_table`) and build every padded
array from a column's flat values and offsets at once (:func:`ragged`, :func:`pad_rows`): no
Python loop over users, no Python object per event.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


# ------------------------------------------------------------------------------ reading rows
def as_table(cols) -> pa.Table:
    """The rows a collate is given, as one ``pyarrow.Table``: a table (``UserRows``), a dict of
    per-user columns (lists, arrays), or a list of either (a DataLoader that fetches one item at a
    time)."""
    if isinstance(cols, pa.Table):
        return cols
    if isinstance(cols, list):
        if cols and isinstance(cols[0], pa.Table):
            return pa.concat_tables(cols)
        cols = {k: [v for c in cols for v in c[k]] for k in cols[0]} if cols else {}
    return pa.table({k: to_arrow(v) for k, v in cols.items()})


def to_arrow(values) -> pa.Array:
    """One column of per-user values as Arrow: Arrow as it is; a ``[B, D]`` array → fixed-size
    lists; a list of ``[n_i, D]`` arrays → lists of fixed-size lists; a list of 1-d arrays →
    lists; anything else as ``pyarrow.array`` reads it."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    if isinstance(values, list) and values and all(isinstance(v, np.ndarray) for v in values):
        offsets = pa.array(np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32))
        flat = np.concatenate([v.reshape(len(v), -1) if v.ndim == 2 else v for v in values])
        inner = pa.array(flat.reshape(-1)) if flat.ndim == 1 else \
            pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        return pa.ListArray.from_arrays(offsets, inner)
    return pa.array(values)


def scalars(table: pa.Table, name: str, dtype) -> np.ndarray:
    """One value per row of a column, as ``dtype``."""
    return table.column(name).to_numpy().astype(dtype)


def ragged(table: pa.Table, name: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A list column as ``(offsets [B + 1] int64, values [n, ...] dtype)``: row i's entries are
    ``values[offsets[i]:offsets[i + 1]]``; a list of fixed-size lists (``feat``, ``codes``) gives
    ``values [n, D]``; a list of variable lists of equal length (a dict's nested Python lists) too."""
    arr = _array(table, name)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.flatten()
    offsets = offsets - offsets[0]
    if pa.types.is_fixed_size_list(values.type):
        width = values.type.list_size
        flat = values.flatten().to_numpy(zero_copy_only=False)
        return offsets, flat.astype(dtype).reshape(-1, width)
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        inner = np.diff(values.offsets.to_numpy())
        width = int(inner[0]) if len(inner) else 0
        if len(inner) and (inner != width).any():
            raise ValueError(f"column {name}: inner lists of different lengths")
        flat = values.flatten().to_numpy(zero_copy_only=False)
        return offsets, flat.astype(dtype).reshape(-1, width)
    return offsets, values.to_numpy(zero_copy_only=False).astype(dtype)


def fixed(table: pa.Table, name: str, dtype) -> np.ndarray:
    """A column of one equal-length list per row (``tabular``, ``user_emb``) as ``[B, D]``."""
    arr = _array(table, name)
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(arr), arr.type.list_size)
    offsets, values = ragged(table, name, dtype)
    return values.reshape(len(offsets) - 1, -1)


def _array(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    if col.num_chunks == 1:
        return col.chunk(0)
    return col.combine_chunks() if col.num_chunks else pa.array([], col.type)


def pad_rows(offsets: np.ndarray, values: np.ndarray, start: np.ndarray | None = None,
             length: np.ndarray | None = None, pad=0, dtype=None, width: int | None = None) -> np.ndarray:
    """Row i's entries ``values[offsets[i] + start[i] : ... + length[i]]`` (all of them by default),
    left-aligned in ``[B, width]`` (``width``: the longest, at least 1), ``pad`` after."""
    n = len(offsets) - 1
    start = np.zeros(n, np.int64) if start is None else start
    length = np.diff(offsets) if length is None else length
    width = max(int(length.max(initial=0)), 1) if width is None else width
    out = np.full((n, width) + values.shape[1:], pad, dtype=dtype or values.dtype)
    pos = np.arange(width)[None, :]
    mask = pos < length[:, None]
    out[mask] = values[((offsets[:-1] + start)[:, None] + pos)[mask]]
    return out
