"""ProbeStage: a linear probe of a frozen per-user representation, under ``foundv2 fit | validate | test``.

It reads representation batches (``UserDataModule(representation_dir=...)``: any stage output
with a ``user_emb`` column, see :mod:`data_modules.representations`) and one task of the data set
(``task``): a binary label (logistic regression), a multiclass one (softmax over the classes),
``future_categories`` (a sigmoid per category) or ``next_items`` (a softmax over every item;
relevant = the user's future items not in the history, which are also left out of the softmax
and of the ranking).

The protocol (the bench's, ``foundv2-bench-v1``), one implementation:

- **standardised inputs**: before the first step, one pass over the train users (each rank its
  share, sums all-reduced) gives the mean and standard deviation of every input dimension
  (sparse inputs are used as they are) and the target frequencies; the heads start at zero
  weights with the bias at the log prior (the popularity ranking for ``next_items``).
- **weight decay chosen on validation**: one head per value of ``weight_decays`` is trained side
  by side on the same batches (an L2 penalty ``wd/2·‖W‖²`` per head in the loss; the heads share
  nothing, so each follows the path it would follow alone) and scored on the validation users
  after every epoch; ``val/select`` is the best head's selection metric (AUC for binary, macro
  AUC for multiclass and multilabel, ``ndcg@max(ks)`` for next items), or with
  ``selection: loss`` the negative validation log-loss of a label head (a proper score, which
  keeps improving while a head converges where a ranking metric has saturated on a small
  validation set).
- **early stopping**: Lightning's ``EarlyStopping`` on ``val/select`` (``patience`` epochs), and the
  stage keeps the best (head, epoch) it has seen in ``best_weight``/``best_bias`` with its
  ``best_weight_decay``, ``best_epoch`` and ``best_score`` (saved in every checkpoint), so
  ``test`` and ``predict`` from any checkpoint of the run use the head chosen on validation.
  The start itself is the first candidate (``best_epoch`` -1): a probe is never below the prior
  (for next items, the popularity ranking) on validation.
- **metrics as torchmetrics objects**, DDP-synced at ``compute``: AUC (exact, or binned with
  ``auc_bins``) and :class:`~foundv2.metrics.classification.KSStatistic` for binary; accuracy and
  :class:`~foundv2.metrics.classification.MacroAUROC` for multiclass; macro AUC for multilabel;
  :class:`~foundv2.metrics.ranking.TopKRanking` (running sums) for next items. Logged as
  ``val/wd=<value>/<metric>`` per head, ``val/select`` and ``val/weight_decay`` (of the kept
  head), and ``test/<metric>``, ``test/weight_decay``.

``predict`` writes, per user, ``scores [C]`` (probabilities; binary: ``[1]``) or, for next items,
``top_items [K]`` (item ids 1..num_items, history left out; K = ``max(ks)``).

:func:`fit_probe` runs the stage in-process on any DataModule of representation batches (the
bench's gradient-trained probes: :class:`data_modules.arrays.ArrayRepresentations`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy

from data_modules.representations import NEXT_ITEMS, probe_task
from data_modules.schema import DataError
from foundv2.metrics.classification import KSStatistic, MacroAUROC
from foundv2.metrics.ranking import TopKRanking
from foundv2.stages.base import PredictStage, adamw, user_columns

#: the validation metric that picks the head and the epoch, per task kind (next items: ndcg@max(ks))
SELECTION_METRIC: dict[str, str] = {"binary": "auc", "multiclass": "macro_auc", "multilabel": "macro_auc"}
KS_BINS = 10_000  # KS from histograms of probabilities: thresholds every 1e-4
STD_EPS = 1e-8  # a dimension whose train std is below this is only centred


# ------------------------------------------------------------------------------ the head
class LinearHeads(nn.Module):
    """``num_heads`` independent linear layers over one input: ``[B, D]`` → ``[B, G, O]`` logits.

    One matrix product for all heads. The weight is stored input-major, ``[D, G, O]``, so that a
    sparse COO input (a TF-IDF or an item bag: thousands of columns, tens of nonzeros a row) is
    read as a weighted sum of weight rows (:func:`sparse_linear`, ``O(nnz · G·O)``, with a dense
    gradient of the same layout): ``torch.sparse.mm`` on the transposed weight was 4x slower per
    step on the 3,706-item next-item probe. :meth:`head_weight` gives one head as ``[O, D]``.
    """

    def __init__(self, num_heads: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(in_dim, num_heads, out_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, out_dim))

    def head_weight(self, g: int) -> torch.Tensor:
        """Head ``g``'s weight as ``[O, D]`` (a view)."""
        return self.weight[:, g].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim, heads, outputs = self.weight.shape
        w = self.weight.reshape(dim, heads * outputs)
        z = sparse_linear(x, w) if x.is_sparse else x @ w
        return (z + self.bias.reshape(-1)).view(x.shape[0], heads, outputs)


def sparse_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight`` for a sparse COO ``x [B, D]`` and a dense ``weight [D, N]``: each row a
    weighted sum of the weight rows of its nonzero columns (``F.embedding_bag``)."""
    x = x.coalesce()
    rows, cols = x.indices()
    offsets = torch.searchsorted(rows, torch.arange(x.shape[0], device=rows.device))
    return F.embedding_bag(cols, weight, offsets, mode="sum", per_sample_weights=x.values().to(weight.dtype))


# ------------------------------------------------------------------------------ targets and losses
def item_mask(items: torch.Tensor, num_items: int) -> torch.Tensor:
    """``[B, E]`` padded item ids (1..num_items, 0 = padding) → ``[B, num_items]`` bool."""
    mask = torch.zeros(items.shape[0], num_items + 1, dtype=torch.bool, device=items.device)
    return mask.scatter_(1, items, True)[:, 1:]


def next_item_targets(batch: dict, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target, seen)`` ``[B, I]`` bool: future items not in the history, history items."""
    seen = item_mask(batch["hist_item"], num_items)
    return item_mask(batch["fut_item"], num_items) & ~seen, seen


def multi_target_softmax_loss(logits: torch.Tensor, target: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy averaged over each user's target items, then over users (dim 0).

    History items (``seen``) are removed from the softmax, as they are from the ranking:
    ``-(1/|T_u|) Σ_{j ∈ T_u} log softmax(z_u)_j = logsumexp_{j ∉ seen} z_uj - mean_{j ∈ T_u} z_uj``.
    ``logits [B, ..., I]`` with ``target`` and ``seen`` broadcastable to it; every user must have
    at least one target (and targets are never seen).
    """
    lse = torch.logsumexp(logits.masked_fill(seen, float("-inf")), dim=-1)
    t = target.to(logits.dtype)
    mean_target = (logits * t).sum(-1) / t.sum(-1)
    return (lse - mean_target).mean(0)


def task_targets(kind: str, batch: dict, task: str, num_items: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(target, seen)`` of a batch: the label (``[B]`` or ``[B, C]``), or for next items the
    target and history masks."""
    if kind == NEXT_ITEMS:
        return next_item_targets(batch, num_items)
    key = f"label/{task}"
    if key not in batch:
        raise DataError(f"probe task {task!r}: the batch holds no {key!r}; batches hold "
                        f"{sorted(k for k in batch if k.startswith('label/'))}.")
    return batch[key], None


def head_losses(kind: str, logits: torch.Tensor, target: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """``[G]`` data loss of each head: ``logits [B, G, O]``, ``target`` from :func:`task_targets`."""
    B, G, _ = logits.shape
    if kind == "binary":
        y = target.float()[:, None].expand(B, G)
        return F.binary_cross_entropy_with_logits(logits[..., 0], y, reduction="none").mean(0)
    if kind == "multiclass":
        return F.cross_entropy(logits.transpose(1, 2), target.long()[:, None].expand(B, G), reduction="none").mean(0)
    if kind == "multilabel":
        y = target.float()[:, None].expand_as(logits)
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean((0, 2))
    has = target.any(1)
    if not has.any():  # no user with a target here: a zero that still reaches every parameter (DDP)
        return logits.sum((0, 2)) * 0.0
    return multi_target_softmax_loss(logits[has], target[has, None], seen[has, None])


# ------------------------------------------------------------------------------ metrics
def task_metrics(kind: str, outputs: int, ks: tuple[int, ...], auc_bins: int | None) -> nn.ModuleDict:
    """The metric objects of a task kind (their names are the logged names)."""
    if kind == "binary":
        return nn.ModuleDict({"auc": BinaryAUROC(thresholds=auc_bins), "ks": KSStatistic(KS_BINS)})
    if kind == "multiclass":
        return nn.ModuleDict({"accuracy": MulticlassAccuracy(outputs, average="micro"),
                              "macro_auc": MacroAUROC(outputs, multiclass=True, thresholds=auc_bins)})
    if kind == "multilabel":
        return nn.ModuleDict({"macro_auc": MacroAUROC(outputs, multiclass=False, thresholds=auc_bins)})
    return nn.ModuleDict({"ranking": TopKRanking(ks)})


def probabilities(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """A label head's ``[B, O]`` logits as probabilities: a softmax over the classes (multiclass),
    else a sigmoid per output (binary: ``[B, 1]``)."""
    return torch.softmax(logits, dim=1) if kind == "multiclass" else torch.sigmoid(logits)


def update_metrics(metrics: nn.ModuleDict, kind: str, logits: torch.Tensor, target: torch.Tensor,
                   seen: torch.Tensor | None) -> None:
    """Add one head's ``[B, O]`` logits of a batch (probabilities in float64 for the classifiers)."""
    if kind == NEXT_ITEMS:
        metrics["ranking"].update(logits, target, exclude=seen)
        return
    p = probabilities(kind, logits.double())
    if kind == "binary":
        metrics["auc"].update(p[:, 0], target.long())
        metrics["ks"].update(p[:, 0], target)
    elif kind == "multiclass":
        metrics["accuracy"].update(p, target.long())
        metrics["macro_auc"].update(p, target)
    else:
        metrics["macro_auc"].update(p, target)


def compute_metrics(metrics: nn.ModuleDict) -> dict[str, float]:
    """Compute (synced across ranks) and reset; ranking metrics are flattened to ``recall@K`` ..."""
    out = {}
    for name, metric in metrics.items():
        value = metric.compute()
        out.update({k: float(v) for k, v in value.items()} if isinstance(value, dict) else {name: float(value)})
        metric.reset()
    return out


# ------------------------------------------------------------------------------ the stage
class ProbeStage(PredictStage):
    """A linear probe of a frozen representation on one task (see the module docstring).

    Args:
        task: what to predict: a binary or multiclass label of the data set (``gender``,
            ``age`` ...), ``future_categories`` (which categories the future holds) or
            ``next_items`` (rank every item not in the history).
        weight_decays: the L2 strengths tried, one head each, chosen on validation (an L2
            penalty ``wd/2·‖W‖²`` in the loss: Adam's coupled weight decay, none on the bias).
            For a logistic probe ``wd ≈ 1/(C·n_train)`` of scikit-learn's C.
        lr: Adam learning rate.
        patience: epochs without a better ``val/select`` before early stopping.
        ks: ranking cut-offs of ``next_items`` (the largest selects).
        standardize: centre and scale dense inputs with the train users' statistics.
        selection: what picks the (head, epoch) on validation and stops the fit: ``metric``
            (the task's selection metric, above) or ``loss`` (the negative log-loss of a label
            task's head, logged as ``neg_log_loss``; next items always use their ranking).
        auc_bins: None for exact AUCs (every validation/test score kept until the epoch's end,
            gathered across ranks, as torchmetrics does); a number of thresholds for binned AUCs
            with constant memory (tens of millions of users).
        predict_dir: where ``predict`` writes the scores (one Arrow part per rank).
    """

    OUTPUT_KIND = "scores"
    STAGE = "probe"

    def __init__(
        self,
        task: str = "gender",
        weight_decays: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0),
        lr: float = 1e-3,
        patience: int = 3,
        ks: tuple[int, ...] = (10, 20),
        standardize: bool = True,
        selection: Literal["metric", "loss"] = "metric",
        auc_bins: int | None = None,
        predict_dir: str | None = None,
    ):
        super().__init__(predict_dir)
        if not weight_decays or min(weight_decays) < 0:
            raise ValueError(f"weight_decays must be a non-empty list of values >= 0, got {weight_decays}")
        self.save_settings()
        self.weight_decays = [float(w) for w in weight_decays]
        self.ks = tuple(sorted(int(k) for k in ks))
        self.heads: LinearHeads | None = None

    # ------------------------------------------------------------------ building
    def data_dims(self, datamodule) -> dict:
        """Input width and task from a DataModule of representation batches."""
        if getattr(datamodule, "batch_kind", None) != "representations":
            raise DataError("ProbeStage reads representation batches: set data.representation_dir to a stage "
                            "output with a user_emb column (e.g. a stage-1 predict output).")
        kind, outputs = probe_task(datamodule.spec, int(datamodule.meta["num_items"]), self.hparams.task)
        return {"input_dim": len(datamodule.input_table[0]["user_emb"]), "task": self.hparams.task,
                "kind": kind, "outputs": outputs}

    def build_nets(self, dims: dict) -> None:
        """The heads and the state the probe keeps: input statistics and the best head."""
        G, C, D = len(self.weight_decays), dims["outputs"], dims["input_dim"]
        self.kind = dims["kind"]
        self.heads = LinearHeads(G, D, C)
        self.register_buffer("wd", torch.tensor(self.weight_decays))
        self.register_buffer("mean", torch.zeros(D))
        self.register_buffer("std", torch.ones(D))
        self.register_buffer("n_train", torch.tensor(0))  # 0 until the statistics pass has run
        # the best (head, epoch) on validation: frozen parameters, not buffers, so DDP does not
        # broadcast a whole head every step
        self.best_weight = nn.Parameter(torch.zeros(C, D), requires_grad=False)
        self.best_bias = nn.Parameter(torch.zeros(C), requires_grad=False)
        self.register_buffer("best_head", torch.tensor(-1))
        self.register_buffer("best_epoch", torch.tensor(-1))
        self.register_buffer("best_score", torch.tensor(-math.inf, dtype=torch.float64))
        self.val_metrics = nn.ModuleList(task_metrics(self.kind, C, self.ks, self.hparams.auc_bins) for _ in range(G))
        self.val_losses = nn.ModuleList(MeanMetric() for _ in range(G))
        self.test_metrics = task_metrics(self.kind, C, self.ks, self.hparams.auc_bins)

    @property
    def best_weight_decay(self) -> float | None:
        """The weight decay of the head kept on validation (None before the first validation)."""
        return self.weight_decays[int(self.best_head)] if int(self.best_head) >= 0 else None

    @property
    def select_key(self) -> str:
        if self.kind == NEXT_ITEMS:
            return f"ndcg@{max(self.ks)}"
        return "neg_log_loss" if self.hparams.selection == "loss" else SELECTION_METRIC[self.kind]

    def validation_scores(self) -> list[dict[str, float]]:
        """Each head's validation metrics (and ``neg_log_loss``), computed (synced) and reset."""
        per_head = [compute_metrics(m) for m in self.val_metrics]
        for values, loss in zip(per_head, self.val_losses, strict=True):
            values["neg_log_loss"] = -float(loss.compute())
            loss.reset()
        return per_head

    # ------------------------------------------------------------------ forward
    def inputs(self, batch: dict) -> torch.Tensor:
        """The batch's ``user_emb``, standardised (dense inputs)."""
        x = batch["user_emb"]
        return x if x.is_sparse else (x.float() - self.mean) / self.std

    def forward(self, batch: dict) -> torch.Tensor:
        """``[B, G, O]`` logits of every head."""
        return self.heads(self.inputs(batch))

    def best_logits(self, batch: dict) -> torch.Tensor:
        """``[B, O]`` logits of the head kept on validation."""
        if int(self.best_head) < 0:
            raise DataError("this probe has no head chosen on validation yet: fit it with validation users "
                            "(a val loop after each epoch) before test or predict.")
        x = self.inputs(batch)
        z = sparse_linear(x, self.best_weight.T.contiguous()) if x.is_sparse else x @ self.best_weight.T
        return z + self.best_bias

    def targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        return task_targets(self.kind, batch, self.dims["task"], self.dims["outputs"])

    # ------------------------------------------------------------------ the statistics pass
    def on_fit_start(self) -> None:
        if int(self.n_train) == 0:  # a resumed fit has both from its checkpoint
            self.fit_statistics(self.trainer.datamodule.train_dataloader())
            self.score_start(self.trainer.datamodule.val_dataloader())

    def _shard(self, loader: DataLoader):
        """This rank's share (every world_size-th user) of a loader's users, in order."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        shard = Subset(loader.dataset, range(rank, len(loader.dataset), world))
        batch_size = loader.batch_size or loader.batch_sampler.batch_size  # a batch sampler: its batch size
        return DataLoader(shard, batch_size=batch_size, collate_fn=loader.collate_fn)

    @torch.no_grad()
    def fit_statistics(self, loader: DataLoader) -> None:
        """Input mean/std and target frequencies over the train users of ``loader`` (each rank
        reads its share; the sums are all-reduced), then the heads' start: zero weights, the bias
        at the log prior."""
        f64 = {"dtype": torch.float64}
        n, counts = torch.zeros(1, **f64), torch.zeros(self.dims["outputs"], **f64)
        s, ss = torch.zeros(self.dims["input_dim"], **f64), torch.zeros(self.dims["input_dim"], **f64)
        for batch in self._shard(loader):
            x = batch["user_emb"]
            if not x.is_sparse:
                s += x.double().sum(0)
                ss += (x.double() ** 2).sum(0)
            n += x.shape[0]
            counts += self._target_counts(batch)
        n, s, ss, counts = (self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum") for t in (n, s, ss, counts))
        if int(n) == 0:
            raise DataError("the probe's representation holds no train users: predict the representation for "
                            "every split (data.predict_splits).")
        if self.hparams.standardize:  # sparse inputs add nothing to s, ss: mean 0, std 1 (unused)
            mean = s / n
            std = (ss / n - mean ** 2).clamp_min(0).sqrt()
            self.mean.copy_(mean.float())
            self.std.copy_(torch.where(std > STD_EPS, std, torch.ones_like(std)).float())
        self.n_train.fill_(int(n))
        if self.kind in ("binary", "multilabel"):
            prior = torch.log((counts + 1) / (n - counts + 1))
        else:
            prior = torch.log(counts + 1)  # next items: the popularity ranking of the train targets
        self.heads.weight.zero_()
        self.heads.bias.copy_(prior.float().expand_as(self.heads.bias))

    @torch.no_grad()
    def score_start(self, loader: DataLoader) -> None:
        """The start (the prior; for next items the popularity ranking) is the first candidate:
        scored on the validation users of ``loader`` and kept as ``best_epoch`` -1, so the probe
        is never below it on validation."""
        for batch in self._shard(loader):
            self.validation_step(self.transfer_batch_to_device(batch, self.device, 0), 0)
        score = self.validation_scores()[0][self.select_key]  # every head is the same here
        if math.isfinite(score):
            self.best_weight.copy_(self.heads.head_weight(0))
            self.best_bias.copy_(self.heads.bias[0])
            self.best_head.fill_(0)
            self.best_score.fill_(score)

    def _target_counts(self, batch: dict) -> torch.Tensor:
        target, _ = self.targets(batch)
        if self.kind == "multiclass":
            return torch.bincount(target.long(), minlength=self.dims["outputs"]).double()
        return target.double().sum(0).reshape(-1)

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        """AdamW at ``lr`` with no decoupled decay: each head's L2 strength is in its loss (added to
        the gradient, :meth:`on_after_backward`); fused: the next-item head is [D, G, I], 27M
        parameters over 3,706 items, whose per-tensor update was the step's largest cost."""
        return adamw(self, total_steps=self.trainer.estimated_stepping_batches, lr=self.hparams.lr, fused=True)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        target, seen = self.targets(batch)
        losses = head_losses(self.kind, self(batch), target, seen)
        self.log("train/loss", losses.mean(), on_step=True, on_epoch=True, batch_size=batch["user_id"].shape[0],
                 prog_bar=True)
        return losses.sum()

    def on_after_backward(self) -> None:
        """The L2 penalty ``wd/2·‖W‖²`` of each head, added as its gradient ``wd·W`` in place
        (no [D, G, O] temporaries: on the 3,706-item head the penalty through autograd cost as
        much as the data term). Under DDP the gradient is already averaged; W is the same on
        every rank, so adding it after the average is the same sum."""
        grad = self.heads.weight.grad
        if grad is None:
            return
        for g, wd in enumerate(self.weight_decays):
            if wd:
                grad[:, g].add_(self.heads.weight.detach()[:, g], alpha=wd)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        target, seen = self.targets(batch)
        logits = self(batch)
        losses = head_losses(self.kind, logits, target, seen)
        for g, metrics in enumerate(self.val_metrics):
            update_metrics(metrics, self.kind, logits[:, g], target, seen)
            self.val_losses[g].update(losses[g], weight=logits.shape[0])

    def on_validation_epoch_end(self) -> None:
        per_head = self.validation_scores()
        if self.trainer.sanity_checking:
            return
        for wd, values in zip(self.weight_decays, per_head, strict=True):
            for name, value in values.items():
                self.log(f"val/wd={wd:g}/{name}", value, sync_dist=True)
        scores = [v[self.select_key] for v in per_head]
        g = max((i for i in range(len(scores)) if math.isfinite(scores[i])), key=scores.__getitem__, default=0)
        self.log("val/select", scores[g], sync_dist=True, prog_bar=True)
        if self.trainer.state.fn == "fit" and scores[g] > float(self.best_score):
            self.best_weight.copy_(self.heads.head_weight(g))
            self.best_bias.copy_(self.heads.bias[g])
            self.best_head.fill_(g)
            self.best_epoch.fill_(self.current_epoch)
            self.best_score.fill_(scores[g])
        if self.best_weight_decay is not None:
            self.log("val/weight_decay", self.best_weight_decay, sync_dist=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        target, seen = self.targets(batch)
        update_metrics(self.test_metrics, self.kind, self.best_logits(batch), target, seen)

    def on_test_epoch_end(self) -> None:
        for name, value in compute_metrics(self.test_metrics).items():
            self.log(f"test/{name}", value, sync_dist=True)
        self.log("test/weight_decay", self.best_weight_decay, sync_dist=True)

    def configure_callbacks(self):
        return [*super().configure_callbacks(), EarlyStopping(monitor="val/select", mode="max",
                                                              patience=self.hparams.patience)]

    # ------------------------------------------------------------------ predict
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        z = self.best_logits(batch)
        cols = user_columns(batch)
        if self.kind == NEXT_ITEMS:
            _, seen = self.targets(batch)
            top = z.masked_fill(seen, float("-inf")).topk(min(max(self.ks), z.shape[1]), dim=1).indices + 1
            cols["top_items"] = top.cpu().numpy()
        else:
            cols["scores"] = probabilities(self.kind, z).float().cpu().numpy()
        return cols

    def output_info(self) -> dict:
        return {"task": self.dims["task"], "task_kind": self.kind, "best_epoch": int(self.best_epoch),
                "weight_decay": self.best_weight_decay, f"val_{self.select_key}": float(self.best_score)}


@contextlib.contextmanager
def _quiet_lightning():
    lg = logging.getLogger("lightning.pytorch")
    level = lg.level
    lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=PossibleUserWarning)
            yield
    finally:
        lg.setLevel(level)


def fit_probe(stage: ProbeStage, datamodule: L.LightningDataModule, max_epochs: int = 100,
              dims: dict | None = None, accelerator: str = "cpu") -> ProbeStage:
    """Fit ``stage`` on ``datamodule`` with a quiet one-device Trainer (no logger, checkpoint or
    progress bar) and return it, holding the head chosen on validation; ``dims`` (input_dim,
    task, kind, outputs) for a DataModule that is not a ``UserDataModule``."""
    if dims is not None:
        stage.build(dims)
    with _quiet_lightning():
        trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=max_epochs, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0)
        trainer.fit(stage, datamodule=datamodule)
    return stage.eval()
