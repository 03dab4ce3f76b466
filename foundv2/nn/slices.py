"""Slice features: one vector per (user, window, source) slice of an event batch, in one place.

- the clock and signed-log transforms every feature uses (:func:`clock_features`,
  :func:`signed_log1p`), and slice counting (:func:`slice_presence`);
- :class:`PooledSliceFeatures`, the built-in, parameter-free features the tokenizer reads when no
  stage 1 ran::

      [ mean text embedding (d) | mean item code (item_dim) | category histogram (C) |
        log1p(count), signed-log mean value, signed-log std value | mean hour and weekday (sin, cos) |
        the window's calendar position and the user's tenure at it (calendar_dim, see below) ]

  Values (amounts, ratings) enter through a signed log so that a large amount does not swamp the
  reconstruction loss of its source. Item codes are fixed random Gaussian vectors (seeded), so
  identical items pool to identical features without any learning;
- :func:`pooled_slice_targets`, stage 1's reconstruction targets (text, count, value, clock), and
  :class:`TextSliceFeatures`, the frozen ``text_encoder`` backbone built on them;
- absolute time: with ``calendar_dim`` > 0 (``UserDataModule.dims()['calendar_dim']``, on
  where the data has calendar time) every slice also carries its window's ``win_calendar``
  (``data_modules.prepare.window_calendar``: position in the data set's calendar, tenure), so
  the mean over a user's slices holds the first active day (mean position minus mean tenure):
  a label tied to the calendar is a linear read-out (:func:`window_calendar_of`);
- the flat slice layout every stage output uses (:func:`flat_slices`) and the profile slice
  (:func:`add_profile_slices`): when the data set has profile inputs, one more slice per user
  at window 0 (source index S) whose first F entries are the standardised profile fields.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from data_modules.prepare import EPOCH_WEEKDAY_SHIFT, SECONDS_PER_DAY

SECONDS_PER_HOUR = 3600
DAYS_PER_WEEK = 7
HOURS_PER_DAY = 24


def signed_log1p(x: torch.Tensor) -> torch.Tensor:
    """``sign(x) * log1p(|x|)``: compresses amounts that span decades, keeps the sign."""
    return torch.sign(x) * torch.log1p(x.abs())


def clock_features(ev_time: torch.Tensor) -> torch.Tensor:
    """[..., 4] hour-of-day sin/cos and day-of-week sin/cos (UTC) of unix times [...].

    The one clock of every feature (events, pooled slices, reconstruction targets): the hour is
    continuous, the weekday is the calendar day's (0 = Monday, as the prepared data's week keys).
    """
    tau = 2 * math.pi
    hour = (ev_time % SECONDS_PER_DAY).float() / SECONDS_PER_HOUR
    day = ((ev_time // SECONDS_PER_DAY + EPOCH_WEEKDAY_SHIFT) % DAYS_PER_WEEK).float()
    return torch.stack(
        [
            torch.sin(tau * hour / HOURS_PER_DAY),
            torch.cos(tau * hour / HOURS_PER_DAY),
            torch.sin(tau * day / DAYS_PER_WEEK),
            torch.cos(tau * day / DAYS_PER_WEEK),
        ],
        dim=-1,
    )


def slice_presence(
    ev_window: torch.Tensor,
    ev_source: torch.Tensor,
    ev_mask: torch.Tensor,
    num_windows: int,
    num_sources: int,
) -> torch.Tensor:
    """Event counts per (user, window, source): [B, W, S] float (events of window ≥ W dropped)."""
    b = ev_window.shape[0]
    ok = ev_mask & (ev_window >= 0) & (ev_window < num_windows) & (ev_source >= 0) & (ev_source < num_sources)
    idx = torch.where(ok, ev_window * num_sources + ev_source, torch.zeros_like(ev_window))
    counts = torch.zeros(b, num_windows * num_sources, device=ev_window.device)
    counts.scatter_add_(1, idx, ok.float())
    return counts.view(b, num_windows, num_sources)


def flat_slices(values: torch.Tensor, present: torch.Tensor) -> dict:
    """[B, W, S, D] values and [B, W, S] presence → flat slices sorted by (user, window, source)."""
    u, w, s = present.nonzero(as_tuple=True)
    return {"slice_user": u, "slice_window": w, "slice_source": s, "feat": values[u, w, s]}


def add_profile_slices(out: dict, profile: torch.Tensor, num_sources: int) -> dict:
    """Append one profile slice per user (window 0, source index ``num_sources``) and re-sort
    the slices by (user, window, source), as :class:`PooledSliceFeatures` orders them."""
    users = torch.arange(profile.shape[0], device=profile.device)
    merged = {
        "slice_user": torch.cat([out["slice_user"], users]),
        "slice_window": torch.cat([out["slice_window"], torch.zeros_like(users)]),
        "slice_source": torch.cat([out["slice_source"], torch.full_like(users, num_sources)]),
        "feat": torch.cat([out["feat"], profile.to(out["feat"].dtype)]),
    }
    width = int(merged["slice_window"].max()) + 1 if len(users) else 1
    key = (merged["slice_user"] * width + merged["slice_window"]) * (num_sources + 1) + merged["slice_source"]
    order = torch.sort(key, stable=True).indices
    return {k: v[order] for k, v in merged.items()}


def window_calendar_of(batch: Mapping[str, torch.Tensor], user: torch.Tensor, window: torch.Tensor,
                       calendar_dim: int) -> torch.Tensor:
    """[N, calendar_dim] the ``win_calendar`` of the (user, window) pairs given ([N] each);
    [N, 0] when ``calendar_dim`` is 0 (a net built without absolute time reads nothing)."""
    if calendar_dim == 0:
        return torch.zeros(user.shape[0], 0, device=user.device)
    if "win_calendar" not in batch:
        raise KeyError("this net reads absolute time (calendar_dim > 0) but the batch has no 'win_calendar': "
                       "build it with UserDataModule's EventCollate, or with calendar_dim 0")
    return batch["win_calendar"][user, window].float()


#: pooled statistics after the text part of a slice target: log1p(count), mean signed-log
#: value, mean hour-of-day sin/cos, mean day-of-week sin/cos
SLICE_STATS = 6


def slice_target_dim(text_dim: int) -> int:
    """Width of :func:`pooled_slice_targets` for a text width ``text_dim``."""
    return text_dim + SLICE_STATS


def pooled_slice_targets(
    batch: Mapping[str, torch.Tensor], num_sources: int, max_windows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled input features of every (user, window, source) slice of an event batch.

    Features (``d + SLICE_STATS`` wide): the mean text embedding of the slice's events that
    have text (zeros if none), then ``log1p(number of events)``, the mean of
    ``sign(v)·log1p(|v|)`` over the events' values (amounts, ratings), and the mean hour-of-day
    and day-of-week sin/cos of the events. Reconstructing the value and the clock, not only the
    text, is what keeps "how much" and "when" in the views: with text and count alone the
    Q-Former's views lost the spending level that pooled features carry.

    Args:
        batch: an event batch (``data_modules/batch.py``).
        num_sources: S.
        max_windows: W of the output (events of later windows are ignored); default: the
            batch's window count ``win_mask.shape[1]``.

    Returns:
        ``(targets [B, W, S, d + SLICE_STATS], present [B, W, S] bool)``; present = the slice
        has ≥ 1 event (and is a real window).
    """
    mask = batch["ev_mask"]
    win, src = batch["ev_window"], batch["ev_source"]
    b = mask.shape[0]
    w_count = max_windows if max_windows is not None else batch["win_mask"].shape[1]
    text = batch["ev_text_emb"].float()
    d = text.shape[-1]
    ok = mask & (win >= 0) & (win < w_count) & (src >= 0) & (src < num_sources)
    idx = torch.where(ok, win * num_sources + src, torch.zeros_like(win))
    has_text = ok & (batch["ev_text"] >= 0) if "ev_text" in batch else ok
    n_slices = w_count * num_sources

    def slice_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ over each slice's events of x [B, E, k] weighted by w [B, E] → [B, n_slices, k]."""
        out = torch.zeros(b, n_slices, x.shape[-1], device=mask.device)
        return out.scatter_add_(1, idx[..., None].expand(-1, -1, x.shape[-1]), x * w[..., None])

    count = torch.zeros(b, n_slices, device=mask.device).scatter_add_(1, idx, ok.float())
    n_text = torch.zeros(b, n_slices, device=mask.device).scatter_add_(1, idx, has_text.float())
    mean_text = slice_sum(text, has_text.float()) / n_text.clamp_min(1)[..., None]
    value = signed_log1p(batch["ev_value"].float().nan_to_num(0.0))[..., None]
    stats = torch.cat([value, clock_features(batch["ev_time"])], dim=-1)
    mean_stats = slice_sum(stats, ok.float()) / count.clamp_min(1)[..., None]
    targets = torch.cat([mean_text, torch.log1p(count)[..., None], mean_stats], dim=-1)
    present = count > 0
    wm = batch.get("win_mask")
    if wm is not None:
        wm = wm[:, :w_count]
        if wm.shape[1] < w_count:
            wm = torch.cat([wm, wm.new_zeros(b, w_count - wm.shape[1])], dim=1)
        present = present & wm.repeat_interleave(num_sources, dim=1)
    width = slice_target_dim(d)
    return targets.view(b, w_count, num_sources, width), present.view(b, w_count, num_sources)


STATS = 3  # log1p(count), mean value, std value
TIME = 4  # clock_features (hour of day, day of week: sin/cos), averaged over the slice's events


class PooledSliceFeatures(nn.Module):
    """Events of an event batch → one feature vector per present (user, window, source) slice."""

    def __init__(self, num_sources: int, num_items: int, num_categories: int, text_dim: int,
                 tabular_dim: int = 0, item_dim: int = 32, seed: int = 0, calendar_dim: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        codes = torch.randn(num_items + 1, item_dim, generator=g) / item_dim**0.5
        codes[0] = 0.0  # item 0 = no item
        self.register_buffer("item_codes", codes, persistent=False)
        self.num_sources = num_sources
        self.num_categories = num_categories
        self.text_dim = text_dim
        self.tabular_dim = tabular_dim
        self.calendar_dim = calendar_dim
        self.dim = text_dim + item_dim + num_categories + STATS + TIME + calendar_dim
        if tabular_dim > self.dim:
            raise ValueError(f"tabular width {tabular_dim} exceeds the slice feature width {self.dim}")

    def feature_groups(self) -> dict[str, tuple[int, int]]:
        """(start, stop) columns of each named part of a behaviour slice's feature vector, in
        order: ``text``, ``item``, ``category``, ``count`` (log1p), ``value`` (signed-log mean
        and std), ``clock`` (mean hour and weekday sin/cos), ``calendar`` (may be empty)."""
        widths = {"text": self.text_dim, "item": self.item_codes.shape[1], "category": self.num_categories,
                  "count": 1, "value": STATS - 1, "clock": TIME, "calendar": self.calendar_dim}
        out, start = {}, 0
        for name, width in widths.items():
            out[name] = (start, start + width)
            start += width
        return out

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
        clock = mean_of(clock_features(batch["ev_time"][mask]))
        feat = torch.cat([text, items, cats, torch.log1p(count)[:, None], signed_log1p(m1), signed_log1p(std), clock], dim=1)
        present = count > 0
        idx = present.nonzero().squeeze(1)
        user, window = idx // (W * S), (idx % (W * S)) // S
        out = {
            "slice_user": user,
            "slice_window": window,
            "slice_source": idx % S,
            "feat": torch.cat([feat[idx], window_calendar_of(batch, user, window, self.calendar_dim)], dim=1),
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


class TextSliceFeatures(nn.Module):
    """Frozen slice features (FOUNDv2 v2): the slice's pooled text, count, value and clock
    (:func:`pooled_slice_targets`, no learning), then its window's calendar position
    (``calendar_dim`` wide, as :class:`PooledSliceFeatures`); the profile slice holds the
    standardised profile fields in its first F entries (zeros after)."""

    def __init__(self, num_sources: int, text_dim: int, tabular_dim: int = 0, calendar_dim: int = 0):
        super().__init__()
        self.num_sources, self.tabular_dim, self.calendar_dim = num_sources, tabular_dim, calendar_dim
        self.dim = slice_target_dim(text_dim) + calendar_dim
        if tabular_dim > self.dim:
            raise ValueError(f"tabular width {tabular_dim} exceeds the slice feature width {self.dim}")

    @torch.no_grad()
    def forward(self, batch: dict) -> dict:
        target, present = pooled_slice_targets(batch, self.num_sources)
        out = flat_slices(target, present)
        calendar = window_calendar_of(batch, out["slice_user"], out["slice_window"], self.calendar_dim)
        out["feat"] = torch.cat([out["feat"], calendar], dim=1)
        if self.tabular_dim:
            tab = batch["tabular"].float()
            profile = torch.zeros(tab.shape[0], self.dim, device=tab.device)
            profile[:, : self.tabular_dim] = tab
            out = add_profile_slices(out, profile, self.num_sources)
        return out
