"""The base of every stage that writes a dataset with ``predict``: :class:`PredictStage`.

What each stage would otherwise repeat lives here once:

- **run settings**: ``predict_dir`` (and a stage's own output folders) are kept out of the
  hyperparameters (:meth:`PredictStage.save_settings`): LightningCLI re-applies a checkpoint's
  hyperparameters over the command line, so ``predict --ckpt_path X --model.predict_dir Y`` would
  otherwise write to the folder stored in X.
- **nets built late**: Lightning's ``configure_model`` hook builds the nets from the data's sizes
  (:meth:`PredictStage.data_dims`, by default ``UserDataModule.dims()``); the sizes are saved in
  the checkpoint, so ``Stage.load_from_checkpoint(path)`` rebuilds the nets with no DataModule.
- **checkpoints**: every trainer of a stage writes them with their checksum record and verifies
  each one it loads (:class:`~foundv2.io.ChecksumCheckpointIO`), as does
  :meth:`PredictStage.load_from_checkpoint`.
- **the output**: ``predict_dir`` set → an :class:`~foundv2.io.ArrowPredictionWriter` streams the
  per-user columns of ``predict_step`` (:func:`split_by_user` makes them from flat slices) and
  rank 0 writes ``meta.json`` from :meth:`PredictStage.output_meta`: always ``kind``, ``stage``,
  ``dims`` and ``hparams``, plus what the stage adds in :meth:`PredictStage.output_info`.
- **one optimiser**: :func:`adamw` (AdamW, optional linear warm-up, optional cosine decay to a
  floor; weight decay only on matrices), configured from the stage's ``optim``
  (:class:`OptimConfig`, ``--model.optim.*``).

A stage writes only what is its own: ``OUTPUT_KIND`` and ``STAGE``, ``__init__`` (calling
``super().__init__(predict_dir)`` and ``self.save_settings()``), ``build_nets(dims)``, its steps
and ``output_info``.
"""

from __future__ import annotations

import inspect
import math
import os
import typing
from dataclasses import dataclass
from typing import ClassVar, Literal

import lightning as L
import numpy as np
import torch
from torch import nn

from data_modules.schema import DataError
from foundv2.io import ArrowPredictionWriter, install_checksums, verify_checkpoint
from foundv2.options import Options, check_choices

DIMS_KEY = "foundv2_dims"  # where a checkpoint keeps the sizes the nets were built for
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


# ------------------------------------------------------------------------------ predict columns
def with_window_keys(out: dict, batch: dict, num_sources: int) -> dict:
    """Add ``slice_key [N]`` to flat slices of an event batch: the window key the prepared data
    gave each slice's window (the batch's ``win_key``: calendar day or week number, or the
    event-window number), -1 for profile slices (source index ``num_sources``), which belong to
    no window."""
    key = batch["win_key"][out["slice_user"], out["slice_window"]]
    return {**out, "slice_key": torch.where(out["slice_source"] < num_sources, key, -1)}


def user_columns(batch: dict) -> dict:
    """The columns every stage output has per user: ``user_id``, ``row`` (in the prepared table)
    and ``split``; a stage adds its own (``user_emb`` ...) beside them."""
    return {"user_id": batch["user_id"].cpu().numpy(), "row": batch["row"].cpu().numpy(),
            "split": batch["split"].cpu().numpy().astype(np.int8)}


def split_by_user(out: dict, batch: dict, per_slice: tuple = (("feat", np.float32),)) -> dict:
    """Flat slices of a batch → per-user columns for the Arrow writer.

    :func:`user_columns` and, per slice, its ``slice_window`` (number from the user's oldest
    kept window), ``slice_source`` and ``slice_key`` (the prepared data's window key,
    :func:`with_window_keys`); ``per_slice`` names the stage's own slice columns and their dtype.
    """
    counts = torch.bincount(out["slice_user"], minlength=batch["user_id"].shape[0]).tolist()
    cols = user_columns(batch)
    for key, dtype in (("slice_window", np.int32), ("slice_source", np.int8), ("slice_key", np.int64), *per_slice):
        values = out[key].detach().cpu()
        cols[key] = [a.numpy().astype(dtype) for a in torch.split(values.float() if dtype == np.float32 else values,
                                                                 counts)]
    return cols


# ------------------------------------------------------------------------------ optimiser
def item_lists(table, rows: np.ndarray, column: str) -> list[np.ndarray]:
    """0-based item ids of ``column`` (``h_item`` / ``f_item``) for the prepared ``rows``, in time
    order, events without an item dropped."""
    part = table.select(rows.tolist()).with_format("numpy", columns=[column])[column]
    return [np.asarray(v, np.int64)[np.asarray(v) > 0] - 1 for v in part]


def train_item_lists(datamodule) -> list[np.ndarray]:
    """The history item ids (:func:`item_lists` of ``h_item``) of the users training reads
    (``UserDataModule.fit_rows``: the ``fit_users`` sample of the training users, all of them
    without one): what collaborative item factors are fitted on (never a validation or test user)."""
    return item_lists(datamodule.table, datamodule.prepared_rows(datamodule.fit_rows()), "h_item")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only (nanoGPT), none on biases, norms and
    every other 1-D parameter, nor on embedding tables (minGPT): an embedding row only gets a
    gradient when its id occurs, so decoupled decay would shrink rare items' rows, and the
    null/padding row, on every step whether they are used or not. Frozen parameters are left out."""
    decay, no_decay, seen = [], [], set()
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            plain = p.ndim < 2 or name == "bias" or isinstance(mod, (*NORMS, nn.Embedding, nn.EmbeddingBag))
            (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, cosine: bool = False,
              min_lr_ratio: float = 0.1) -> float:
    """The learning rate at ``step`` relative to the peak: linear warm-up over ``warmup_steps``,
    then constant, or (``cosine``) a half cosine down to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    t = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def adamw(module: nn.Module, total_steps: int, lr: float = 1e-3, weight_decay: float = 0.0,
          warmup_steps: int = 0, cosine: bool = False, min_lr_ratio: float = 0.1, fused: bool = False):
    """AdamW over :func:`param_groups`, with the :func:`lr_factor` schedule stepped every optimiser
    step when there is one; the return value is what ``configure_optimizers`` returns. ``fused``:
    torch's one-kernel update (7x faster on CPU for a 27M-parameter probe head; the same update up
    to float rounding)."""
    opt = torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, **({"fused": True} if fused else {}))
    if not warmup_steps and not cosine:
        return opt
    total = max(int(total_steps), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, total, warmup_steps, cosine, min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@dataclass(frozen=True)
class OptimConfig(Options):
    """The optimiser of a trained stage (its ``--model.optim.*`` options): AdamW over
    :func:`param_groups`, the :func:`lr_factor` schedule."""

    GROUP: ClassVar[str] = "optim"

    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay, on matrices only (:func:`param_groups`)."""
    warmup_steps: int = 0
    """Linear warm-up steps (0 = none)."""
    cosine: bool = False
    """Cosine decay to ``min_lr_ratio * lr`` over the run's optimiser steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, relative to ``lr``."""


# ------------------------------------------------------------------------------ the base
class PredictStage(L.LightningModule):
    """Base of the stages that write a dataset with ``predict`` (see the module docstring).

    Args:
        predict_dir: where ``predict`` writes the stage's dataset (one Arrow part per rank).
    """

    OUTPUT_KIND: ClassVar[str] = ""  # meta.json "kind": features, tokens, embeddings ...
    STAGE: ClassVar[str] = ""  # meta.json "stage"

    def __init__(self, predict_dir: str | None = None):
        super().__init__()
        self.predict_dir = predict_dir
        self.dims: dict | None = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint`` after the checks every other load makes: a local
        checkpoint must be whole (a torch zip whose bytes match the checksum recorded beside it),
        else a :class:`DataError` naming it."""
        if isinstance(checkpoint_path, (str, os.PathLike)) and "://" not in str(checkpoint_path):
            verify_checkpoint(checkpoint_path, "pass a whole checkpoint (e.g. the run's last.ckpt), or train again")
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def save_settings(self, *run_settings: str) -> None:
        """``save_hyperparameters`` of the calling ``__init__`` without ``predict_dir`` and the
        other ``run_settings`` (output folders: run settings, not model settings); a mode given in
        Python that is not among its ``Literal``'s choices is refused here, as the CLI refuses it."""
        self.save_hyperparameters(ignore=["predict_dir", *run_settings], frame=inspect.currentframe().f_back)
        check_choices(type(self).__name__, typing.get_type_hints(type(self).__init__), self.hparams)

    # ------------------------------------------------------------------ nets
    def data_dims(self, datamodule) -> dict | None:
        """The sizes the nets are built for, from the DataModule (saved in checkpoints); None when
        this run's data cannot give them and the checkpoint must (``on_load_checkpoint`` builds)."""
        return datamodule.dims()

    def build_nets(self, dims: dict) -> None:
        """Create the stage's modules for ``dims`` (called once)."""
        raise NotImplementedError

    def build(self, dims: dict) -> None:
        """Build the nets for ``dims`` once; later calls do nothing."""
        if self.dims is None:
            self.build_nets(dims)
            self.dims = dict(dims)

    def configure_model(self) -> None:
        # load_from_checkpoint calls this hook with no trainer: on_load_checkpoint builds instead
        if self.dims is not None or self._trainer is None:
            return
        dm = self.trainer.datamodule
        if dm is None:
            raise DataError(f"{type(self).__name__} builds its nets from the data's sizes: give the trainer a "
                            f"datamodule, or load the stage with {type(self).__name__}.load_from_checkpoint(path).")
        dims = self.data_dims(dm)
        if dims is not None:  # else the checkpoint's sizes build the nets; _check_built refuses a run without one
            self.build(dims)

    def _check_built(self) -> None:
        if self.dims is None:
            raise DataError(f"{type(self).__name__}: this run's data cannot size the nets (e.g. a fit-only input "
                            f"is not given), so they come from a checkpoint: give --ckpt_path.")

    def on_predict_start(self) -> None:
        self._check_built()

    def on_validation_start(self) -> None:
        self._check_built()

    def on_test_start(self) -> None:
        self._check_built()

    def checkpoint_dims(self) -> dict:
        """What a checkpoint stores to rebuild the nets (by default the data's sizes)."""
        return dict(self.dims or {})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[DIMS_KEY] = self.checkpoint_dims()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(DIMS_KEY)
        if not saved:
            if self.dims is None:
                raise DataError(f"this checkpoint holds no {DIMS_KEY} (written by an older foundv2): load it through "
                                f"the trainer with a DataModule (--ckpt_path), or train the stage again.")
            return
        if self.dims is None:
            self.build(saved)
            return
        differ = sorted(k for k in self.dims if k in saved and saved[k] != self.dims[k])
        if differ:
            raise DataError(f"the checkpoint's {type(self).__name__} was built for other data: "
                            + "; ".join(f"{k} {saved[k]!r} there, {self.dims[k]!r} here" for k in differ)
                            + ". Use the data config it was trained with.")

    # ------------------------------------------------------------------ output
    def configure_callbacks(self):
        # any trainer of a stage (the CLI's, or one made in Python) writes checkpoints with their
        # checksum record and verifies every one it loads; Lightning calls this hook at the start
        # of every run, before it restores or saves a checkpoint
        install_checksums(self.trainer)
        return [ArrowPredictionWriter(self.predict_dir)] if self.predict_dir else []

    def output_info(self) -> dict:
        """The stage's own entries of ``meta.json`` (sources, widths, ...)."""
        return {}

    def finish_output(self, folder) -> None:
        """Rank 0, after the predict's parts and meta.json are complete in the staging
        ``folder`` and before it replaces the output: write files that belong with the dataset
        (a report), so that both appear together or not at all. Nothing by default."""

    def output_meta(self) -> dict:
        """What ``meta.json`` records about the output: kind, stage, dims, hparams and
        :meth:`output_info`."""
        return {"kind": self.OUTPUT_KIND, "stage": self.STAGE, "dims": self.checkpoint_dims(),
                "hparams": dict(self.hparams), **self.output_info()}

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        """AdamW with the stage's ``optim`` group (:class:`OptimConfig`)."""
        return adamw(self, total_steps=self.trainer.estimated_stepping_batches, **self.hparams["optim"])


# ------------------------------------------------------------------------------ user vectors
#: ``user_pool`` values every stage with window states has, and the parts each puts side by side
#: (each :func:`pool_window`, D wide): ``mean_last`` lets a linear probe also see the drift
#: between the average and the latest state. A stage adds its own parts to this table.
WINDOW_POOLS: dict[str, tuple[str, ...]] = {"mean": ("mean",), "last": ("last",), "mean_last": ("mean", "last")}


def pool_window(windows: torch.Tensor, win_mask: torch.Tensor, part: Literal["mean", "last"]) -> torch.Tensor:
    """[B, D] one vector per user from window states [B, W, D]: ``mean`` over the real windows or
    ``last`` (the last real window, which sees the whole history)."""
    from foundv2.objectives import last_valid

    if part == "last":
        return last_valid(windows, win_mask)
    m = win_mask.float()[..., None]
    return (windows * m).sum(1) / m.sum(1).clamp_min(1)


class ObjectiveStage(PredictStage):
    """A :class:`PredictStage` trained by a sum of objective terms (stages 1 and 3): the stage
    writes ``model_step(batch) -> (total loss, detached logs)``; the train/val/test steps and
    their logging (``<stage>/<term>``, one entry per term) live here once.

    The semantic term is not logged for val/test: those users carry no future text by design (no
    leak), so the term is always empty there and ``val/loss/total`` has no semantic part — compare
    it across runs, not with ``train/loss/total``.
    """

    def model_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def log_terms(self, logs: dict, stage: str, batch_size: int) -> None:
        for k, v in logs.items():
            if stage != "train" and k.endswith("/semantic"):
                continue
            self.log(f"{stage}/{k}", v, on_step=stage == "train", on_epoch=True, batch_size=batch_size,
                     sync_dist=stage != "train", prog_bar=k == "loss/total")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        total, logs = self.model_step(batch)
        self.log_terms(logs, "train", batch["user_id"].shape[0])
        return total

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log_terms(self.model_step(batch)[1], "val", batch["user_id"].shape[0])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.log_terms(self.model_step(batch)[1], "test", batch["user_id"].shape[0])
