"""Representation batches from arrays in memory: :class:`ArrayRepresentations`, the same batch as
:class:`~data_modules.representations.RepresentationCollate` hands (see that module) for features
that live in no dataset folder: the bench's, dense or scipy sparse (``user_emb`` is then a sparse
COO tensor, which the probe's linear heads multiply as such).
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from data_modules.datamodule import EpochShuffleSampler
from data_modules.store import Split


def _csr_padded(m: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """The nonzero columns of ``rows`` of ``m`` as 1-based ids, ``[B, max count]``, 0-padded."""
    block = m[rows]
    lengths = np.diff(block.indptr)
    out = np.zeros((len(rows), max(int(lengths.max(initial=0)), 1)), np.int64)
    pos = np.arange(block.nnz) - np.repeat(block.indptr[:-1], lengths)
    out[np.repeat(np.arange(len(rows)), lengths), pos] = block.indices + 1
    return out


class _ArrayCollate:
    def __init__(self, X, history: sp.csr_matrix | None, future: sp.csr_matrix | None, labels: dict, split):
        self.X, self.history, self.future, self.labels, self.split = X, history, future, labels, split

    def user_emb(self, rows: np.ndarray) -> torch.Tensor:
        block = self.X[rows]
        if not sp.issparse(block):
            return torch.from_numpy(np.asarray(block, np.float32))
        coo = sp.coo_matrix(block, dtype=np.float32)
        index = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
        return torch.sparse_coo_tensor(index, torch.from_numpy(coo.data), coo.shape, check_invariants=False).coalesce()

    def __call__(self, rows) -> dict:
        rows = np.asarray(rows, np.int64)
        out = {"user_id": torch.from_numpy(rows), "row": torch.from_numpy(rows),
               "split": torch.from_numpy(self.split[rows]), "user_emb": self.user_emb(rows)}
        if self.history is not None:
            out["hist_item"] = torch.from_numpy(_csr_padded(self.history, rows))
            out["fut_item"] = torch.from_numpy(_csr_padded(self.future, rows))
        for name, y in self.labels.items():
            out[f"label/{name}"] = torch.as_tensor(y[rows])
        return out


class PassBatches:
    """The train batches of an epoch that goes ``passes`` times over the users: pass ``p`` of
    epoch ``e`` in the :class:`~data_modules.datamodule.EpochShuffleSampler` order of epoch
    ``e·passes + p``, batched on its own (its last batch may be short), so an epoch of ``k``
    passes holds exactly the batches of ``k`` one-pass epochs. Lightning calls ``set_epoch`` on a
    batch sampler's ``sampler``: this object is its own."""

    def __init__(self, n: int, batch_size: int, seed: int, passes: int = 1):
        self.order = EpochShuffleSampler(n, seed)
        self.batch_size, self.passes, self.epoch = batch_size, passes, 0
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for p in range(self.passes):
            self.order.set_epoch(self.epoch * self.passes + p)
            rows = list(self.order)
            for start in range(0, len(rows), self.batch_size):
                yield rows[start:start + self.batch_size]

    def __len__(self) -> int:
        return self.passes * math.ceil(len(self.order) / self.batch_size)


class ArrayRepresentations(L.LightningDataModule):
    """Representation batches from arrays in memory (rows = users), for probes of features that
    live in no dataset folder (the bench's).

    Args:
        X: ``[U, D]`` dense array or scipy sparse matrix.
        split: ``[U]`` split codes (``store.Split``); users with any other code (e.g. -1) are in
            no loader.
        history: ``[U, I]`` scipy sparse, nonzero = a history item (``next_items``).
        future: ``[U, I]`` scipy sparse, nonzero = a future item (``next_items``).
        labels: name → ``[U]`` classes or ``[U, C]`` 0/1, handed as ``label/<name>``.
        batch_size: users per batch.
        seed: seed of the train order (the DataModule's epoch-seeded shuffle).
        passes: times a train epoch goes over the train users (a small train set's epoch made
            long enough to be worth a validation).
    """

    def __init__(self, X, split: np.ndarray, history=None, future=None, labels: dict | None = None,
                 batch_size: int = 256, seed: int = 0, passes: int = 1):
        super().__init__()
        self.split = np.asarray(split, np.int64)
        self.batch_size, self.seed, self.passes = batch_size, seed, passes
        csr = (lambda m: None if m is None else sp.csr_matrix(m))  # noqa: E731
        self.collate = _ArrayCollate(X, csr(history), csr(future), dict(labels or {}), self.split)

    def _loader(self, split: Split, shuffle: bool) -> DataLoader:
        rows = np.flatnonzero(self.split == split)
        if shuffle:
            return DataLoader(rows.tolist(), collate_fn=self.collate,
                              batch_sampler=PassBatches(len(rows), self.batch_size, self.seed, self.passes))
        return DataLoader(rows.tolist(), batch_size=self.batch_size, collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(Split.TRAIN, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(Split.VAL, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(Split.TEST, shuffle=False)
