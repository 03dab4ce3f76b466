"""The built-in, parameter-free slice features: what the tokenizer reads when no stage 1 ran.

For every (user, window, source) slice with at least one event::

    [ mean text embedding (d) | mean item code (item_dim) | category histogram (C) |
      log1p(count), signed-log mean value, signed-log std value | mean hour and weekday (sin, cos) ]

Values (amounts, ratings) enter through a signed log so that a large amount does not swamp the
reconstruction loss of its source.

Item codes are fixed random Gaussian vectors (seeded), so identical items pool to identical
features without any learning. The profile (tabular) source, when the data set has one, is one
more slice per user at window 0 whose first F entries are the standardised profile fields.
"""

from __future__ import annotations

import torch
from torch import nn

STATS = 3  # log1p(count), mean value, std value
TIME = 4  # sin/cos of hour of day and of day of week, averaged over the slice's events
SECONDS_PER_DAY = 86_400
SECONDS_PER_WEEK = 7 * SECONDS_PER_DAY


class PooledSliceFeatures(nn.Module):
    """Events of an event batch → one feature vector per present (user, window, source) slice."""

    def __init__(self, num_sources: int, num_items: int, num_categories: int, text_dim: int,
                 tabular_dim: int = 0, item_dim: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        codes = torch.randn(num_items + 1, item_dim, generator=g) / item_dim**0.5
        codes[0] = 0.0  # item 0 = no item
        self.register_buffer("item_codes", codes, persistent=False)
        self.num_sources = num_sources
        self.num_categories = num_categories
        self.text_dim = text_dim
        self.tabular_dim = tabular_dim
        self.dim = text_dim + item_dim + num_categories + STATS + TIME
        if tabular_dim > self.dim:
            raise ValueError(f"tabular width {tabular_dim} exceeds the slice feature width {self.dim}")

    @property
    def total_sources(self) -> int:
        return self.num_sources + (1 if self.tabular_dim else 0)

    @torch.no_grad()
    def forward(self, batch: dict) -> dict:
        """Returns slice_user, slice_window, slice_source [N] and feat [N, dim], slices sorted by user."""
        mask = batch["ev_mask"]
        B, E = mask.shape
        W = int(batch["win_mask"].shape[1])
        S = self.num_sources
        slot = (batch["ev_window"] * S + batch["ev_source"]).clamp(max=W * S - 1)
        flat = (torch.arange(B, device=mask.device)[:, None] * (W * S) + slot)[mask]
        n_slots = B * W * S
        w = torch.ones_like(flat, dtype=torch.float32)
        count = torch.zeros(n_slots, device=mask.device).index_add_(0, flat, w)

        def mean_of(x: torch.Tensor) -> torch.Tensor:
            acc = torch.zeros(n_slots, x.shape[-1], device=x.device).index_add_(0, flat, x)
            return acc / count.clamp(min=1)[:, None]

        text = mean_of(batch["ev_text_emb"][mask].float())
        items = mean_of(self.item_codes[batch["ev_item"][mask]])
        cat = batch["ev_category"][mask]
        hist = torch.zeros(flat.shape[0], self.num_categories, device=mask.device)
        has = cat >= 0
        hist[has.nonzero().squeeze(1), cat[has]] = 1.0
        cats = mean_of(hist) if self.num_categories else hist.new_zeros(n_slots, 0)
        val = batch["ev_value"][mask].float()[:, None]
        m1, m2 = mean_of(val), mean_of(val**2)
        std = (m2 - m1**2).clamp(min=0).sqrt()
        t = batch["ev_time"][mask]
        day_angle = (t % SECONDS_PER_DAY).double() / SECONDS_PER_DAY * 2 * torch.pi
        week_angle = ((t + 3 * SECONDS_PER_DAY) % SECONDS_PER_WEEK).double() / SECONDS_PER_WEEK * 2 * torch.pi
        clock = mean_of(torch.stack([day_angle.sin(), day_angle.cos(), week_angle.sin(), week_angle.cos()], 1).float())
        slog = lambda x: torch.sign(x) * torch.log1p(x.abs())  # noqa: E731
        feat = torch.cat([text, items, cats, torch.log1p(count)[:, None], slog(m1), slog(std), clock], dim=1)
        present = count > 0
        idx = present.nonzero().squeeze(1)
        out = {
            "slice_user": idx // (W * S),
            "slice_window": (idx % (W * S)) // S,
            "slice_source": idx % S,
            "feat": feat[idx],
        }
        if self.tabular_dim:
            tab = torch.zeros(B, self.dim, device=mask.device)
            tab[:, : self.tabular_dim] = batch["tabular"].float()
            users = torch.arange(B, device=mask.device)
            out = {
                "slice_user": torch.cat([out["slice_user"], users]),
                "slice_window": torch.cat([out["slice_window"], torch.zeros_like(users)]),
                "slice_source": torch.cat([out["slice_source"], torch.full_like(users, S)]),
                "feat": torch.cat([out["feat"], tab]),
            }
            order = torch.sort(out["slice_user"] * (W * (S + 1)) + out["slice_window"] * (S + 1)
                               + out["slice_source"]).indices
            out = {k: v[order] for k, v in out.items()}
        return out


def mean_by_user(feat: torch.Tensor, slice_user: torch.Tensor, num_users: int) -> torch.Tensor:
    """[N, D] slice features → [num_users, D] mean per user (zeros for a user with no slice)."""
    acc = torch.zeros(num_users, feat.shape[1], device=feat.device).index_add_(0, slice_user, feat.float())
    n = torch.bincount(slice_user, minlength=num_users).clamp_min(1)
    return acc / n[:, None]
