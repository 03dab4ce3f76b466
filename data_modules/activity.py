"""A user's activity features: what any event log says without item ids or text.

Per source: ``log1p`` event count, share of the user's events, and of its finite values the
mean, std and ``log1p`` of the absolute sum. Over all events: ``log1p`` count, active days,
events per active day (frequency), tenure (last − first event, days), recency and the first
active day as days before a reference date, and the last event's day of week (sin, cos). A user
without history gets zeros and a "no history" flag.

One function computes them for every consumer, from a ragged column (flat events and per-user
offsets, as the prepared table stores them): the bench's ``activity`` baseline and the event
batches, whose ``activity`` column stage 1 can put beside its learned state in ``user_emb``.
Vectorised over the users (no Python loop per user), so a batch of any size costs a few array
passes.
"""

from __future__ import annotations

import numpy as np

from data_modules.prepare import EPOCH_WEEKDAY_SHIFT, SECONDS_PER_DAY

DAY = float(SECONDS_PER_DAY)
PER_SOURCE = ("log_count", "share", "value_mean", "value_std", "value_log_abs_sum")
OVERALL = ("log_count", "active_days", "events_per_day", "tenure_days", "recency_days", "first_day_before_ref",
           "last_dow_sin", "last_dow_cos", "no_history")


def activity_names(n_sources: int) -> list[str]:
    """The feature names, in column order: ``kind/source`` per source, then the overall ones."""
    return [f"{kind}/{s}" for s in range(n_sources) for kind in PER_SOURCE] + list(OVERALL)


def activity_dim(n_sources: int) -> int:
    """Width of :func:`activity_features` for ``n_sources`` event sources."""
    return len(PER_SOURCE) * n_sources + len(OVERALL)


def activity_reference_from_calendar(calendar: dict) -> float:
    """The reference date (seconds) of a prepared data set: the end of the training users' last
    history day (``meta['calendar']['end_day']``), which validation and test users never set."""
    return (float(calendar["end_day"]) + 1.0) * DAY


def activity_features(offsets: np.ndarray, source: np.ndarray, time: np.ndarray, value: np.ndarray,
                      n_sources: int, reference: float) -> np.ndarray:
    """[U, :func:`activity_dim`] float32 activity features of U users.

    Args:
        offsets: [U + 1] where each user's events start in the flat arrays.
        source: [N] source index of each event (0..n_sources-1).
        time: [N] seconds.
        value: [N] the event's value (NaN where none: left out of the value statistics).
        reference: the date recency and first day count back from (seconds), e.g. the latest
            history event of the training users.
    """
    offsets = np.asarray(offsets, np.int64)
    U = len(offsets) - 1
    n = np.diff(offsets)
    user = np.repeat(np.arange(U), n)
    src = np.asarray(source, np.int64)
    t = np.asarray(time, np.float64)
    v = np.asarray(value, np.float64)
    out = np.zeros((U, activity_dim(n_sources)), np.float64)
    has = n > 0
    count = np.maximum(n, 1).astype(np.float64)

    finite = np.isfinite(v)
    v0 = np.where(finite, v, 0.0)
    cell = user * n_sources + src  # (user, source) cells
    size = U * n_sources
    per = lambda w: np.bincount(cell, weights=w, minlength=size).astype(np.float64).reshape(U, n_sources)  # noqa: E731
    events = per(None)
    k = per(finite.astype(np.float64))
    total = per(v0)
    mean = np.divide(total, k, out=np.zeros_like(total), where=k > 0)
    var = np.divide(per(v0 * v0), k, out=np.zeros_like(total), where=k > 0) - mean ** 2
    block = np.stack([np.log1p(events), events / count[:, None], mean, np.sqrt(np.maximum(var, 0.0)),
                      np.log1p(np.abs(total))], axis=2)  # [U, S, 5]
    out[:, : len(PER_SOURCE) * n_sources] = block.reshape(U, len(PER_SOURCE) * n_sources)

    first = np.zeros(U)
    last = np.zeros(U)
    active = np.zeros(U)
    if len(t):
        first[has] = np.minimum.reduceat(t, offsets[:-1][has])
        last[has] = np.maximum.reduceat(t, offsets[:-1][has])
        day = np.floor(t / DAY)
        order = np.lexsort((day, user))  # distinct (user, day) pairs
        u_sorted, d_sorted = user[order], day[order]
        new = np.ones(len(order), bool)
        new[1:] = (u_sorted[1:] != u_sorted[:-1]) | (d_sorted[1:] != d_sorted[:-1])
        active = np.bincount(u_sorted[new], minlength=U).astype(np.float64)
    dow = (np.floor(last / DAY) + EPOCH_WEEKDAY_SHIFT) % 7
    tau = 2 * np.pi
    overall = np.stack([np.log1p(n), active, n / np.maximum(active, 1), (last - first) / DAY,
                        (reference - last) / DAY, (reference - first) / DAY,
                        np.sin(tau * dow / 7), np.cos(tau * dow / 7), np.zeros(U)], axis=1)
    out[:, len(PER_SOURCE) * n_sources:] = np.where(has[:, None], overall, 0.0)
    out[~has, -1] = 1.0  # per-source columns are 0 already: no event, no count, share or value
    return out.astype(np.float32)
