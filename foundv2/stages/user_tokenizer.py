"""UserTokenizerStage: user-level code tuples beside the per-window tokens of TokenizerStage.

Nothing is trained by gradients: at the start of ``fit`` the stage reads the train users'
histories (and, for the future-aligned block, their futures) from the prepared data and fits the
item factors, the future regression and the residual codebooks
(:class:`~foundv2.nn.user_codes.UserCodeTokenizer`) in closed form; the one training step of
``max_epochs: 1`` (a zero loss, so the trainer counts a step and checkpoints) does nothing else.
Validation and test users are never read by ``fit``, and only the ``data.fit_users`` sample of the
training users when one is declared. The fitted tokenizer lives in the
checkpoint (its buffers, the data's sizes under the base's dims key), so ``predict`` from the
checkpoint, or ``UserTokenizerStage.load_from_checkpoint(path)``, encodes the same codes; ``fit``
also exports it (``save_pretrained``) when ``export_dir`` is set.

``predict`` writes one row per user: ``user_codes`` (``levels`` codes, one byte each with 256
codes) and ``user_emb`` (the decoded vector), ``meta.json`` with ``row_kind: tokens`` and the
``bytes_per_user`` (the bench probes ``user_emb`` as a token row at the codes' size), and
``report.json`` with the storage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_modules.store import atomic_write_json, read_output_meta
from foundv2.metrics.collisions import collision_stats, row_hashes
from foundv2.nn.user_codes import UserCodesConfig, UserCodeTokenizer
from foundv2.stages.base import PredictStage, item_lists, user_columns


class UserTokenizerStage(PredictStage):
    """User-level tokenizer: a collaborative whole-history user vector → ``levels`` residual codes.

    Args:
        user_codes: the tokenizer (``--model.user_codes.*``: the user vector's blocks, levels,
            codes per level, groups, seed; :class:`~foundv2.nn.user_codes.UserCodesConfig`).
        predict_dir: where ``predict`` writes the user tokens dataset and report.json.
        export_dir: where ``fit`` saves the tokenizer (save_pretrained folder).
        pretrained: a save_pretrained folder to predict with (no fit needed).
    """

    OUTPUT_KIND = "user_tokens"
    STAGE = "user_tokenizer"

    def __init__(self, user_codes: UserCodesConfig = UserCodesConfig(), predict_dir: str | None = None,
                 export_dir: str | None = None, pretrained: str | None = None):
        super().__init__(predict_dir)
        self.save_settings("export_dir")
        self.user_codes_config = UserCodesConfig.keep(self.hparams, "user_codes")
        self.export_dir = export_dir
        self.model: UserCodeTokenizer | None = None
        # the one parameter of the one (zero-lr) optimiser step that makes the trainer count a step
        self._step_anchor = torch.nn.Parameter(torch.zeros(()))

    def build_nets(self, dims: dict) -> None:
        hp = self.hparams
        if hp.pretrained:
            self.model = UserCodeTokenizer.from_pretrained(hp.pretrained)
            return
        self.model = UserCodeTokenizer(int(dims["num_items"]), self.user_codes_config)

    def configure_optimizers(self):
        # one parameter-free SGD step: the trainer counts it (a checkpoint is written) and it changes nothing
        return torch.optim.SGD([self._step_anchor], lr=0.0)

    def on_fit_start(self) -> None:
        if self.hparams.pretrained:
            return
        dm = self.trainer.datamodule
        train = dm.prepared_rows(dm.fit_rows())  # the fit sample (data.fit_users) of the training users
        futures = item_lists(dm.table, train, "f_item") if self.model.config.future_dim else None
        self.model.fit(item_lists(dm.table, train, "h_item"), futures)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step_anchor * 0.0  # fitted in closed form in on_fit_start

    def on_fit_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            self.model.save_pretrained(self.export_dir)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        cols = user_columns(batch)
        codes = self.model.encode(item_lists(self.trainer.datamodule.table, cols["row"], "h_item"))
        return {**cols, "user_codes": codes.numpy().astype(np.int16), "user_emb": self.model.decode(codes).numpy()}

    def output_info(self) -> dict:
        # row_kind: the bench probes the decoded ``user_emb`` as a token row at the codes' size
        return {"row_kind": "tokens", "levels": self.model.levels, "codes": self.model.config.codes,
                "groups": self.model.config.groups, "bytes_per_user": self.model.bytes_per_user}

    def finish_output(self, folder: Path) -> None:
        """Rank 0: report.json beside the parts in the staging ``folder``, before the swap."""
        atomic_write_json(Path(folder) / "report.json",
                          {"users": int(len(hashes := _user_code_hashes(Path(folder)))),
                           "collisions": collision_stats(torch.from_numpy(hashes)[:, None]),
                           "storage": {"bytes_per_user": self.model.bytes_per_user, "levels": self.model.levels,
                                       "bits_per_code": int(np.ceil(np.log2(self.model.config.codes)))}})


def _user_code_hashes(folder: Path) -> np.ndarray:
    """One 64-bit hash of each user's whole code tuple, streamed over the output's parts (8 bytes a
    user): whose tuple another user shares (``report.json`` ``collisions``)."""
    from foundv2.stages.tokenizer import record_batches  # the parts read as a stream, as the tokens' report

    meta = read_output_meta(folder)
    out = []
    for batch in record_batches(folder, meta):
        col = batch.column("user_codes")
        codes = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
        out.append(row_hashes(codes))
    return np.concatenate(out) if out else np.zeros(0, np.int64)
