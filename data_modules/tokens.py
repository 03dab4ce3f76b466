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

from data_modules.batch import as_table, ragged, scalars
from data_modules.schema import DataError
from data_modules.store import Split


def read_vectors(ds, column: str, positions: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """``[len(positions), D]`` float32: a list column of a ``datasets.Dataset`` as a stage output is
    read (:func:`~data_modules.store.read_stage_output`: its table's rows are its rows) at these rows,
    read a chunk at a time (never the whole column)."""
    positions = np.asarray(positions, np.int64)
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
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


def window_positions(user: np.ndarray, keys: np.ndarray, n_users: int, max_windows: int):
    """Per slice of several users (``user [N]``, window ``keys [N]``) → (kept-slice mask [N],
    window position of each kept slice, ``[n_users, W]`` the kept windows' keys in order (0 after),
    ``[n_users]`` how many). A user keeps its latest ``max_windows`` windows; a slice with key -1 (the
    profile, which belongs to no window) is kept at position 0, so every window sees it, and makes
    no window of its own."""
    timed = keys >= 0
    pairs = np.unique(np.stack([user[timed], keys[timed]], axis=1), axis=0) if timed.any() \
        else np.zeros((0, 2), np.int64)
    counts = np.bincount(pairs[:, 0], minlength=n_users)  # windows per user
    first = np.maximum(counts - max_windows, 0)
    starts = np.concatenate([[0], np.cumsum(counts)])
    rank = np.arange(len(pairs)) - starts[pairs[:, 0]]  # a window's number within its user
    # each timed slice's window number: its (user, key) pair's rank
    code = pairs[:, 0] * (int(keys.max(initial=0)) + 1) + pairs[:, 1]
    at = np.searchsorted(code, user[timed] * (int(keys.max(initial=0)) + 1) + keys[timed])
    pos = np.zeros(len(keys), np.int64)
    pos[timed] = rank[at] - first[user[timed]]
    keep = ~timed | (pos >= 0)
    n_kept = counts - first
    W = max(int(n_kept.max(initial=0)), 1)
    win_key = np.zeros((n_users, W), np.int64)
    win_mask = np.arange(W)[None, :] < n_kept[:, None]
    sel = rank >= first[pairs[:, 0]]
    win_key[pairs[sel, 0], rank[sel] - first[pairs[sel, 0]]] = pairs[sel, 1]
    return keep, pos[keep], win_key, win_mask


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
        self.prepared = prepared.select_columns(["fut_text", *self.label_cols]).with_format("arrow")
        self.text_emb = text_emb
        self.max_windows = max_windows
        self.teacher = teacher

    def __call__(self, cols) -> dict:
        t = as_table(cols)
        B = t.num_rows
        key_col = "slice_key" if "slice_key" in t.column_names else "slice_window"
        off, keys = ragged(t, key_col, np.int64)
        ids = ragged(t, "token_ids", np.int64)[1]
        ids = ids.reshape(len(keys), -1)
        src = ragged(t, "slice_source", np.int64)[1]
        user = np.repeat(np.arange(B), np.diff(off))
        keep, pos, win_key, win_mask = window_positions(user, keys, B, self.max_windows)
        ids, src, user = ids[keep], src[keep], user[keep]
        levels = ids.shape[1]
        real = ids >= 0  # a token per (kept slice, level), in slice then level order; -1 ids dropped
        tok_user = np.repeat(user, levels)[real.reshape(-1)]
        n_tok = np.bincount(tok_user, minlength=B)
        T = max(int(n_tok.max(initial=0)), 1)
        at = np.arange(len(tok_user)) - np.concatenate([[0], np.cumsum(n_tok)])[tok_user]
        out = {name: np.full((B, T), fill, np.int64) for name, fill in
               (("token_id", -1), ("tok_level", 0), ("tok_source", 0), ("tok_window", 0))}
        out["token_id"][tok_user, at] = ids[real]
        out["tok_level"][tok_user, at] = np.broadcast_to(np.arange(levels), ids.shape)[real]
        out["tok_source"][tok_user, at] = np.repeat(src, levels).reshape(ids.shape)[real]
        out["tok_window"][tok_user, at] = np.repeat(pos, levels).reshape(ids.shape)[real]
        tok_mask = np.arange(T)[None, :] < n_tok[:, None]
        rows = scalars(t, "row", np.int64)
        split = scalars(t, "split", np.int64)
        prep = self.prepared[rows.tolist()]
        fut = scalars(prep, "fut_text", np.int64)
        fut_emb = np.zeros((B, self.text_emb.shape[1]), np.float32)
        has = fut >= 0
        if has.any():
            fut_emb[has] = self.text_emb[fut[has]]
        batch = {
            "user_id": torch.as_tensor(scalars(t, "user_id", np.int64)),
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
            batch[c] = torch.as_tensor(scalars(prep, c, np.int64))
        return batch
