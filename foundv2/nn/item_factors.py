"""Collaborative item factors, fitted on the train users' histories and then frozen.

Which items co-occur across users is what predicts a user's attributes and next items on
MovieLens; neither MiniLM over titles nor fixed random item codes carry it. :class:`ItemFactors`
is the classical answer, written so that it is a module with a state like any other: a TF-IDF of
the users' history bags (IDF from the fitted users), reduced by a truncated SVD. A user's vector
is the TF-IDF row projected on the right singular vectors, exactly what
``TruncatedSVD(TfidfTransformer(bag))`` gives, so the fitted factors can also serve as the item
codes of the slice features (``factors[item]``, one row per item, row 0 = no item).

Fitting is deterministic for a fixed seed (randomised SVD with a seeded generator, float64,
and the sign of every singular vector fixed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn


def history_bag(histories: Sequence[np.ndarray], num_items: int) -> sp.csr_matrix:
    """``[U, num_items]`` 0/1 CSR bag of each user's item ids (0-based; repeats count once)."""
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate([np.asarray(h, np.int64) for h in histories]) if len(histories) else np.zeros(0, np.int64)
    bag = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(len(histories), num_items))
    bag.sum_duplicates()
    bag.data[:] = 1.0
    return bag


def fit_idf(counts: sp.spmatrix) -> np.ndarray:
    """Smooth IDF of the items over these users' rows (scikit-learn's ``TfidfTransformer``):
    ``log((1 + n) / (1 + df)) + 1``, ``df`` the users holding the item."""
    counts = sp.csr_matrix(counts)
    df = np.bincount(counts.indices[counts.data != 0], minlength=counts.shape[1])
    return np.log((1 + counts.shape[0]) / (1 + df)) + 1.0


def tfidf_rows(counts: sp.spmatrix, idf: np.ndarray) -> sp.csr_matrix:
    """``[U, I]`` TF-IDF: each user's item counts (or 0/1 bag) times ``idf``, rows L2-normalised
    (an empty row stays zero)."""
    return _l2_rows(sp.csr_matrix(counts, dtype=np.float64) @ sp.diags(np.asarray(idf, np.float64)))


class ItemFactors(nn.Module):
    """TF-IDF → truncated SVD item factors; ``user_vectors`` projects history bags on them.

    The one TF-IDF → SVD of the project: stage 1's collaborative item table, the user-level
    tokenizer's factors and the bench's ``tfidf_svd`` baselines.

    Args:
        num_items: size of the item catalogue (ids ``0 .. num_items-1``).
        dim: number of factors (SVD components).
    """

    def __init__(self, num_items: int, dim: int) -> None:
        super().__init__()
        self.num_items, self.dim = num_items, dim
        self.register_buffer("idf", torch.ones(num_items, dtype=torch.float64))
        self.register_buffer("components", torch.zeros(num_items, dim, dtype=torch.float64))  # V_k
        self.register_buffer("singular_values", torch.zeros(dim, dtype=torch.float64))

    def fit(self, histories: Sequence[np.ndarray], seed: int = 0, n_iter: int = 7) -> ItemFactors:
        """Fit the IDF and the SVD on these users' histories (pass the train users only)."""
        return self.fit_matrix(history_bag(histories, self.num_items), seed, n_iter)

    @torch.no_grad()
    def fit_matrix(self, counts: sp.spmatrix, seed: int = 0, n_iter: int = 7) -> ItemFactors:
        """Fit on a ``[U, num_items]`` matrix of item counts or a 0/1 bag (the train users only)."""
        from sklearn.utils.extmath import randomized_svd

        idf = fit_idf(counts)
        X = tfidf_rows(counts, idf)
        _, s, vt = randomized_svd(X, self.dim, n_iter=n_iter, random_state=np.random.RandomState(seed))
        # sign convention: each component's largest entry is positive
        vt = vt * np.sign(vt[np.arange(self.dim), np.abs(vt).argmax(1)])[:, None]
        self.idf.copy_(torch.from_numpy(idf))
        self.components.copy_(torch.from_numpy(vt.T.copy()))
        self.singular_values.copy_(torch.from_numpy(s))
        return self

    def project(self, counts: sp.spmatrix) -> np.ndarray:
        """``[U, dim]`` float64: each row's L2-normalised TF-IDF times the components."""
        return np.asarray(tfidf_rows(counts, self.idf.numpy()) @ self.components.numpy(), dtype=np.float64)

    @torch.no_grad()
    def user_vectors(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """``[U, dim]`` float32: each user's L2-normalised TF-IDF row times the components
        (zeros for an empty history)."""
        return torch.from_numpy(self.project(history_bag(histories, self.num_items)).astype(np.float32))

    def item_codes(self, scale: float = 1.0) -> torch.Tensor:
        """``[num_items + 1, dim]`` float32 item codes for the slice features: row 0 (no item) is
        zero, row ``i + 1`` is item ``i``'s IDF-weighted component row, scaled so that a row has
        unit mean norm times ``scale``."""
        rows = self.components * self.idf[:, None]
        rows = rows / rows.norm(dim=1).mean().clamp_min(1e-12) * scale
        return torch.cat([rows.new_zeros(1, self.dim), rows]).float()


def _l2_rows(X: sp.spmatrix) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float64)
    norms = np.sqrt(np.asarray(X.multiply(X).sum(1)).ravel())
    return sp.csr_matrix(sp.diags(np.where(norms > 0, 1.0 / np.maximum(norms, 1e-300), 0.0)) @ X)
