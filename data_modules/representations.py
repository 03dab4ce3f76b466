"""Representation batches: one frozen vector per user, with what a probe predicts from it.

A *representation dataset* is any stage output with a per-user ``user_emb`` column (stage-1
features, stage-3 embeddings, Q-Anchor embeddings) or one written by :func:`write_representation`
(the bench's baselines' features, anything computed outside a stage). The DataModule reads it
through ``representation_dir`` (batch kind ``representations``); :class:`RepresentationCollate`
joins each user's row of the prepared table for the targets. The batch (data_modules/batch.py)::

    user_id    [B]      int64
    row        [B]      int64   the user's row in the prepared table
    split      [B]      int64   ``store.Split``
    user_emb   [B, D]   float32
    label/<name>              [B] int64      every binary / multiclass label of the data set
    label/future_categories   [B, C] float32 1 where category c occurs among the user's future
                                             events (data sets with categories)
    hist_item  [B, Eh]  int64   history items 1..num_items, 0 = padding (the ranking excludes them)
    fut_item   [B, Ef]  int64   future items, 0 = padding (relevant = future items not in the history)

:func:`probe_task` names the tasks a data set offers and their kind;
:class:`data_modules.arrays.ArrayRepresentations` hands the same batches from arrays in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from data_modules.batch import as_table, fixed, ragged, scalars
from data_modules.schema import DataError, DatasetSpec
from data_modules.store import atomic_dir, write_output_meta

FUTURE_CATEGORIES = "future_categories"
NEXT_ITEMS = "next_items"
REPRESENTATION_COLUMNS = ("user_id", "row", "split", "user_emb")


def probe_task(spec: DatasetSpec, num_items: int, task: str) -> tuple[str, int]:
    """``(kind, outputs)`` of a probe task: a binary label → ``("binary", 1)``, a multiclass one
    → ``("multiclass", C)``, ``future_categories`` → ``("multilabel", C)``, ``next_items`` →
    ``("next_items", num_items)``; an unknown name → a DataError listing the known ones."""
    tasks = {lab.name: (lab.kind, 1 if lab.kind == "binary" else lab.num_classes)
             for lab in spec.labels if lab.kind != "multilabel"}  # prepare stores no multilabel labels
    if spec.categories:
        tasks[FUTURE_CATEGORIES] = ("multilabel", len(spec.categories))
    if num_items:
        tasks[NEXT_ITEMS] = (NEXT_ITEMS, int(num_items))
    if task not in tasks:
        raise DataError(f"probe task {task!r}: the data set {spec.name!r} offers {sorted(tasks)}.")
    return tasks[task]


def _padded(table: pa.Table, name: str, keep, pad: int = 0) -> np.ndarray:
    """A list<int> column → [B, max len] int64, entries failing ``keep`` dropped, ``pad`` after."""
    off, values = ragged(table, name, np.int64)
    ok = keep(values)
    user = np.repeat(np.arange(len(off) - 1), np.diff(off))[ok]
    n = np.bincount(user, minlength=len(off) - 1)
    out = np.full((len(off) - 1, max(int(n.max(initial=0)), 1)), pad, np.int64)
    out[user, np.arange(len(user)) - np.concatenate([[0], np.cumsum(n)])[user]] = values[ok]
    return out


class RepresentationCollate:
    """Rows of a representation dataset → the representation batch (module docstring); the
    targets come from the prepared ``table`` at each user's ``row``."""

    def __init__(self, table, spec: DatasetSpec):
        self.spec = spec
        self.labels = [f"label/{lab.name}" for lab in spec.labels if lab.kind != "multilabel"]
        wanted = [*self.labels, "h_item", "f_item", *(["f_category"] if spec.categories else [])]
        self.table = table.select_columns([c for c in wanted if c in table.column_names]).with_format("arrow")

    def __call__(self, cols) -> dict:
        t = as_table(cols)
        rows = scalars(t, "row", np.int64)
        prep = self.table[rows.tolist()]
        out = {
            "user_id": torch.as_tensor(scalars(t, "user_id", np.int64)),
            "row": torch.as_tensor(rows),
            "split": torch.as_tensor(scalars(t, "split", np.int64)),
            "user_emb": torch.as_tensor(fixed(t, "user_emb", np.float32).reshape(len(rows), -1)),
            "hist_item": torch.as_tensor(_padded(prep, "h_item", lambda v: v > 0)),
            "fut_item": torch.as_tensor(_padded(prep, "f_item", lambda v: v > 0)),
        }
        for key in self.labels:
            if key in prep.column_names:
                out[key] = torch.as_tensor(scalars(prep, key, np.int64))
        if self.spec.categories:
            fut_cat = torch.as_tensor(_padded(prep, "f_category", lambda v: v >= 0, pad=-1))
            multi = torch.zeros(len(rows), len(self.spec.categories) + 1)  # column 0 takes the padding
            out[f"label/{FUTURE_CATEGORIES}"] = multi.scatter_(1, fut_cat + 1, 1.0)[:, 1:]
        return out


def write_representation(folder: str | Path, user_emb: np.ndarray, row: np.ndarray, split: np.ndarray,
                         user_id: np.ndarray, info: dict | None = None) -> Path:
    """Write per-user vectors as a representation dataset (the stage-output format: one Arrow
    part and ``meta.json``, written aside and renamed), for ``UserDataModule(representation_dir=...)``.

    Args:
        folder: the dataset folder (replaced whole).
        user_emb: ``[U, D]`` vectors.
        row, split, user_id: ``[U]`` each user's prepared-table row, split code and id.
        info: extra ``meta.json`` entries (``kind`` defaults to ``representations``).
    """
    user_emb = np.asarray(user_emb, np.float32)
    if user_emb.ndim != 2 or not (len(user_emb) == len(row) == len(split) == len(user_id)):
        raise DataError(f"{folder}: user_emb must be [U, D] with one row, split and user_id per user; got "
                        f"{user_emb.shape}, {len(row)}, {len(split)}, {len(user_id)}.")
    table = pa.table({
        "user_id": pa.array(np.asarray(user_id, np.int64)), "row": pa.array(np.asarray(row, np.int64)),
        "split": pa.array(np.asarray(split, np.int8)),
        "user_emb": pa.FixedSizeListArray.from_arrays(pa.array(user_emb.reshape(-1)), user_emb.shape[1]),
    })
    part = "part-rank000.arrow"
    with atomic_dir(folder) as tmp:
        with pa.OSFile(str(tmp / part), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        write_output_meta(tmp, {"kind": "representations", **(info or {}), "parts": [part], "world_size": 1,
                                "user_dim": int(user_emb.shape[1])})
    return Path(folder)

