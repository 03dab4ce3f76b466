"""QFormerStage: stage 1, one vector per (user, window, source) view; ``predict`` writes the
features dataset that the tokenizer reads.

Three backbones, chosen by ``backbone`` (an ablation is a config change):

- ``qformer`` (U2QT, default): :class:`~foundv2.nn.encoders.EventEncoder` →
  :class:`~foundv2.nn.qformer.CausalQFormer` with the tabular profile
  (:class:`~foundv2.nn.encoders.TabularEncoder`) as an always-visible context token. Trained with
  reconstruction of each slice's pooled input (:func:`~foundv2.nn.slices.pooled_slice_targets`)
  plus the multi-scale alignment objectives (:class:`~foundv2.objectives.MultiScaleObjectives`):

  ========  ==========================================================================
  fine      window reps ``views.mean(2)`` [B, W, D] → predict window w + 1's pooled content
            (all sources) from window w (``fine_target=state``: w + 1's representation)
  window    the same window reps; periodic partners by ``win_key`` (period from the data)
  semantic  ``last_valid(window reps)`` ↔ the future-summary text embedding, *training users
            only*: ``has_fut_text & split == Split.TRAIN`` (val/test futures never reach a loss)
  recon     per-source linear head on the views vs the pooled slice targets
  ========  ==========================================================================

- ``text_encoder`` (FOUNDv2's v2 way, frozen): a slice's feature is the mean of its events'
  cached text embeddings plus the count, value and clock statistics of
  :func:`~foundv2.nn.slices.pooled_slice_targets`; nothing to train.
- ``pooled``: the parameter-free :class:`~foundv2.nn.slices.PooledSliceFeatures`; nothing to train.

Predict output (the format :class:`~foundv2.stages.tokenizer.TokenizerStage` reads through
``UserDataModule(features_dir=...)``): one row per user with ``user_id, row, split,
slice_window [n], slice_source [n], slice_key [n], feat [n, D]`` (one slice per *present*
(window, source), plus, when the data set has profile inputs, a ``profile`` slice at window 0
whose source index is the last one and whose key is -1) and ``user_emb [D]`` (see
:meth:`QFormerStage.user_embedding`). Windows are the ones the DataModule hands over: each
user's latest ``max_windows`` windows of history (and at most ``max_events`` events);
``slice_window`` numbers them 0.. from the oldest kept window, ``slice_key`` is the window key
the prepared data gave them (calendar day or week number, or the event-window number).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from data_modules.store import Split
from foundv2.nn.encoders import EventEncoder, TabularEncoder
from foundv2.nn.item_factors import ItemFactors
from foundv2.nn.qformer import CausalQFormer, QFormerConfig, ReconstructionHead
from foundv2.nn.slices import (
    PooledSliceFeatures,
    TextSliceFeatures,
    add_profile_slices,
    flat_slices,
    mean_by_user,
    pooled_slice_targets,
    slice_target_dim,
)
from foundv2.objectives import MultiScaleObjectives, ObjectivesConfig, last_valid
from foundv2.stages.base import (
    WINDOW_POOLS,
    ObjectiveStage,
    OptimConfig,
    pool_window,
    split_by_user,
    train_item_lists,
    with_window_keys,
)

STAGE1_TERMS = ("fine", "window", "semantic", "recon")  # the objective terms stage 1 trains with (no distill)

#: ``user_pool`` of stage 1 → the parts of ``user_emb``, side by side, each ``qformer.dim`` wide:
#: window-state pools (:data:`~foundv2.stages.base.WINDOW_POOLS`) and ``items``, the mean of the
#: event encoder's (trained) item-table rows over the user's events that have an item
QFORMER_POOLS: dict[str, tuple[str, ...]] = {**WINDOW_POOLS, "items": ("items",), "mean_items": ("mean", "items"),
                                             "mean_last_items": ("mean", "last", "items")}
QFormerPool = Literal[tuple(QFORMER_POOLS)]


def semantic_mask(batch: dict) -> torch.Tensor:
    """[B] bool: users whose future text may feed the semantic objective — training users that
    have one. The DataModule already sets ``has_fut_text`` False for val/test users; the split
    check makes that a property of the stage as well, not only of the data."""
    return batch["has_fut_text"].bool() & (batch["split"] == Split.TRAIN)


class QFormerStage(ObjectiveStage):
    """Stage 1: per-source event encoders → causal Q-Former (or a frozen backbone).

    Args:
        backbone: ``qformer`` (trained), ``text_encoder`` or ``pooled`` (frozen: no ``fit``, run
            ``predict`` directly).
        qformer: the Q-Former (``--model.qformer.*``: width, queries, blocks, visibility within a
            window; :class:`~foundv2.nn.qformer.QFormerConfig`); its ``dim`` is also the event
            encoder's (``qformer`` backbone).
        per_source_proj: give every source its own output layer in the event encoder.
        user_pool: how ``user_emb`` is made from the window representations (``qformer``):
            ``mean`` (over real windows, D wide), ``last`` (the last real window, which sees
            the whole history) or ``mean_last`` (both, concatenated: 2·D wide; a linear probe
            then also sees the drift between the average and the latest state); ``items``,
            ``mean_items`` and ``mean_last_items`` add (or are) the mean of the event encoder's
            item-table rows over the user's events that have an item (D wide): with ``item_init:
            factors`` that starts as a collaborative profile of the history, which the window
            states, trained on time and periodicity, only partly keep.
        objectives: the objective terms (``--model.objectives.*``: weights, switches, τ, the fine
            mode, false-negative margins; :class:`~foundv2.objectives.ObjectivesConfig`);
            the terms are fine, window, semantic and recon.
        fine_target: what the fine term predicts for window w + 1 from the state at window w:
            ``content`` (default: that window's pooled slice targets, all sources side by side,
            i.e. the next step's events) or ``state`` (its own detached window representation).
            Predicting the next window's content makes each causal state an estimate of the
            user's tendencies (what, when, how much); predicting the next state mostly teaches
            the queries to be self-similar.
        optim: the optimiser (``--model.optim.*``: lr, weight decay, warm-up, cosine decay;
            :class:`~foundv2.stages.base.OptimConfig`).
        item_init: how the event encoder's item table starts (``qformer``): ``random`` (normal
            rows) or ``factors`` (collaborative item factors: TF-IDF → truncated SVD of the
            *train* users' histories, ``qformer.dim`` components, fitted once at the start of ``fit``;
            :class:`~foundv2.nn.item_factors.ItemFactors`), then trained with the rest. Which
            items co-occur across users is what predicts attributes and next items on
            MovieLens, and ~150 steps of a random table do not learn it.
        view_items: (``qformer``) every (window, source) view that ``predict`` writes also carries
            the mean of the item-table rows of that window's events of that source (zeros where
            none has an item; the profile slice is padded with zeros), so the features are
            ``2·qformer.dim`` wide. The views are LayerNorm'd attention outputs in which *which* items a
            window holds is only partly kept, and the tokenizer quantises what the features hold:
            with ``item_init: factors`` this puts the window's collaborative profile in its tokens.
            Training is unchanged; the part depends on the window's own events only (causal).
        activity: put the user's activity features beside the pooled states in ``user_emb``:
            counts and value statistics per source, active days, frequency, tenure, recency
            (:mod:`data_modules.activity`, from the whole history, the same features as the
            bench's ``activity`` row). The window states are trained to predict *what* comes
            next; how much and how recently a user was active is what a lifecycle or a
            cohort label reads, and a linear probe cannot recover a count from a mean of
            LayerNorm'd states. Costs ``4 · activity_dim`` bytes per user (``output_info``).
        item_dim: width of the fixed item codes of the ``pooled`` backbone.
        seed: seed of those item codes.
        predict_dir: where ``predict`` writes the features dataset (one Arrow part per rank).
    """

    OUTPUT_KIND = "features"
    STAGE = "qformer"

    def __init__(
        self,
        backbone: Literal["qformer", "text_encoder", "pooled"] = "qformer",
        qformer: QFormerConfig = QFormerConfig(),
        per_source_proj: bool = False,
        user_pool: QFormerPool = "mean_last",
        objectives: ObjectivesConfig = ObjectivesConfig(),
        fine_target: Literal["content", "state"] = "content",
        optim: OptimConfig = OptimConfig(),
        item_init: Literal["random", "factors"] = "random",
        view_items: bool = False,
        activity: bool = True,
        item_dim: int = 32,
        seed: int = 0,
        predict_dir: str | None = None,
    ):
        super().__init__(predict_dir)
        if view_items and backbone != "qformer":
            raise ValueError(f"view_items reads the qformer backbone's item table; backbone is {backbone!r}")
        self.save_settings()
        self.qformer_config = QFormerConfig.keep(self.hparams, "qformer")  # plain dicts in meta.json, hparams.yaml, checkpoints
        ObjectivesConfig.keep(self.hparams, "objectives").only(STAGE1_TERMS)  # distill is refused here
        OptimConfig.keep(self.hparams, "optim")
        self.sources: list[str] = []
        self.encoder: EventEncoder | None = None
        self.tabular: TabularEncoder | None = None
        self.qformer: CausalQFormer | None = None
        self.recon_head: ReconstructionHead | None = None
        self.objectives: MultiScaleObjectives | None = None
        self.frozen: torch.nn.Module | None = None
        self._warned_leak = False

    # ------------------------------------------------------------------ building
    def build_nets(self, dims: dict) -> None:
        """Create the modules for a data set's ``UserDataModule.dims()``."""
        hp = self.hparams
        S = dims["num_sources"]
        calendar = dims["calendar_dim"]  # the calendar inputs' width (0 with --data.calendar false)
        self.sources = list(dims["sources"]) + (["profile"] if dims["tabular_dim"] else [])
        if hp.backbone == "pooled":
            self.frozen = PooledSliceFeatures(S, dims["num_items"], dims["num_categories"], dims["text_dim"],
                                              dims["tabular_dim"], hp.item_dim, hp.seed, calendar_dim=calendar)
            return
        if hp.backbone == "text_encoder":
            self.frozen = TextSliceFeatures(S, dims["text_dim"], dims["tabular_dim"], calendar_dim=calendar)
            return
        dim = self.qformer_config.dim
        self.encoder = EventEncoder(S, dims["num_items"], dims["text_dim"], dim, dims["num_categories"],
                                    per_source_proj=hp.per_source_proj, calendar_dim=calendar)
        self.tabular = TabularEncoder(dims["tabular_dim"], dim)
        self.qformer = CausalQFormer(S, dims["max_windows"], self.qformer_config)
        self.recon_head = ReconstructionHead(S, dim, slice_target_dim(dims["text_dim"]))
        if hp.item_init == "factors":  # 1 once the table holds fitted factors: a resumed fit does not refit
            self.register_buffer("items_fitted", torch.zeros((), dtype=torch.uint8))
        self.objectives = MultiScaleObjectives.from_options(
            ObjectivesConfig.from_dict(hp.objectives).only(STAGE1_TERMS), dim, dims["text_dim"],
            dims["window_period"], fine_target_dim=self._fine_target_dim(dims))

    def _fine_target_dim(self, dims: dict) -> int | None:
        if self.hparams.fine_target != "content":
            return None
        return dims["num_sources"] * slice_target_dim(dims["text_dim"]) + 1

    def _next_targets(self, target: torch.Tensor, win_key: torch.Tensor) -> torch.Tensor | None:
        """Content targets of the fine term: step t is [window t's slice targets, all sources |
        log1p of its key distance from window t - 1] — what the next step holds and *when* it
        comes (the gap is the activity rate a fading user shows)."""
        if self._fine_target_dim(self.dims) is None:
            return None
        gap = torch.zeros_like(win_key, dtype=torch.float32)
        gap[:, 1:] = (win_key[:, 1:] - win_key[:, :-1]).clamp_min(0).float()
        return torch.cat([target.flatten(2), torch.log1p(gap)[..., None]], dim=-1)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.backbone != "qformer":
            raise ValueError(f"QFormerStage(backbone={self.hparams.backbone!r}) is frozen and has nothing to train: "
                             f"run `foundv2 predict` with this config directly (no `fit`, no ckpt_path).")

    def on_fit_start(self) -> None:
        if self.hparams.item_init == "factors" and not int(self.items_fitted):
            self.init_item_factors(train_item_lists(self.trainer.datamodule))

    @torch.no_grad()
    def init_item_factors(self, histories: list) -> None:
        """Set the item table to ``dim`` collaborative factors of these (train) histories, rows
        scaled to the mean norm of the random rows they replace (the same on every rank: the
        fit is deterministic)."""
        table = self.encoder.item.weight
        factors = ItemFactors(table.shape[0] - 1, table.shape[1]).fit(histories, seed=self.hparams.seed)
        table.copy_(factors.item_codes(scale=float(table[1:].norm(dim=1).mean())).to(table))
        self.items_fitted.fill_(1)

    # ------------------------------------------------------------------ forward
    def encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``qformer`` backbone: (views [B, W, S, D], present [B, W, S], profile [B, D] or None)."""
        if self.qformer is None:
            raise RuntimeError(f"encode() needs the qformer backbone (this stage is {self.hparams.backbone!r})")
        events = self.encoder(batch)
        profile = self.tabular(batch["tabular"])
        context = profile.unsqueeze(1) if profile is not None else None
        out = self.qformer(events, batch["ev_window"], batch["ev_source"], batch["ev_mask"], batch["win_mask"],
                           context=context)
        return out.views, out.present, profile

    @torch.no_grad()
    def slices_and_users(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """(flat slices: slice_user, slice_window, slice_source, slice_key [N], feat [N, D]; user_emb [B, D]).

        ``user_emb`` pools the window representations ``views.mean(2)`` as ``user_pool`` says
        (``qformer``), or the mean of the user's event-slice features (frozen
        backbones; profile slices are left out). Inference only (no gradients).
        """
        S = self.dims["num_sources"]
        if self.frozen is not None:
            out = with_window_keys(self.frozen(batch), batch, S)
            keep = out["slice_source"] < S
            return out, self.with_activity(batch, mean_by_user(out["feat"][keep], out["slice_user"][keep],
                                                               batch["user_id"].shape[0]))
        views, present, profile = self.encode(batch)
        out = with_window_keys(self.flat_views(batch, views, present, profile), batch, S)
        return out, self.with_activity(batch, self.pool_user(batch, views.mean(2).float()))

    def with_activity(self, batch: dict, user: torch.Tensor) -> torch.Tensor:
        """``user`` [B, D] with the batch's activity features beside it when ``activity`` is on."""
        if not self.hparams.activity:
            return user
        return torch.cat([user, batch["activity"].to(user)], dim=1)

    def flat_views(self, batch: dict, views: torch.Tensor, present: torch.Tensor, profile: torch.Tensor | None,
                   lead: int = 0) -> dict:
        """The slices ``predict`` writes from the Q-Former's ``views [B, W, S, D]``: flat, with the
        window's item mean beside each view if ``view_items``, and one profile slice per user if
        ``profile`` is given. ``lead``: events at the start of the batch that belong to no window
        of ``views`` (an append's lead event), left out of the item means."""
        if self.hparams.view_items:
            views = torch.cat([views, self.window_item_means(batch, views.shape[1], lead).to(views)], dim=-1)
        out = flat_slices(views, present)
        if profile is not None:
            width = out["feat"].shape[1]
            out = add_profile_slices(out, F.pad(profile, (0, width - profile.shape[1])), self.dims["num_sources"])
        return out

    def window_item_means(self, batch: dict, num_windows: int, lead: int = 0) -> torch.Tensor:
        """[B, W, S, D] per (window, source): the mean item-table row of its events that have an
        item (zeros where none has)."""
        S = self.dims["num_sources"]
        rows, has = self.event_item_rows(batch, lead)
        window = batch["ev_window"][:, lead:]
        has = has & (window >= 0) & (window < num_windows)
        slot = torch.where(has, window * S + batch["ev_source"][:, lead:], 0)
        onehot = F.one_hot(slot, num_windows * S).float() * has.unsqueeze(-1).float()  # [B, E, W·S]
        sums = onehot.transpose(1, 2) @ rows
        means = sums / onehot.sum(1).clamp_min(1).unsqueeze(-1)
        return means.view(means.shape[0], num_windows, S, -1)

    def event_item_rows(self, batch: dict, lead: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[B, E, D]`` the item-table row of each event from ``lead`` on, ``[B, E]`` whether the
        event is real and has an item)."""
        item = batch["ev_item"][:, lead:]
        return self.encoder.item(item.clamp_min(0)).float(), batch["ev_mask"][:, lead:].bool() & (item > 0)

    def pool_user(self, batch: dict, windows: torch.Tensor) -> torch.Tensor:
        """``user_emb`` from the window states [B, W, D] (and the batch's items) as ``user_pool`` says."""
        return torch.cat([self.item_mean(batch) if part == "items" else pool_window(windows, batch["win_mask"], part)
                          for part in QFORMER_POOLS[self.hparams.user_pool]], dim=1)

    def item_mean(self, batch: dict) -> torch.Tensor:
        """[B, D] the mean item-table row over each user's events that have an item."""
        rows, has = self.event_item_rows(batch)
        has = has.float()
        return (rows * has.unsqueeze(-1)).sum(1) / has.sum(1, keepdim=True).clamp_min(1)

    def forward(self, batch: dict) -> dict:
        """Flat slices of a batch (slice_user, slice_window, slice_source, slice_key [N], feat [N, D])."""
        return self.slices_and_users(batch)[0]

    @torch.no_grad()
    def user_embedding(self, batch: dict) -> torch.Tensor:
        """[B, D] one vector per user (see :meth:`slices_and_users`)."""
        return self.slices_and_users(batch)[1]

    # ------------------------------------------------------------------ training
    def _semantic_users(self, batch: dict) -> torch.Tensor:
        has = semantic_mask(batch)
        if not self._warned_leak and bool((batch["has_fut_text"].bool() & ~has).any()):
            self._warned_leak = True
            rank_zero_warn("a val/test user arrived with has_fut_text=True; QFormerStage ignores its future text")
        return has

    def model_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """All active objectives on one event batch → (total loss, detached logs)."""
        views, _, _ = self.encode(batch)
        windows = views.mean(2)
        win_mask = batch["win_mask"]
        target, t_present = pooled_slice_targets(batch, self.dims["num_sources"], max_windows=win_mask.shape[1])
        total, logs = self.objectives(
            seq=windows, seq_mask=win_mask, seq_targets=self._next_targets(target, batch["win_key"]),
            windows=windows, win_mask=win_mask, win_key=batch["win_key"], user_keys=batch["user_id"],
            user_rep=last_valid(windows, win_mask), fut_text_emb=batch["fut_text_emb"],
            has_fut_text=self._semantic_users(batch),
            recon=self.recon_head(views), recon_target=target, present=t_present,
        )
        names = self.dims["sources"]
        renamed = {}
        for k, v in logs.items():
            if k.startswith("recon_mse/"):
                k = f"recon_mse/{names[int(k.split('/')[1])]}"
            renamed[k] = v
        return total, renamed

    # ------------------------------------------------------------------ predict
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        out, user = self.slices_and_users(batch)
        cols = split_by_user(out, batch)
        cols["user_emb"] = user.float().cpu().numpy()
        return cols

    def output_info(self) -> dict:
        dim = self.view_dim
        user_dim = dim * (len(QFORMER_POOLS[self.hparams.user_pool]) if self.frozen is None else 1)
        user_dim += self.dims["activity_dim"] if self.hparams.activity else 0
        return {"backbone": self.hparams.backbone, "sources": self.sources, "dim": dim, "user_dim": user_dim,
                "feature_dim": self.feature_dim}

    @property
    def view_dim(self) -> int:
        """Width of a view (a frozen backbone's slice feature, or the Q-Former's ``dim``)."""
        return int(self.frozen.dim) if self.frozen is not None else int(self.qformer_config.dim)

    @property
    def feature_dim(self) -> int:
        """Width of a slice feature that ``predict`` writes: the view, and its item mean with ``view_items``."""
        return self.view_dim * (2 if self.hparams.view_items else 1)
