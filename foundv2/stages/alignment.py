"""AlignmentStage: stage 3 (FOUNDv2), a causal Transformer over each user's token sequence,
trained with the multi-scale alignment objectives of :mod:`foundv2.objectives`, so that the
tokens' representation gains predictive power; ``predict`` writes a user embedding built from
tokens alone.

Input: a tokens dataset (``data.tokens_dir``: the tokenizer's predict output; token batches,
:mod:`data_modules.tokens`) and, for a fresh fit, the tokenizer folder whose code vectors start
the token table (``tokenizer_dir``; a checkpoint carries them, so ``load_from_checkpoint`` needs
neither). Objectives on the window states ``windows [B, W, D]`` of
:class:`~foundv2.nn.sequence.TokenSequenceEncoder`:

========  ==============================================================================
fine      from the state at window w predict window w + 1's codes (their mean code vector,
          from the tokenizer's fixed code vectors): the paper's ``(1 + k/τ)(1 − cos)``
          (``fine_mode: cosine``) or InfoNCE against the batch's other next windows
window    InfoNCE between a user's periodic windows (real window keys ``period`` apart: the
          same weekday in other weeks for day windows, a fixed stride for event windows),
          negatives from other users
semantic  the state at the user's last window ↔ the text embedding of the user's future
          summary, *training users only* (:func:`~foundv2.stages.qformer.semantic_mask`)
distill   (ours; off unless weighted, needs ``data.teacher_dir``) from the user's mean and last
          window states and its token sum, a head regresses a teacher's vector of the user
          (stage 1's continuous features, standardised), trained on *training users only*
          (validation users' vectors give the validation loss, test users' none): the tokens
          quantise stage 1's window features, and this term learns back, as a function of the
          whole token sequence, what the quantisation blurred
========  ==============================================================================

Predict output (``kind: embeddings``): per user ``user_id, row, split, user_emb [D']``
(pooled as ``user_pool`` says; its ``sum`` part is the per-source sum of the stage's token
embeddings over the user's tokens, a count-carrying readout: the window states are LayerNorm'd
means, so how many windows and slices a user has and how much of each source reaches them only
through position; at initialisation the sum equals the bench's ``tokens_sum`` and it is trained
with the token table; ``distill`` is the distill head's output, the teacher's vector as
predicted from the tokens) and the per-window states ``window_states [W, D]`` with their
real keys ``window_key [W]``. Being causal, the state of window w never changes when later
windows are appended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from data_modules.store import Split
from foundv2.nn.sequence import SequenceConfig, TokenSequenceEncoder
from foundv2.objectives import MultiScaleObjectives, ObjectivesConfig, last_valid
from foundv2.stages.base import WINDOW_POOLS, ObjectiveStage, OptimConfig, pool_window
from foundv2.stages.qformer import semantic_mask
from foundv2.stages.token_inputs import load_code_vectors, tokens_code_vectors

TERMS = ("fine", "window", "semantic", "distill")  # stage 3's objective terms: no recon
#: ``user_pool`` of stage 3 → the parts of ``user_emb``, side by side: window-state pools (as
#: stage 1's, each ``sequence.dim`` wide), ``sum`` the token-sum readout (S·C wide) and
#: ``distill`` the distill head's prediction of the teacher (the teacher's width)
ALIGN_POOLS: dict[str, tuple[str, ...]] = {**WINDOW_POOLS, "sum": ("sum",), "mean_sum": ("mean", "sum"),
                                           "mean_last_sum": ("mean", "last", "sum"), "distill": ("distill",)}
AlignPool = Literal[tuple(ALIGN_POOLS)]

class AlignmentStage(ObjectiveStage):
    """Stage 3: a causal Transformer over token sequences, trained with the alignment objectives.

    Args:
        tokenizer_dir: the tokenizer folder (save_pretrained) that made the tokens; its code
            vectors start the token table (needed for a fresh ``fit`` only).
        sequence: the causal Transformer (``--model.sequence.*``: width, blocks, frozen codes;
            :class:`~foundv2.nn.sequence.SequenceConfig`).
        user_pool: ``mean``, ``last`` or ``mean_last`` over the real windows' states; with a
            ``_sum`` suffix (or ``sum`` alone) the per-source sum of the token table's vectors
            over the user's tokens is put beside them (see the module docstring); ``distill``:
            the distill head's output (needs the distill term).
        objectives: the objective terms (``--model.objectives.*``,
            :class:`~foundv2.objectives.ObjectivesConfig`): fine, window, semantic and distill
            (stage 3 has no recon term); the fine mode defaults to the paper's weighted ``cosine``.
        optim: the optimiser (``--model.optim.*``, :class:`~foundv2.stages.base.OptimConfig`).
        predict_dir: where ``predict`` writes the embeddings dataset.
    """

    OUTPUT_KIND = "embeddings"
    STAGE = "alignment"

    def __init__(
        self,
        tokenizer_dir: str | None = None,
        sequence: SequenceConfig = SequenceConfig(),
        user_pool: AlignPool = "mean_last",
        objectives: ObjectivesConfig = ObjectivesConfig(fine_mode="cosine"),
        optim: OptimConfig = OptimConfig(),
        predict_dir: str | None = None,
    ):
        super().__init__(predict_dir)
        self.tokenizer_dir = tokenizer_dir
        self.save_settings("tokenizer_dir")  # where the code vectors came from is not a model setting
        self.sequence_config = SequenceConfig.keep(self.hparams, "sequence")
        options = ObjectivesConfig.keep(self.hparams, "objectives").only(TERMS)  # recon is refused here, not at fit
        if user_pool == "distill" and not options.active("distill"):
            raise ValueError("user_pool 'distill' reads the distill term's head: give objectives.weights.distill > 0 "
                             "(and data.teacher_dir)")
        OptimConfig.keep(self.hparams, "optim")
        self.net: TokenSequenceEncoder | None = None
        self.objectives: MultiScaleObjectives | None = None

    # ------------------------------------------------------------------ building
    def data_dims(self, datamodule) -> dict | None:
        if self._teacher_from_checkpoint(datamodule):
            return None
        meta = datamodule.input_meta or {}
        vectors = tokens_code_vectors("AlignmentStage", datamodule, self.tokenizer_dir, "start its token table")
        dims = datamodule.dims()
        return {"vocab_size": int(vectors.shape[0]), "code_dim": int(vectors.shape[1]),
                "num_levels": int(meta["levels"]), "num_sources": len(meta["sources"]),
                "sources": list(meta["sources"]), "text_dim": dims["text_dim"],
                "window_period": dims["window_period"], "max_windows": dims["max_windows"],
                "teacher_dim": int(dims.get("teacher_dim", 0))}

    def build_nets(self, dims: dict) -> None:
        dim = self.sequence_config.dim
        self.net = TokenSequenceEncoder(torch.zeros(dims["vocab_size"], dims["code_dim"]), dims["num_levels"],
                                        dims["num_sources"], dims["max_windows"], self.sequence_config)
        self.objectives = MultiScaleObjectives.from_options(
            ObjectivesConfig.from_dict(self.hparams.objectives).only(TERMS), dim, dims["text_dim"],
            dims["window_period"], fine_target_dim=dims["code_dim"],
            distill_in_dim=2 * dim + dims["num_sources"] * dims["code_dim"], teacher_dim=dims.get("teacher_dim") or None)

    def configure_model(self) -> None:
        fresh = self.dims is None and self._trainer is not None
        super().configure_model()
        if fresh and self.dims is not None:  # a fit from scratch starts the token table at the tokenizer's code vectors
            vectors = load_code_vectors(self.tokenizer_dir)
            with torch.no_grad():
                self.net.token_table.weight.copy_(vectors)
                self.net.target_table.copy_(vectors)

    def _teacher_from_checkpoint(self, datamodule) -> bool:
        """Whether a distill stage runs without a teacher in the data outside a fit (predict,
        validate or test): only a fit reads the teacher's vectors, so the nets, the head's
        teacher width included, come from the checkpoint (``--ckpt_path``) instead of asking for
        ``data.teacher_dir``."""
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        return (ObjectivesConfig.from_dict(self.hparams.objectives).active("distill") and not fitting
                and getattr(datamodule, "teacher", None) is None)

    # ------------------------------------------------------------------ forward
    def encode(self, batch: dict) -> torch.Tensor:
        """[B, W, D] window states of a token batch."""
        out = self.net(batch["token_id"], batch["tok_level"], batch["tok_source"], batch["tok_window"],
                       batch["tok_mask"], batch["win_mask"].shape[1])
        return out.windows

    def token_sum(self, batch: dict) -> torch.Tensor:
        """[B, S·C] per source, the sum of the token table's vectors over the user's real tokens."""
        net, S = self.net, self.dims["num_sources"]
        codes = F.embedding(batch["token_id"].clamp_min(0), net.token_table.weight).float()
        codes = codes * batch["tok_mask"][..., None]
        onehot = F.one_hot(batch["tok_source"].clamp_min(0), S).float() * batch["tok_mask"][..., None]
        return (onehot.transpose(1, 2) @ codes).flatten(1)  # [B, S, T] @ [B, T, C]

    def distill_input(self, batch: dict, windows: torch.Tensor) -> torch.Tensor:
        """[B, 2D + S·C] what the distill head reads: the mean and last window states, the token sum."""
        mask = batch["win_mask"]
        return torch.cat([pool_window(windows, mask, "mean"), pool_window(windows, mask, "last"),
                          self.token_sum(batch)], dim=1)

    def pool_part(self, part: str, batch: dict, windows: torch.Tensor) -> torch.Tensor:
        """One part of the user vector (:data:`ALIGN_POOLS`): a window-state pool, the token sum,
        or the distill head's prediction of the teacher."""
        if part == "distill":
            return self.objectives.distill.head(self.distill_input(batch, windows).float())
        if part == "sum":
            return self.token_sum(batch)
        return pool_window(windows, batch["win_mask"], part)

    def pool(self, batch: dict, windows: torch.Tensor) -> torch.Tensor:
        """The user vector as ``user_pool`` says: its parts side by side."""
        return torch.cat([self.pool_part(p, batch, windows) for p in ALIGN_POOLS[self.hparams.user_pool]], dim=1)

    @torch.no_grad()
    def user_embedding(self, batch: dict) -> torch.Tensor:
        return self.pool(batch, self.encode(batch).float())

    def model_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        windows = self.encode(batch)
        win_mask = batch["win_mask"]
        targets = self.net.window_targets(batch["token_id"], batch["tok_window"], batch["tok_mask"],
                                          win_mask.shape[1])
        return self.objectives(
            seq=windows, seq_mask=win_mask, seq_targets=targets,
            windows=windows, win_mask=win_mask, win_key=batch["win_key"], user_keys=batch["user_id"],
            user_rep=last_valid(windows, win_mask), fut_text_emb=batch["fut_text_emb"],
            has_fut_text=semantic_mask(batch), **self._distill_inputs(batch, windows))

    def _distill_inputs(self, batch: dict, windows: torch.Tensor) -> dict:
        if not self.objectives.active("distill"):
            return {}
        if "teacher_emb" not in batch:
            raise ValueError("the distill term is on but the batch has no teacher_emb: give data.teacher_dir")
        return {"distill_in": self.distill_input(batch, windows), "teacher_emb": batch["teacher_emb"],
                # a fit learns from training users; validation scores on validation users only
                "has_teacher": batch["has_teacher"] & (batch["split"] == (Split.TRAIN if self.training else Split.VAL))}

    # ------------------------------------------------------------------ predict
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        windows = self.encode(batch).float()
        win_mask = batch["win_mask"]
        user = self.pool(batch, windows)
        n = win_mask.sum(1).tolist()
        return {"user_id": batch["user_id"].cpu().numpy(), "row": batch["row"].cpu().numpy(),
                "split": batch["split"].cpu().numpy().astype(np.int8),
                "user_emb": user.float().cpu().numpy(),  # fp32 whatever the autocast (bf16-mixed)
                "window_states": [windows[i, : n[i]].cpu().numpy() for i in range(len(n))],
                "window_key": [batch["win_key"][i, : n[i]].cpu().numpy() for i in range(len(n))]}

    def output_info(self) -> dict:
        """Besides the widths: a user's embedding is computed from its tokens alone (the weights are
        shared by all users), so its storage is the tokens' — the bench reads ``row_kind`` and
        ``bytes_per_user`` and compares it with rows of that size."""
        dim = int(self.sequence_config.dim)
        widths = {"mean": dim, "last": dim, "sum": self.dims["num_sources"] * self.dims["code_dim"],
                  "distill": int(self.dims.get("teacher_dim", 0))}
        width = sum(widths[p] for p in ALIGN_POOLS[self.hparams.user_pool])
        info = {"sources": list(self.dims["sources"]), "dim": dim, "user_dim": width}
        dm = self._trainer.datamodule if self._trainer is not None else None
        tokens_dir = getattr(dm, "hparams", {}).get("tokens_dir") if dm is not None else None
        report = Path(tokens_dir) / "report.json" if tokens_dir else None
        if report is not None and report.exists():
            info.update(row_kind="tokens", tokens_dir=str(tokens_dir),
                        bytes_per_user=float(json.loads(report.read_text())["storage"]["bytes_per_user"]))
        return info
