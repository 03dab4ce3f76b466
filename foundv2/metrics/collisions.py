"""Collisions of whole token tuples: one tuple per (user, window), the codes of every source.

Two rows collide when their tuples are equal: the tokens cannot tell those (user, window) pairs
apart. :func:`window_tuples` builds the tuples, :func:`collision_stats` counts, and
:class:`CollisionRate` is the same as a torchmetrics ``Metric`` fed batch by batch, DDP-safe.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric


def window_tuples(user: Tensor, window: Tensor, source: Tensor, codes: Tensor, num_sources: int) -> Tensor:
    """One row per distinct (user, window): the codes ``[N, L]`` of every source in that window,
    side by side (``[n_windows, num_sources * L]``, -1 where a source is absent)."""
    pairs = torch.stack([user.long(), window.long()], dim=1)
    inv = torch.unique(pairs, dim=0, return_inverse=True)[1] if len(pairs) else pairs.new_zeros(0)
    n_windows = int(inv.max()) + 1 if len(inv) else 0
    out = torch.full((n_windows, num_sources, codes.shape[1]), -1, dtype=torch.long, device=codes.device)
    out[inv, source.long()] = codes.long()
    return out.reshape(n_windows, num_sources * codes.shape[1])


def collision_stats(tuples: Tensor) -> dict[str, float]:
    """Collisions of whole code tuples ``[N, K]`` (one row per (user, window)):
    ``collision_rate`` share of rows whose tuple also occurs in another row, ``max_dup`` the
    largest number of rows sharing one tuple, ``unique_frac`` distinct tuples / rows."""
    n = tuples.shape[0]
    if n == 0:
        return {"collision_rate": 0.0, "max_dup": 0.0, "unique_frac": 1.0}
    _, inverse, counts = torch.unique(tuples, dim=0, return_inverse=True, return_counts=True)
    return {
        "collision_rate": float((counts[inverse] > 1).float().mean()),
        "max_dup": float(counts.max()),
        "unique_frac": counts.numel() / n,
    }


def collisions_by_sources(tuples: Tensor, num_sources: int) -> dict[str, dict[str, float]]:
    """``collision_rate`` of the tuples ``[N, num_sources * L]`` (from :func:`window_tuples`)
    split by how many sources the window holds (``"1"``, ``"2"``, ...): with ``windows``, each
    group's share of all windows. A window of one source can only collide with another window
    of that one source, so small windows are where a code tuple runs out of room first."""
    n = tuples.shape[0]
    if n == 0:
        return {}
    _, inverse, counts = torch.unique(tuples, dim=0, return_inverse=True, return_counts=True)
    repeated = counts[inverse] > 1
    present = (tuples.view(n, num_sources, -1)[:, :, 0] >= 0).sum(1)
    out = {}
    for k in torch.unique(present).tolist():
        m = present == k
        out[str(k)] = {"windows": float(m.float().mean()), "collision_rate": float(repeated[m].float().mean())}
    return out


class CollisionRate(Metric):
    """:func:`collision_stats` of the (user, window) tuples of every slice seen since the last
    reset, over all DDP ranks.

    ``update(user, window, source, codes)`` takes one batch's slices: a global user id, a window
    id unique within the user, the source index and the codes ``[N, L]``. The states are the
    slices themselves (concatenated across ranks at ``compute``), so slices of one user split
    over batches or ranks still form one tuple, and a slice seen twice (a distributed sampler
    pads ranks by repeating users) counts once.
    """

    full_state_update = False

    def __init__(self, num_sources: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_sources = num_sources
        self.add_state("slices", default=[], dist_reduce_fx="cat")  # [N, 3 + L]: user, window, source, codes

    def update(self, user: Tensor, window: Tensor, source: Tensor, codes: Tensor) -> None:
        self.slices.append(torch.cat([user[:, None], window[:, None], source[:, None], codes], dim=1).long())

    def compute(self) -> dict[str, float]:
        rows = self.slices if isinstance(self.slices, Tensor) else (
            torch.cat(self.slices) if self.slices else torch.zeros(0, 4, dtype=torch.long, device=self.device))
        rows = torch.unique(rows, dim=0) if len(rows) else rows  # a repeated slice counts once
        return collision_stats(window_tuples(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3:], self.num_sources))


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of an integer array ``[N, K]`` (splitmix64 folded over the row):
    one int64 per row, however long the tuple, for :func:`collision_stats` over millions of rows
    (a chance equality of two hashes of different tuples has probability ~n²/2⁶⁵)."""
    from data_modules.buckets import GOLDEN64, splitmix64

    h = np.full(len(rows), GOLDEN64, dtype=np.uint64)
    for k in range(rows.shape[1]):
        h = splitmix64(h ^ rows[:, k].astype(np.int64).astype(np.uint64))
    return h.view(np.int64)
