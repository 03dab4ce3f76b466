"""Per-source event encoders and the tabular (profile) MLP of stage 1.

:class:`EventEncoder` maps every event of an *event batch* (see ``data_modules/batch.py``) to
one vector of width ``dim``. It is the sum of

- an item-id embedding (``num_items + 1`` rows, row 0 = no item / padding, fixed at zero),
- a linear projection of the event's text embedding (only where the event has text),
- a value feature: ``sign(v) * log1p(|v|)`` through a linear layer (amounts span decades),
- time features through one linear layer: hour of day and day of week as sin/cos pairs
  (UTC, from ``ev_time``) and ``log1p`` of the gap in hours since the user's previous event,
- a source embedding and a category embedding (``index + 1``; row 0 = no category),
- absolute time, with ``calendar_dim`` > 0: the ``win_calendar`` of the event's window (its
  position in the data set's calendar and the user's tenure at it, see
  ``data_modules.prepare.window_calendar``) through a linear layer. Clock and gap features are
  periodic or relative; without this no representation knows *when* a user was active, and a
  signup cohort or a lifecycle stage is invisible. A checkpoint from before this input loads
  with the calendar layer's weights at zero, so it predicts exactly as it did,

followed by a LayerNorm. Per-source behaviour comes from the *added source embedding* by
default: it is cheap, keeps every source in one space (what the Q-Former's early fusion
wants) and lets a source with few events share all other weights. With
``per_source_proj=True`` every source also gets its own output linear layer (a loop over the
few sources, each on its own events), for sources whose features mean different things.
Padding events come out as exact zeros.

:class:`TabularEncoder` is an MLP over the standardised profile inputs ``tabular`` [B, F];
with F = 0 it holds no weights and returns ``None``.
"""

from __future__ import annotations

import torch
from torch import nn

from foundv2.nn.slices import SECONDS_PER_HOUR, clock_features, signed_log1p, window_calendar_of

# hour sin/cos, weekday sin/cos, log gap
NUM_TIME_FEATURES = 5


def gap_since_previous(ev_time: torch.Tensor, ev_mask: torch.Tensor) -> torch.Tensor:
    """Seconds since the user's previous real event, in time order ([B, E] float; 0 for a
    user's first event and on padding).

    The events are sorted by time per user first (stable, padding last), so the result does
    not depend on the order of the events in the batch, and an event's gap depends only on
    events that are not later than it (which keeps the encoder causal over windows).
    """
    big = torch.iinfo(torch.int64).max
    t = torch.where(ev_mask, ev_time, torch.full_like(ev_time, big))
    t_sorted, order = torch.sort(t, dim=1, stable=True)
    m_sorted = torch.gather(ev_mask, 1, order)
    prev = torch.cat([t_sorted[:, :1], t_sorted[:, :-1]], dim=1)
    prev_ok = torch.cat([torch.zeros_like(m_sorted[:, :1]), m_sorted[:, :-1]], dim=1) & m_sorted
    gap_sorted = torch.where(prev_ok, (t_sorted - prev).clamp_min(0), torch.zeros_like(t_sorted))
    gap = torch.zeros_like(gap_sorted)
    gap.scatter_(1, order, gap_sorted)
    return gap.float()


def time_features(ev_time: torch.Tensor, ev_mask: torch.Tensor) -> torch.Tensor:
    """[B, E, 5] time features: :func:`clock_features` and ``log1p(gap in hours)`` since the
    user's previous event."""
    gap_h = gap_since_previous(ev_time, ev_mask) / SECONDS_PER_HOUR
    return torch.cat([clock_features(ev_time), torch.log1p(gap_h)[..., None]], dim=-1)


class EventEncoder(nn.Module):
    """Encode every event of an event batch to a ``dim``-wide vector (padding → zeros).

    Args:
        num_sources: number of event sources (``ev_source`` takes values 0..num_sources-1).
        num_items: number of distinct items; ``ev_item`` takes values 1..num_items, 0 = none.
        text_dim: width of ``ev_text_emb``; 0 when the data set has no text.
        dim: output width (the Q-Former width).
        num_categories: size of the category vocabulary; ``ev_category`` is -1 for none.
        per_source_proj: also give each source its own output linear layer (see module doc).
        calendar_dim: width of the batch's ``win_calendar`` to read (0: no absolute time).
    """

    def __init__(
        self,
        num_sources: int,
        num_items: int,
        text_dim: int,
        dim: int,
        num_categories: int = 0,
        per_source_proj: bool = False,
        calendar_dim: int = 0,
    ) -> None:
        super().__init__()
        self.num_sources = num_sources
        self.dim = dim
        self.item = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.text = nn.Linear(text_dim, dim) if text_dim > 0 else None
        self.value = nn.Linear(1, dim)
        self.time = nn.Linear(NUM_TIME_FEATURES, dim)
        self.source = nn.Embedding(num_sources, dim)
        self.category = nn.Embedding(num_categories + 1, dim, padding_idx=0)
        self.calendar_dim = calendar_dim
        self.calendar = nn.Linear(calendar_dim, dim) if calendar_dim > 0 else None
        self.norm = nn.LayerNorm(dim)
        self.source_proj = (
            nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_sources)) if per_source_proj else None
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Encode the events of ``batch`` (an event batch, see ``data_modules/batch.py``).

        Reads ``ev_source, ev_item, ev_text_emb, ev_text (optional), ev_value, ev_time,
        ev_category, ev_mask`` and, with ``calendar_dim`` > 0, ``ev_window, win_calendar``.
        Returns [B, E, dim]; rows of padding events are zero.
        """
        mask = batch["ev_mask"]
        src = batch["ev_source"].clamp(0, self.num_sources - 1)
        h = self.item(batch["ev_item"].clamp_min(0))
        if self.text is not None and "ev_text_emb" in batch:
            has_text = batch["ev_text"] >= 0 if "ev_text" in batch else mask
            h = h + self.text(batch["ev_text_emb"].float()) * has_text.unsqueeze(-1)
        h = h + self.value(signed_log1p(batch["ev_value"].float()).unsqueeze(-1))
        h = h + self.time(time_features(batch["ev_time"], mask))
        h = h + self.source(src)
        h = h + self.category((batch["ev_category"] + 1).clamp_min(0))
        if self.calendar is not None:
            b, e = mask.shape
            users = torch.arange(b, device=mask.device).repeat_interleave(e)
            windows = batch["ev_window"].clamp(0, batch["win_mask"].shape[1] - 1).reshape(-1)
            h = h + self.calendar(window_calendar_of(batch, users, windows, self.calendar_dim).view(b, e, -1))
        h = self.norm(h)
        if self.source_proj is not None:
            out = torch.zeros_like(h)
            for s, proj in enumerate(self.source_proj):
                sel = src == s
                out[sel] = proj(h[sel])
            h = out
        return h * mask.unsqueeze(-1)


class TabularEncoder(nn.Module):
    """MLP over the standardised profile inputs ``tabular`` [B, F] → [B, dim].

    Args:
        in_features: F, the number of profile inputs; 0 → no weights, ``forward`` returns None.
        dim: output width.
        hidden: hidden width of the MLP (default ``2 * dim``).
    """

    def __init__(self, in_features: int, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        hidden = hidden or 2 * dim
        self.mlp = (
            nn.Sequential(
                nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.LayerNorm(dim)
            )
            if in_features > 0
            else None
        )

    def forward(self, tabular: torch.Tensor) -> torch.Tensor | None:
        """[B, F] → [B, dim], or None when there are no profile inputs (F = 0)."""
        if self.mlp is None or tabular.shape[-1] == 0:
            return None
        return self.mlp(tabular.float())
