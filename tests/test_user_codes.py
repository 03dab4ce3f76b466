"""Collaborative item factors and user-level code tuples (foundv2/nn/item_factors.py, user_codes.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer

from foundv2.nn.item_factors import ItemFactors, history_bag
from foundv2.nn.user_codes import UserCodesConfig, UserCodeTokenizer


def _histories(n_users: int = 600, n_items: int = 120, seed: int = 0) -> list[np.ndarray]:
    """Users of 4 taste groups, each drawing most of its items from its group's quarter."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n_users):
        g = u % 4
        n = int(rng.integers(5, 40))
        own = rng.integers(g * n_items // 4, (g + 1) * n_items // 4, n)
        other = rng.integers(0, n_items, n // 4)
        out.append(rng.permutation(np.unique(np.concatenate([own, other]))))
    return out


def test_item_factors_project_like_tfidf_then_truncated_svd():
    hist = _histories()
    fac = ItemFactors(120, 8).fit(hist[:400])
    bag = history_bag(hist, 120)
    tfidf = TfidfTransformer().fit(bag[:400])
    ref = TruncatedSVD(8, algorithm="arpack").fit(tfidf.transform(bag[:400])).transform(tfidf.transform(bag))
    ours = fac.user_vectors(hist).double().numpy()
    # the same subspace: each of our components matches a reference one up to sign
    corr = np.abs(np.corrcoef(ours.T, ref.T)[:8, 8:])
    assert np.all(corr.max(1) > 0.99)
    assert torch.equal(fac.item_codes()[0], torch.zeros(8))  # row 0 = no item


def test_user_codes_fit_is_deterministic_and_round_trips(tmp_path):
    hist = _histories()
    fut = _histories(seed=1)
    cfg = UserCodesConfig(factor_dim=8, history_dim=4, future_dim=4, recent_items=5, levels=3, codes=16)
    a = UserCodeTokenizer(120, cfg).fit(hist[:400], fut[:400])
    b = UserCodeTokenizer(120, cfg).fit(hist[:400], fut[:400])
    ca, cb = a.encode(hist), b.encode(hist)
    assert torch.equal(ca, cb)
    assert ca.shape == (600, 3) and ca.min() >= 0 and ca.max() < 16
    assert a.bytes_per_user == pytest.approx(3 * 4 / 8)
    a.save_pretrained(tmp_path / "tok")
    c = UserCodeTokenizer.from_pretrained(tmp_path / "tok")
    assert torch.equal(c.encode(hist), ca)
    # the decoded vector is the quantised user vector and approximates it better with each level
    z = a.vectors(hist)
    errs = [float((z - a.quantizers[0].decode_codes(torch.where(torch.arange(3) < n, ca, -1), torch.zeros(600,
            dtype=torch.long))).pow(2).sum(1).mean()) for n in range(4)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert torch.allclose(a.decode(ca), a.quantizers[0].decode_codes(ca, torch.zeros(600, dtype=torch.long)))


def test_user_codes_keep_the_taste_groups():
    hist = _histories()
    tok = UserCodeTokenizer(120, UserCodesConfig(factor_dim=4, history_dim=4, future_dim=0, recent_items=0, levels=1,
                                                 codes=4)).fit(hist[:400])
    first = tok.encode(hist)[:, 0].numpy()
    group = np.arange(600) % 4
    # the first level's 4 codes recover the 4 planted groups on held-out users (purity)
    held = slice(400, 600)
    purity = sum(np.bincount(group[held][first[held] == c]).max() for c in np.unique(first[held])) / 200
    assert purity > 0.9


def test_future_block_predicts_the_train_futures_better_than_the_history_block():
    """The future depends on a weak trait (2 of a user's ~25 items) rather than on the dominant
    taste group: the future-aligned block, fitted on train futures only, predicts held-out users'
    futures far better than the leading history components of the same width."""
    rng = np.random.default_rng(3)
    hist, fut = [], []
    for h in _histories(n_items=100):
        t = int(rng.integers(2))
        pool = np.arange(100 + 10 * t, 110 + 10 * t)
        hist.append(np.concatenate([h, rng.choice(pool, 2, replace=False)]))
        fut.append(rng.choice(pool, 5, replace=False))
    tok = UserCodeTokenizer(120, UserCodesConfig(factor_dim=16, history_dim=2, future_dim=2, recent_items=0, levels=2,
                                                 codes=8)).fit(hist[:400], fut[:400])
    z = tok.vectors(hist).double().numpy()
    F = history_bag(fut, 120).toarray()

    def held_out_r2(block: np.ndarray) -> float:  # a least-squares map fitted on the train users
        A = np.c_[block, np.ones(len(block))]
        W = np.linalg.lstsq(A[:400], F[:400], rcond=None)[0]
        res = F[400:] - A[400:] @ W
        return 1 - (res**2).sum() / ((F[400:] - F[:400].mean(0)) ** 2).sum()

    assert held_out_r2(z[:, 2:]) > held_out_r2(z[:, :2]) + 0.1
    with pytest.raises(ValueError, match="future item ids"):
        UserCodeTokenizer(120, UserCodesConfig(factor_dim=8, history_dim=4, future_dim=4, recent_items=0)).fit(hist)
