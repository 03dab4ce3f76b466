"""The Lightning side of stage outputs: one Arrow stream file per rank, written aside and renamed
into place. The format itself (complete marker, reader) is :mod:`data_modules.store`.

A stage's ``predict_step`` returns a dict of per-user columns (lists or arrays of equal length);
:class:`ArrowPredictionWriter` appends them batch by batch to ``part-rank{r}.arrow.tmp`` and, at
the end of the epoch, renames it to ``part-rank{r}.arrow``. Rank 0 then writes ``meta.json``
(what the stage and the data were), which marks the folder as complete. A reader opens every part
memory-mapped through ``datasets``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
from lightning.pytorch.callbacks import BasePredictionWriter

from data_modules.store import META_FILE, atomic_write_json


def _to_arrow(values) -> pa.Array:
    if isinstance(values, pa.Array):
        return values
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    if isinstance(values, list) and values and isinstance(values[0], np.ndarray) and values[0].ndim == 2:
        # ragged list of [n_i, D] matrices → list<fixed_size_list<D>>
        d = values[0].shape[1]
        flat = np.concatenate([v.reshape(-1) for v in values]) if values else np.zeros(0)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat), d)
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), inner)
    if isinstance(values, list) and values and isinstance(values[0], np.ndarray):
        flat = np.concatenate(values) if values else np.zeros(0)
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return pa.array(values)


class ArrowPredictionWriter(BasePredictionWriter):
    """Streams ``predict_step`` outputs of this rank into one Arrow file, atomically.

    Args:
        output_dir: the folder of the dataset (features, tokens, embeddings).
        meta: what to record in ``meta.json`` beside the parts (rank 0 writes it last).
    """

    def __init__(self, output_dir: str, meta: dict | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.meta = dict(meta or {})
        self._writer = None
        self._sink = None
        self._rows = 0

    def _tmp(self, rank: int) -> Path:
        return self.output_dir / f"part-rank{rank:03d}.arrow.tmp"

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            (self.output_dir / META_FILE).unlink(missing_ok=True)  # incomplete until rewritten
        for old in self.output_dir.glob(f"part-rank{trainer.global_rank:03d}.arrow*"):
            old.unlink()
        self._writer, self._sink, self._rows = None, None, 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        table = pa.table({k: _to_arrow(v) for k, v in prediction.items()})
        if self._writer is None:
            self._sink = pa.OSFile(str(self._tmp(trainer.global_rank)), "wb")
            self._writer = pa.ipc.new_stream(self._sink, table.schema)
        self._writer.write_table(table)
        self._rows += table.num_rows

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            os.replace(self._tmp(rank), self.output_dir / f"part-rank{rank:03d}.arrow")
        trainer.strategy.barrier("arrow-writer")
        if trainer.is_global_zero:
            parts = sorted(p.name for p in self.output_dir.glob("part-rank*.arrow"))
            meta = {**self.meta, **getattr(pl_module, "output_meta", lambda: {})(), "parts": parts,
                    "world_size": trainer.world_size}
            atomic_write_json(self.output_dir / META_FILE, meta, default=str)
        trainer.strategy.barrier("arrow-writer-meta")
