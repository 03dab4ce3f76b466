"""Full-catalogue top-K ranking metrics with running sums (DDP-safe, no scores kept).

torchmetrics' retrieval metrics keep every prediction in memory; on a full catalogue that is
``users × items`` floats. :class:`TopKRanking` takes the top ``max(ks)`` items per batch and
keeps only the sums of the per-user metrics, reduced by ``sum`` across DDP ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torchmetrics import Metric

MaskLike = torch.Tensor | np.ndarray | sp.spmatrix | sp.sparray


def as_bool_tensor(mask: MaskLike, device: torch.device | str | None = None) -> torch.Tensor:
    """Dense bool tensor from a bool / 0-1 tensor, a numpy array or scipy sparse rows."""
    if sp.issparse(mask):
        mask = mask.toarray()
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    return mask.to(device=device).bool()


class TopKRanking(Metric):
    """Recall@K and NDCG@K over the full item catalogue, kept as running sums.

    Definitions, per user with relevant set ``R`` (after removing excluded items) and the top-K
    list of the scores (excluded items at ``-inf``):

    - ``Recall@K = |top-K ∩ R| / |R|`` (standard recall; it is below 1 whenever ``|R| > K``);
    - ``NDCG@K = DCG@K / IDCG@K`` with ``DCG@K = Σ_{r ≤ K, item_r ∈ R} 1 / log2(r + 1)`` and
      ``IDCG@K = Σ_{r ≤ min(K, |R|)} 1 / log2(r + 1)`` (binary relevance).

    Both are averaged over users. Users whose relevant set is empty are skipped and counted in
    ``n_skipped``; ``n_users`` counts the users averaged. Relevant items that are also excluded
    (e.g. a future item already in the history) cannot be ranked and are dropped from ``R``.
    Ties in the scores are broken by ``torch.topk``.

    Args:
        ks: cut-offs K; ``compute()`` returns ``recall@K`` and ``ndcg@K`` for each.
        keep_per_user: also keep every user's values in ``per_user`` (a list of batches of
            :func:`per_user_metrics`; local to this process, not reduced across ranks).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    n_users: torch.Tensor
    n_skipped: torch.Tensor

    def __init__(self, ks: Sequence[int] = (10, 20), keep_per_user: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.per_user: list[dict[str, torch.Tensor]] | None = [] if keep_per_user else None
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive cut-offs, got {ks}")
        self.ks = tuple(sorted(set(int(k) for k in ks)))
        for k in self.ks:
            self.add_state(f"recall_sum_{k}", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"ndcg_sum_{k}", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_users", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("n_skipped", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _add(self, name: str, value: torch.Tensor) -> None:
        """Add ``value`` to the state called ``name``."""
        setattr(self, name, getattr(self, name) + value)

    def update(self, scores: torch.Tensor, relevant: MaskLike, exclude: MaskLike | None = None) -> None:
        """Add a batch of users.

        Args:
            scores: ``[B, I]`` item scores (higher ranks first).
            relevant: ``[B, I]`` bool mask (tensor, array or scipy sparse rows) of relevant items.
            exclude: optional ``[B, I]`` bool mask of items never ranked (history items); they
                are set to ``-inf``.
        """
        scores = torch.as_tensor(scores).to(device=self.n_users.device, dtype=torch.float32)
        rel = as_bool_tensor(relevant, scores.device)
        if rel.shape != scores.shape:
            raise ValueError(f"relevant has shape {tuple(rel.shape)}, scores {tuple(scores.shape)}")
        if exclude is not None:
            excl = as_bool_tensor(exclude, scores.device)
            scores = scores.masked_fill(excl, float("-inf"))
            rel = rel & ~excl
        n_rel = rel.sum(dim=1)
        keep = n_rel > 0
        self.n_skipped += (~keep).sum()
        self.n_users += keep.sum()
        if not keep.any():
            return
        self._add_batch(scores[keep], rel[keep], n_rel[keep].double())

    def _add_batch(self, scores: torch.Tensor, rel: torch.Tensor, n_rel: torch.Tensor) -> None:
        """Accumulate recall and NDCG sums of users that all have relevant items."""
        values = per_user_metrics(scores, rel, n_rel, self.ks)
        for name, v in values.items():
            self._add(name.replace("@", "_sum_"), v.sum())
        if self.per_user is not None:
            self.per_user.append(values)

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean metrics over users: ``{'recall@K', 'ndcg@K'}`` for each K (NaN with no users)."""
        n = self.n_users.double()
        out: dict[str, torch.Tensor] = {}
        for k in self.ks:
            out[f"recall@{k}"] = getattr(self, f"recall_sum_{k}") / n
            out[f"ndcg@{k}"] = getattr(self, f"ndcg_sum_{k}") / n
        return out


def per_user_metrics(
    scores: torch.Tensor, rel: torch.Tensor, n_rel: torch.Tensor, ks: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Per-user ``{'recall@K', 'ndcg@K'}`` ``[B]`` float64 of users that all have relevant items
    (``rel`` already without excluded items, ``n_rel`` its row sums); definitions as in
    :class:`TopKRanking`."""
    k_max = min(max(ks), scores.shape[1])
    top = scores.topk(k_max, dim=1).indices
    hits = rel.gather(1, top).double()  # [B, k_max], 1 where the r-th item is relevant
    ranks = torch.arange(k_max, device=scores.device, dtype=torch.float64)
    discounts = 1.0 / torch.log2(ranks + 2.0)  # rank r (1-based) → 1 / log2(r + 1)
    ideal = discounts.cumsum(0)  # ideal[n - 1] = IDCG with n relevant items in the top
    out = {}
    for k in ks:
        kk = min(k, k_max)
        dcg = (hits[:, :kk] * discounts[:kk]).sum(1)
        out[f"recall@{k}"] = hits[:, :kk].sum(1) / n_rel
        out[f"ndcg@{k}"] = dcg / ideal[n_rel.clamp(max=kk).long() - 1]
    return out


ScoreFn = Callable[[np.ndarray], torch.Tensor | np.ndarray]


def evaluate_ranking(
    score_fn: ScoreFn,
    users: np.ndarray,
    history: sp.csr_matrix,
    future: sp.csr_matrix,
    ks: Sequence[int] = (10, 20),
    batch_size: int = 1024,
    per_user_out: dict | None = None,
) -> dict[str, float]:
    """Rank all items not in each user's history; relevant = the user's future items.

    Args:
        score_fn: maps an array of user indices ``[B]`` to item scores ``[B, I]``.
        users: indices of the users to evaluate.
        history: ``[U, I]`` history interactions (nonzero = excluded from the ranking).
        future: ``[U, I]`` future interactions (nonzero = relevant).
        ks: cut-offs.
        batch_size: users scored at a time (bounds memory to ``batch_size × I`` scores).
        per_user_out: if given, receives ``{'recall@K', 'ndcg@K'}`` → ``[n]`` float64 arrays of
            the users with relevant items, in ``users`` order (e.g. for a paired bootstrap).

    Returns:
        ``{'recall@K', 'ndcg@K'}`` as floats for each K in ``ks``.
    """
    metric = TopKRanking(ks, keep_per_user=per_user_out is not None)
    users = np.asarray(users)
    for start in range(0, users.size, batch_size):
        batch = users[start : start + batch_size]
        scores = torch.as_tensor(score_fn(batch))
        metric.update(scores, future[batch], exclude=history[batch])
    if per_user_out is not None:
        for k in metric.compute():
            per_user_out[k] = (torch.cat([p[k] for p in metric.per_user]).cpu().numpy() if metric.per_user
                               else np.zeros(0))
    return {name: float(value) for name, value in metric.compute().items()}
