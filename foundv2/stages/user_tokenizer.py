"""UserTokenizerStage: user-level code tuples beside the per-window tokens of TokenizerStage.

Nothing is trained by gradients: ``fit`` reads the train users' histories (and, for the
future-aligned block, their futures) from the prepared data, fits the item factors, the
future regression and the residual codebooks (:class:`~foundv2.nn.user_codes.UserCodeTokenizer`)
in one pass, and exports the tokenizer (``save_pretrained``). Validation and test users are
never read by ``fit``. ``predict`` writes one row per user: ``user_codes`` (``levels`` codes,
one byte each with 256 codes) and ``user_emb`` (the decoded vector), plus ``report.json`` with
the storage. Run ``fit`` with ``max_epochs: 1``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from data_modules.store import atomic_write_json
from foundv2.io import ArrowPredictionWriter
from foundv2.nn.user_codes import UserCodeTokenizer


def item_lists(table, rows: np.ndarray, column: str) -> list[np.ndarray]:
    """0-based item ids of ``column`` (``h_item`` / ``f_item``) for the prepared ``rows``, in time
    order, events without an item dropped."""
    part = table.select(rows.tolist()).with_format("numpy", columns=[column])[column]
    return [np.asarray(v, np.int64)[np.asarray(v) > 0] - 1 for v in part]


class UserTokenizerStage(L.LightningModule):
    """User-level tokenizer: a collaborative whole-history user vector → ``levels`` residual codes.

    Args:
        factor_dim: item factors (TF-IDF → SVD components fitted on the train users).
        history_dim: leading whole-history components in the user vector.
        future_dim: width of the future-aligned block (0: none; it is fitted on the train
            users' futures only).
        recent_items: the last this many history items get their own projection (an input of
            the future-aligned block).
        ridge: ridge strength of the future regression.
        levels: codes per user (bytes per user with 256 codes).
        codes: codes per level.
        seed: seed of the SVD and the k-means.
        predict_dir: where ``predict`` writes the user tokens dataset and report.json.
        export_dir: where ``fit`` saves the tokenizer (save_pretrained folder).
        pretrained: a save_pretrained folder to predict with.
    """

    def __init__(self, factor_dim: int = 128, history_dim: int = 16, future_dim: int = 16, recent_items: int = 30,
                 ridge: float = 10.0, levels: int = 16, codes: int = 256, seed: int = 0,
                 predict_dir: str | None = None, export_dir: str | None = None, pretrained: str | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["predict_dir", "export_dir"])
        self.predict_dir, self.export_dir = predict_dir, export_dir
        self.model: UserCodeTokenizer | None = None
        self.automatic_optimization = False

    def setup(self, stage: str) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        if hp.pretrained:
            self.model = UserCodeTokenizer.from_pretrained(hp.pretrained)
            return
        num_items = int(self.trainer.datamodule.dims()["num_items"])
        self.model = UserCodeTokenizer(num_items, hp.factor_dim, hp.history_dim, hp.future_dim, hp.recent_items,
                                       hp.ridge, hp.levels, hp.codes, seed=hp.seed)

    def configure_callbacks(self):
        return [ArrowPredictionWriter(self.predict_dir)] if self.predict_dir else []

    def configure_optimizers(self):
        return None

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        train = dm.rows("train")
        futures = item_lists(dm.table, train, "f_item") if self.hparams.future_dim else None
        self.model.fit(item_lists(dm.table, train, "h_item"), futures)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        return None  # fitted in closed form in on_fit_start

    def on_fit_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            self.model.save_pretrained(self.export_dir)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        rows = batch["row"].cpu().numpy()
        codes = self.model.encode(item_lists(self.trainer.datamodule.table, rows, "h_item"))
        return {"user_id": batch["user_id"].cpu().numpy(), "row": rows,
                "split": batch["split"].cpu().numpy().astype(np.int8),
                "user_codes": codes.numpy().astype(np.int16), "user_emb": self.model.decode(codes).numpy()}

    def output_meta(self) -> dict:
        # row_kind: the bench probes the decoded ``user_emb`` as a token row at the codes' size
        return {"kind": "user_tokens", "stage": "user_tokenizer", "row_kind": "tokens", "levels": self.model.levels,
                "codes": self.model.config["codes"], "bytes_per_user": self.model.bytes_per_user,
                "hparams": {k: v for k, v in self.hparams.items()}}

    def on_predict_epoch_end(self) -> None:
        if self.predict_dir and self.trainer.is_global_zero:
            atomic_write_json(Path(self.predict_dir) / "report.json",
                              {"storage": {"bytes_per_user": self.model.bytes_per_user, "levels": self.model.levels,
                                           "bits_per_code": int(np.ceil(np.log2(self.model.config["codes"])))}})
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
