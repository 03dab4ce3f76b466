"""The Lightning side of what foundv2 writes: stage outputs and checkpoints. The formats
themselves (complete marker, reader, checksum records) are :mod:`data_modules.store`.

- Stage outputs: a stage's ``predict_step`` returns a dict of per-user columns (lists or arrays of
  equal length); :class:`ArrowPredictionWriter` appends them, gathered into record batches of a
  few thousand users, to one Arrow stream per rank in a staging folder beside the output
  (``<output>.tmp-predict``). Once every rank is
  done, rank 0 writes ``meta.json`` (what the stage and the data were, and exactly the parts this
  run wrote) and swaps the staging folder in place of the output: a re-predict that crashes leaves
  the old dataset whole, and a part no meta lists is never read. A reader opens the listed parts
  memory-mapped through ``datasets``.
- Checkpoints: :class:`ChecksumCheckpointIO` writes each checkpoint aside, records its checksum
  beside it (``<ckpt>.checksum``) and renames it into place; every load verifies it first
  (:func:`verify_checkpoint`), so a truncated or bit-flipped checkpoint is a one-paragraph error
  naming the file and the fix, never a traceback or silently wrong weights. A checkpoint without
  its record (written elsewhere) is read with torch's weights-only loader, never unpickled, and
  checked for NaN/inf before anything loads it; it is used only when the user allows it
  (``--allow_no_checksum``, :data:`data_modules.store.ALLOW_NO_CHECKSUM_FLAG`).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter

from data_modules.schema import DataError
from data_modules.store import (
    ALLOW_NO_CHECKSUM_HOW,
    TMP_MARK,
    check_finite,
    check_replaceable,
    no_checksum_allowed,
    remove_dead_tmp,
    replace_dir,
    sidecar,
    tmp_name,
    verify_sidecar,
    write_output_meta,
    write_sidecar,
)

#: the staging folder a predict writes beside its output before the swap
STAGING = f"{TMP_MARK}predict"


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
    """Streams ``predict_step`` outputs of every rank into one Arrow file each, in a staging
    folder that replaces the output whole once complete (see the module docstring).

    Batches are gathered into record batches of at least ``rows_per_batch`` users before they are
    written: every record batch costs a reader of the part its message header, a page (and the
    kernel's fault-around, 64 KB) touched when the part is opened, and metadata kept while it is
    open. At 64 users a batch, opening a million users' stage-1 features touched ~1 GB.

    Args:
        output_dir: the folder of the dataset (features, tokens, embeddings).
        meta: what to record in ``meta.json`` beside the parts (rank 0 writes it last).
        rows_per_batch: users per record batch written (the last one may hold fewer).
    """

    def __init__(self, output_dir: str, meta: dict | None = None, rows_per_batch: int = 2048):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.meta = dict(meta or {})
        self.rows_per_batch = int(rows_per_batch)
        self._writer = None
        self._sink = None
        self._rows = 0
        self._pending: list[pa.Table] = []

    @property
    def staging(self) -> Path:
        return self.output_dir.with_name(self.output_dir.name + STAGING)

    @staticmethod
    def part(rank: int) -> str:
        return f"part-rank{rank:03d}.arrow"

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        check_replaceable(self.output_dir)  # never swap away a folder that is not a stage output
        if trainer.is_global_zero:  # a staging folder left by a killed predict is stale
            shutil.rmtree(self.staging, ignore_errors=True)
            # and so is what else it left beside the output (a report being written, an old output
            # moved aside before its removal): ``<output>...tmp-<pid>-<id>`` of a dead pid
            remove_dead_tmp(self.output_dir.parent, prefix=self.output_dir.name)
            self.staging.mkdir(parents=True)
        trainer.strategy.barrier("arrow-writer-staging")
        self.staging.mkdir(parents=True, exist_ok=True)
        self._writer, self._sink, self._rows, self._pending = None, None, 0, []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        table = pa.table({k: _to_arrow(v) for k, v in prediction.items()})
        if self._writer is None:  # the part is begun aside at the first batch (its schema)
            self._sink = pa.OSFile(str(self.staging / f"{self.part(trainer.global_rank)}.tmp"), "wb")
            self._writer = pa.ipc.new_stream(self._sink, table.schema)
        self._pending.append(table)
        if sum(t.num_rows for t in self._pending) >= self.rows_per_batch:
            self._flush()

    def _flush(self) -> None:
        """Write the gathered batches as one record batch."""
        if not self._pending:
            return
        table = pa.concat_tables(self._pending).combine_chunks()
        self._pending = []
        self._writer.write_table(table)
        self._rows += table.num_rows

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            os.replace(self.staging / f"{self.part(rank)}.tmp", self.staging / self.part(rank))
        trainer.strategy.barrier("arrow-writer")
        if trainer.is_global_zero:
            parts = [self.part(r) for r in range(trainer.world_size) if (self.staging / self.part(r)).exists()]
            meta = {**self.meta, **getattr(pl_module, "output_meta", lambda: {})(), "parts": parts,
                    "world_size": trainer.world_size}
            write_output_meta(self.staging, meta)
            if hasattr(pl_module, "finish_output"):  # PredictStage: files beside the parts (a report), before the swap
                pl_module.finish_output(self.staging)
            replace_dir(self.staging, self.output_dir)
        trainer.strategy.barrier("arrow-writer-meta")


# ------------------------------------------------------------------------------ checkpoints
def _local(path) -> bool:
    return "://" not in str(path)


_VERIFIED: dict[str, tuple] = {}  # resolved path -> its and its record's (inode, size, mtime_ns) when it passed


def _identity(path: Path) -> tuple:
    def stat(p: Path) -> tuple[int, int, int] | None:
        try:
            st = p.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns
    return stat(path), stat(sidecar(path)), stat(sidecar(path.resolve()))


def read_checkpoint_safely(path: str | Path, fix: str) -> dict:
    """A checkpoint's contents through torch's weights-only loader (tensors memory-mapped, not
    read): it never runs code a pickle names. A file that loader refuses (a pickle asking for
    ``posix.system``, any class not a tensor or plain value) or cannot read is a DataError."""
    import torch

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        names = re.findall(r"GLOBAL ([\w.]+)", str(err))
        asks = f" (it asks for {names[0]})" if names else ""
        raise DataError(f"{path}: the checkpoint holds more than tensors and plain values{asks}, which only "
                        f"unpickling it, that is running the code it names, could read; foundv2 reads checkpoints "
                        f"with torch's weights-only loader and will not run it (a foundv2 fit never writes such a "
                        f"checkpoint); {fix}.") from None
    except Exception as err:  # noqa: BLE001 - torch fails in many ways on a damaged file
        raise DataError(f"{path}: the checkpoint cannot be read ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); {fix}.") from None
    if not isinstance(ckpt, dict):
        raise DataError(f"{path}: not a Lightning checkpoint (it holds a {type(ckpt).__name__}, not a dict with a "
                        f"state_dict); {fix}.")
    return ckpt


def _check_bare(path: Path, fix: str) -> None:
    """A checkpoint without a checksum record: readable by the weights-only loader, a Lightning
    checkpoint (a ``state_dict``), finite weights; then used only when the user allows it."""
    state = read_checkpoint_safely(path, fix).get("state_dict")
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a Lightning checkpoint (no state_dict); {fix}.")
    check_finite(state, path, "checkpoint")
    if not no_checksum_allowed():
        raise DataError(f"{path}: the checkpoint has no checksum record beside it ({path.name}.checksum), so it "
                        f"cannot be checked against what a fit wrote (written by another tool or an older foundv2, "
                        f"or copied without it). To use it as it is, {ALLOW_NO_CHECKSUM_HOW}; else {fix}.")


def verify_checkpoint(path: str | Path, fix: str) -> None:
    """Raise DataError unless ``path`` is a whole checkpoint, checked before Lightning or torch
    unpickles it: a torch zip whose bytes match the checksum recorded beside it when it was
    written. One without a record (written elsewhere) must read with torch's weights-only loader,
    hold finite weights, and be allowed by the user (``--allow_no_checksum``). ``fix``: what the
    reader should do, for the message.

    A file that passed in this process and has not changed since (same inode, size and mtime) is
    not checked again (nor its record changed): the pipeline checks a checkpoint before the
    trainer's load checks it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file; {fix}.")
    key = str(path.resolve())
    if _VERIFIED.get(key) == _identity(path):
        return
    recorded = verify_sidecar(path, "checkpoint", fix)
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a readable checkpoint (truncated or corrupt: not a torch zip file); {fix}.")
    if not recorded:
        _check_bare(path, fix)
    _VERIFIED[key] = _identity(path)


class ChecksumCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose checkpoints are written aside and renamed, carry a checksum
    record beside them, and are verified before every load (remote paths: as Lightning does)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if not _local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        tmp = tmp_name(path)
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            write_sidecar(path, record_of=tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        if not _local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        fix = "delete it (or pass another --ckpt_path), or train again"
        verify_checkpoint(path, fix)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:  # noqa: BLE001 - torch fails in many ways on a damaged file
            raise DataError(f"{path}: the checkpoint cannot be read ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); {fix}.") from None

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        if _local(path):
            sidecar(path).unlink(missing_ok=True)


def install_checksums(trainer) -> None:
    """Give ``trainer`` the :class:`ChecksumCheckpointIO` unless its strategy brings its own
    checkpoint format (FSDP, DeepSpeed, a user plugin)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = ChecksumCheckpointIO()
