"""The synthetic generator: determinism, schema, chunking, and that its planted signal is recoverable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_modules.schema import validate_events, validate_users
from data_modules.sources import synthetic as syn
from data_modules.sources.synthetic import (
    CATEGORIES,
    EPOCH,
    ITEM_ID_STRIDE,
    MIN_EVENTS,
    SYNTHETIC_SOURCES,
    generate_synthetic,
    load_synthetic,
    synthetic_spec,
)

N_USERS = 3000
DAYS = 56
CHANCE = 1.0 / len(syn.ARCHETYPES)


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    return load_synthetic(N_USERS, seed=7, chunk_users=1000, days=DAYS)


def _future_mask(ev: pd.DataFrame) -> np.ndarray:
    """The last ceil(20%) of each user's events (events are sorted by user, time)."""
    pos = ev.groupby("user_id").cumcount().to_numpy()
    n = ev.groupby("user_id")["user_id"].transform("size").to_numpy()
    return pos >= n - np.ceil(0.2 * n)


def test_same_seed_same_data_other_seed_differs() -> None:
    ev1, us1 = load_synthetic(500, seed=3)
    ev2, us2 = load_synthetic(500, seed=3)
    pd.testing.assert_frame_equal(ev1, ev2)
    pd.testing.assert_frame_equal(us1, us2)
    ev3, us3 = load_synthetic(500, seed=4)
    assert len(ev3) != len(ev1) or not ev3.equals(ev1)
    assert not us3.equals(us1)


def test_independent_of_chunk_size_and_n_users() -> None:
    ev_a, us_a = load_synthetic(2500, seed=1, chunk_users=700)
    ev_b, us_b = load_synthetic(2500, seed=1, chunk_users=2500)
    pd.testing.assert_frame_equal(ev_a, ev_b)
    pd.testing.assert_frame_equal(us_a, us_b)
    ev_c, us_c = load_synthetic(1200, seed=1, chunk_users=300)
    pd.testing.assert_frame_equal(us_c, us_a[us_a.user_id < 1200].reset_index(drop=True))
    pd.testing.assert_frame_equal(ev_c, ev_a[ev_a.user_id < 1200].reset_index(drop=True))


def test_schema_and_spec(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    ev, us = data
    spec = synthetic_spec()
    assert spec.sources == SYNTHETIC_SOURCES and spec.categories == CATEGORIES and len(CATEGORIES) == 18
    assert [lab.name for lab in spec.labels] == ["segment", "churn", "spender"]
    assert not set(spec.tabular_inputs) & {lab.name for lab in spec.labels}
    checked = validate_events(ev, spec.sources, "synthetic")
    assert list(ev.columns) == ["user_id", "source", "timestamp", "item_id", "text", "value", "category"]
    assert checked["timestamp"].equals(ev["timestamp"]) and checked["item_id"].equals(ev["item_id"])
    users = validate_users(us, spec.tabular_inputs, spec.labels, "synthetic")
    assert len(users) == N_USERS and users.user_id.tolist() == list(range(N_USERS))
    assert set(ev.category.unique()) <= set(CATEGORIES)
    assert ev.timestamp.min() >= EPOCH and ev.timestamp.max() < EPOCH + DAYS * 86400
    # sorted by user then time
    assert (np.diff(ev.user_id.to_numpy()) >= 0).all()
    same = np.diff(ev.user_id.to_numpy()) == 0
    assert (np.diff(ev.timestamp.to_numpy())[same] >= 0).all()
    # bounded texts, item ids disjoint per source, one text per item
    assert ev.text.nunique() <= len(syn.ITEM_TEXTS)
    src_idx = ev.source.map({s: i for i, s in enumerate(SYNTHETIC_SOURCES)})
    assert (ev.item_id // ITEM_ID_STRIDE == src_idx).all()
    assert (ev.groupby("item_id").text.nunique() == 1).all()
    assert ev.groupby("user_id").size().min() >= MIN_EVENTS
    assert 30 < len(ev) / N_USERS < 60  # about events_per_user=40


def test_segment_recoverable_from_category_counts(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    from sklearn.linear_model import LogisticRegression

    ev, us = data
    counts = pd.crosstab(ev.user_id, ev.category).reindex(us.user_id, fill_value=0).to_numpy(dtype=float)
    x = counts / counts.sum(1, keepdims=True)  # each user's category shares
    y = us.segment.to_numpy()
    train = us.user_id.to_numpy() < 2000
    clf = LogisticRegression(C=10.0, max_iter=500).fit(x[train], y[train])
    acc = clf.score(x[~train], y[~train])
    assert acc > 3 * CHANCE, acc


def test_weekday_profiles_differ(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    ev, us = data
    seg = ev.user_id.map(us.set_index("user_id").segment)
    weekday = (ev.timestamp - EPOCH) // 86400 % 7  # EPOCH is a Monday
    hist = pd.crosstab(seg, weekday, normalize="index")
    names = [a.name for a in syn.ARCHETYPES]
    weekend = hist[[5, 6]].sum(1)
    assert weekend[names.index("weekend_binger")] > 0.45
    assert weekend[names.index("commuter")] < 0.15
    tv = 0.5 * np.abs(hist.to_numpy()[:, None, :] - hist.to_numpy()[None, :, :]).sum(-1)
    assert tv.max() > 0.3
    # items depend on the weekday: categories boosted on weekends are more frequent then
    binger = (seg == names.index("weekend_binger")).to_numpy()
    boosted = ev.category.isin(syn.ARCHETYPES[names.index("weekend_binger")].weekend_categories).to_numpy()
    is_weekend = (weekday >= 5).to_numpy()
    assert boosted[binger & is_weekend].mean() > 1.5 * boosted[binger & ~is_weekend].mean()


def test_future_depends_on_past(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    ev, _ = data
    fut = _future_mask(ev)
    hist_cats = ev[~fut].groupby("user_id").category.agg(set)
    fut_cats = ev[fut].groupby("user_id").category.agg(set)
    own = np.mean([len(fut_cats[u] & hist_cats[u]) / len(fut_cats[u]) for u in fut_cats.index])
    shuffled = np.random.default_rng(0).permutation(hist_cats.index)
    other = np.mean(
        [
            len(fut_cats[u] & hist_cats[v]) / len(fut_cats[u])
            for u, v in zip(fut_cats.index, shuffled, strict=True)
        ]
    )
    assert own > other + 0.2, (own, other)

    # next items follow the ring: the Markov chain planted per (user, source)
    world = syn._world(7)
    s = ev.sort_values(["user_id", "source", "timestamp"], kind="stable")
    item = s.item_id.to_numpy()
    src, rest = item // ITEM_ID_STRIDE, item % ITEM_ID_STRIDE
    cat, local = rest // syn.ITEMS_PER_CATEGORY, rest % syn.ITEMS_PER_CATEGORY
    succ_pos = (world.ring_pos[src, cat, local] + 1) % syn.ITEMS_PER_CATEGORY
    succ = src * ITEM_ID_STRIDE + cat * syn.ITEMS_PER_CATEGORY + world.ring[src, cat, succ_pos]
    same = (s.user_id.to_numpy()[1:] == s.user_id.to_numpy()[:-1]) & (src[1:] == src[:-1])
    follow = (item[1:] == succ[:-1])[same].mean()
    assert follow > 0.5, follow


def test_churn_and_spender_planted(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    ev, us = data
    half = EPOCH + DAYS * 86400 // 2
    late = (ev.timestamp >= half).groupby(ev.user_id).mean().reindex(us.user_id).to_numpy()
    churn = us.churn.to_numpy() == 1
    assert 0.1 < churn.mean() < 0.6
    assert late[churn].mean() < late[~churn].mean() - 0.03
    pay = ev[ev.source == "payment"]
    level = np.log(pay.value).groupby(pay.user_id).mean().reindex(us.user_id).to_numpy()
    spender = us.spender.to_numpy() == 1
    ok = ~np.isnan(level)
    assert 0.1 < spender.mean() < 0.6
    assert level[ok & spender].min() > level[ok & ~spender].mean()


def test_chunks_are_bounded_and_complete() -> None:
    chunks = list(generate_synthetic(20_000, seed=0, chunk_users=5000))
    assert len(chunks) == 4
    for k, (ev, us) in enumerate(chunks):
        assert us.user_id.tolist() == list(range(k * 5000, (k + 1) * 5000))
        assert ev.user_id.between(k * 5000, (k + 1) * 5000 - 1).all()
        assert len(ev) < 5000 * 80  # bounded by the chunk, not the data set
    assert sum(len(c[1]) for c in chunks) == 20_000
    assert len(list(generate_synthetic(2500, chunk_users=1000))[-1][1]) == 500
    assert list(generate_synthetic(0)) == []


def test_empty_users_and_arguments() -> None:
    ev, us = load_synthetic(1000, seed=2, empty_user_frac=0.1)
    missing = set(us.user_id) - set(ev.user_id)
    assert 50 < len(missing) < 150
    assert ev.groupby("user_id").size().min() >= MIN_EVENTS
    ev0, us0 = load_synthetic(0)
    assert len(ev0) == 0 and len(us0) == 0 and list(ev0.columns) == list(ev.columns)
    ev9, _ = load_synthetic(50, days=9)  # a partial last week folds back
    assert ev9.timestamp.max() < EPOCH + 9 * 86400
    with pytest.raises(ValueError):
        next(generate_synthetic(10, days=3))
    with pytest.raises(ValueError):
        next(generate_synthetic(10, empty_user_frac=2.0))
