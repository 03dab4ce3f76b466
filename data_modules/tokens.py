"""The token batch: rows of a tokens dataset (the tokenizer's predict output) → padded token
sequences for stage 3 (and for the Query-as-Anchor token prefix).

Every slice of a user contributes one token per level (global token ids; a -1 id, e.g. a level
the profile's quantiser does not have, is dropped). Windows are numbered 0.. from the user's
oldest kept window; the latest ``max_windows`` windows are kept; the profile slice (window key -1) is placed in
position 0, where every window sees it. B users, T = the most tokens of
a user in the batch, W = the most windows::

    user_id      [B]        int64
    row          [B]        int64   the user's row in the prepared table
    split        [B]        int64   0 train, 1 val, 2 test
    token_id     [B, T]     int64   global token id (-1 on padding)
    tok_level    [B, T]     int64   level of the token (0 on padding)
    tok_source   [B, T]     int64   source index of its slice (0 on padding)
    tok_window   [B, T]     int64   window position 0..W-1 (0 on padding)
    tok_mask     [B, T]     bool
    win_key      [B, W]     int64   the window's real key (calendar day/week or event-window
                                    index, as the prepared data assigned it)
    win_mask     [B, W]     bool
    fut_text_emb [B, d]     float32 future-summary embedding (zeros if none)
    has_fut_text [B]        bool    True only for training users
    teacher_emb  [B, Dt]    float32 the user's teacher vector, standardised (zeros if none;
                                    only with a teacher, ``data.teacher_dir``)
    has_teacher  [B]        bool    True for the training and validation users a fit reads
                                    (``fit_users`` / ``val_users`` samples) with one
    label/<name> [B]        int64
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from data_modules.schema import DataError
from data_modules.store import Split


def read_vectors(ds, column: str, positions: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """``[len(positions), D]`` float32: a fixed-size-list column of a ``datasets.Dataset`` at these
    rows, read a chunk at a time (never the whole column)."""
    positions = np.asarray(positions, np.int64)
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    if hasattr(ds, "_indices") and ds._indices is not None:  # a selected view: its rows in the underlying table
        positions = np.asarray(ds._indices.column(0).to_numpy(), np.int64)[positions]
    col = table.column(column)
    dim = col.type.list_size if hasattr(col.type, "list_size") else None
    parts = []
    for start in range(0, len(positions), chunk):
        taken = col.take(pa.array(positions[start:start + chunk]))
        flat = pa.concat_arrays([c.flatten() for c in taken.chunks]) if taken.num_chunks else pa.array([], pa.float32())
        if dim is None:  # a variable-size list column: every row must have the same length
            lengths = np.concatenate([np.diff(c.offsets.to_numpy()) for c in taken.chunks]) if taken.num_chunks else []
            dim = int(lengths[0]) if len(lengths) else 0
            if len(lengths) and (lengths != dim).any():
                raise DataError(f"{column}: rows of different lengths; expected one vector per row.")
        parts.append(flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim or 0))
    if not parts:
        return np.zeros((0, dim or 0), np.float32)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class TeacherVectors:
    """A teacher's (standardised) vectors of some users, looked up by prepared row.

    Args:
        rows: ``[K]`` the prepared rows that have a vector (sorted).
        vectors: ``[K, D]`` their vectors.
        n_rows: the prepared table's size.
    """

    def __init__(self, rows: np.ndarray, vectors: np.ndarray, n_rows: int):
        self.vectors = np.ascontiguousarray(vectors, np.float32)
        self.index = np.full(n_rows, -1, np.int64)  # prepared row → row of ``vectors``; -1: none
        self.index[np.asarray(rows, np.int64)] = np.arange(len(rows))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(``[B, D]`` the vectors of these prepared rows, zeros where none; ``[B]`` which have one)."""
        at = self.index[np.asarray(rows, np.int64)]
        present = at >= 0
        out = np.zeros((len(at), self.dim), np.float32)
        out[present] = self.vectors[at[present]]
        return out, present


def _window_positions(keys: np.ndarray, max_windows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slice window keys → (kept-slice mask, window position per kept slice, the kept
    windows' keys in order). A slice with key -1 (the profile, which belongs to no window) is
    kept at position 0, so every window sees it, and makes no window of its own."""
    timed = keys >= 0
    uniq = np.unique(keys[timed])
    first = max(0, len(uniq) - max_windows)
    pos = np.searchsorted(uniq, keys) - first
    keep = ~timed | (pos >= 0)
    return keep, np.where(timed, pos, 0)[keep], uniq[first:]


class TokenCollate:
    """Rows of a tokens dataset → the token batch above.

    Args:
        prepared: the prepared users table (``datasets.Dataset``), for each user's future-summary
            text and labels, looked up by the token row's ``row``.
        text_emb: the prepared text-embedding table [texts, d].
        label_names: the data set's label names.
        max_windows: most recent windows kept per user.
        teacher: (standardised vectors [rows, Dt], present [rows]) by prepared row, or None.
    """

    def __init__(self, prepared, text_emb: np.ndarray, label_names: list[str], max_windows: int,
                 teacher: TeacherVectors | None = None):
        self.label_cols = [f"label/{n}" for n in label_names if f"label/{n}" in prepared.column_names]
        self.prepared = prepared.select_columns(["fut_text", *self.label_cols])
        self.text_emb = text_emb
        self.max_windows = max_windows
        self.teacher = teacher

    def __call__(self, cols: dict) -> dict:
        if isinstance(cols, list):
            cols = {k: [c[k] for c in cols] for k in cols[0]}
        B = len(cols["user_id"])
        key_col = "slice_key" if "slice_key" in cols else "slice_window"
        seqs, keys = [], []
        for i in range(B):
            ids = np.asarray(cols["token_ids"][i], np.int64).reshape(len(cols[key_col][i]), -1)
            keep, pos, wkeys = _window_positions(np.asarray(cols[key_col][i], np.int64), self.max_windows)
            src = np.asarray(cols["slice_source"][i], np.int64)[keep]
            ids = ids[keep]
            level = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
            real = ids >= 0
            seqs.append((ids[real], level[real], np.repeat(src, ids.shape[1]).reshape(ids.shape)[real],
                         np.repeat(pos, ids.shape[1]).reshape(ids.shape)[real]))
            keys.append(wkeys)
        T = max((len(s[0]) for s in seqs), default=0) or 1
        W = max((len(k) for k in keys), default=0) or 1
        out = {name: np.full((B, T), fill, np.int64) for name, fill in
               (("token_id", -1), ("tok_level", 0), ("tok_source", 0), ("tok_window", 0))}
        tok_mask = np.zeros((B, T), bool)
        win_key = np.zeros((B, W), np.int64)
        win_mask = np.zeros((B, W), bool)
        for i, (s, k) in enumerate(zip(seqs, keys, strict=True)):
            n = len(s[0])
            for name, col in zip(("token_id", "tok_level", "tok_source", "tok_window"), s, strict=True):
                out[name][i, :n] = col
            tok_mask[i, :n] = True
            win_key[i, : len(k)] = k
            win_mask[i, : len(k)] = True
        rows = np.asarray(cols["row"], np.int64)
        split = np.asarray(cols["split"], np.int64)
        prep = self.prepared[rows.tolist()]
        fut = np.asarray(prep["fut_text"], np.int64)
        fut_emb = np.zeros((B, self.text_emb.shape[1]), np.float32)
        has = fut >= 0
        if has.any():
            fut_emb[has] = self.text_emb[fut[has]]
        batch = {
            "user_id": torch.as_tensor(np.asarray(cols["user_id"], np.int64)),
            "row": torch.as_tensor(rows),
            "split": torch.as_tensor(split),
            **{k: torch.as_tensor(v) for k, v in out.items()},
            "tok_mask": torch.as_tensor(tok_mask),
            "win_key": torch.as_tensor(win_key),
            "win_mask": torch.as_tensor(win_mask),
            "fut_text_emb": torch.as_tensor(fut_emb),
            # only training users' futures may reach a loss
            "has_fut_text": torch.as_tensor(has & (split == Split.TRAIN)),
        }
        if self.teacher is not None:
            emb, present = self.teacher(rows)
            batch["teacher_emb"] = torch.as_tensor(emb)
            # training users' vectors train; validation users' only score the validation loss
            # (the stage masks by split); a test user's never reaches a loss
            batch["has_teacher"] = torch.as_tensor(present & (split != Split.TEST))
        for c in self.label_cols:
            batch[c] = torch.as_tensor(np.asarray(prep[c], np.int64))
        return batch
