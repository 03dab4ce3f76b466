"""PooledStage: the parameter-free stage 1 (``pooled``); its predict writes the features dataset."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from foundv2.io import ArrowPredictionWriter
from foundv2.nn.pooled import PooledSliceFeatures


def split_by_user(out: dict, batch: dict, per_slice: tuple = (("feat", np.float32),)) -> dict:
    """Flat slice tensors of a batch → per-user columns for the Arrow writer.

    ``per_slice`` names the slice columns written beside the window and source (and their dtype).
    """
    B = batch["user_id"].shape[0]
    counts = torch.bincount(out["slice_user"], minlength=B).tolist()
    cols = {"user_id": batch["user_id"].cpu().numpy(), "row": batch["row"].cpu().numpy(),
            "split": batch["split"].cpu().numpy().astype(np.int8)}
    for key, dtype in (("slice_window", np.int32), ("slice_source", np.int8), *per_slice):
        cols[key] = [a.numpy().astype(dtype) for a in torch.split(out[key].detach().float().cpu()
                                                                 if dtype == np.float32 else out[key].cpu(), counts)]
    return cols


class PooledStage(L.LightningModule):
    """Stage 1 with no learning: mean text embedding, item codes, category histogram and counts.

    Args:
        item_dim: width of the fixed random item codes.
        seed: seed of the item codes.
        predict_dir: where ``predict`` writes the features dataset (one Arrow part per rank).
    """

    def __init__(self, item_dim: int = 32, seed: int = 0, predict_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["predict_dir"])  # a run setting, not stored in checkpoints
        self.predict_dir = predict_dir
        self.net: PooledSliceFeatures | None = None
        self.sources: list[str] = []

    def setup(self, stage: str) -> None:
        if self.net is None:
            dims = self.trainer.datamodule.dims()
            self.sources = dims["sources"] + (["profile"] if dims["tabular_dim"] else [])
            self.net = PooledSliceFeatures(dims["num_sources"], dims["num_items"], dims["num_categories"],
                                           dims["text_dim"], dims["tabular_dim"], self.hparams.item_dim,
                                           self.hparams.seed)

    def configure_callbacks(self):
        return [ArrowPredictionWriter(self.predict_dir)] if self.predict_dir else []

    def forward(self, batch: dict) -> dict:
        return self.net(batch)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return split_by_user(self.net(batch), batch)

    def output_meta(self) -> dict:
        return {"kind": "features", "stage": "pooled", "sources": self.sources, "dim": self.net.dim}
