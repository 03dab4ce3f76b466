"""User-level code tuples: one residual code per level for a whole-history user vector.

Per-window tokens spend their bytes on many small windows; a user-level tuple spends them on one
vector, one byte per level (256 codes), so the storage-vs-quality curve gets points at 8, 16,
32, 64 ... bytes per user. The vector is collaborative: a user's history projected on item
factors fitted on the train users' histories (:class:`~foundv2.nn.item_factors.ItemFactors`,
its first ``history_dim`` components), beside (``future_dim > 0``) a *future-aligned* block:
a reduced-rank ridge regression from [whole-history projection | projection of the last
``recent_items`` items] to the train users' future items, i.e. the ``future_dim``-d code of what
the user is predicted to do next (FOUNDv2's point that tokens should carry future intent, here
in closed form). Both blocks are scaled to unit mean squared norm on the train users. The quantiser is the project's
:class:`~foundv2.nn.quantizer.ResidualGroupQuantizer` with one source (``user``), initialised by
residual k-means on the train users' vectors, level after level; with ``groups > 1`` the vector
is cut into that many contiguous blocks of dimensions, each with its own quantiser of
``levels / groups`` levels (``groups == levels``: product quantisation, one code per block).

Codes are read back either as the decoded vector (the sum of the chosen code vectors, a dense
``dim``-wide approximation of the user vector) or as a bag of level-namespaced code ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from data_modules.store import load_export, save_export
from foundv2.nn.item_factors import ItemFactors, history_bag
from foundv2.nn.quantizer import QuantizerConfig, ResidualGroupQuantizer
from foundv2.options import Options


@dataclass(frozen=True)
class UserCodesConfig(Options):
    """The user-level tokenizer's settings (the user tokenizer stage's ``--model.user_codes.*``;
    a ``save_pretrained`` folder's ``config.json`` holds them beside ``num_items``)."""

    GROUP: ClassVar[str] = "user_codes"

    factor_dim: int = 128
    """Item factors (TF-IDF → SVD components, fitted on the train users) of the whole-history and
    recent projections."""
    history_dim: int = 16
    """Leading whole-history components kept in the user vector."""
    future_dim: int = 16
    """Width of the future-aligned block (0: none; then ``fit`` needs no futures; it is fitted on
    the train users' futures only)."""
    recent_items: int = 30
    """The last this many history items get their own projection, an input of the future-aligned
    block (0: whole history only)."""
    ridge: float = 10.0
    """Ridge strength of the future regression."""
    levels: int = 16
    """Residual levels = codes per user (bytes per user with 256 codes)."""
    codes: int = 256
    """Codes per level."""
    groups: int = 1
    """The user vector is cut into this many contiguous blocks of dimensions, each coded by
    ``levels / groups`` residual levels (1: residual codes of the whole vector; ``levels``: one code
    per block, product quantisation)."""
    kmeans_iters: int = 20
    """Lloyd iterations of each level's k-means."""
    seed: int = 0
    """Seed of the SVD and the k-means."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.history_dim <= self.factor_dim:
            raise ValueError(f"history_dim must be in 1..factor_dim={self.factor_dim}, got {self.history_dim}")
        if self.groups < 1 or self.levels % self.groups or self.groups > self.history_dim + self.future_dim:
            raise ValueError(f"groups must divide levels={self.levels} and be at most the vector's "
                             f"{self.history_dim + self.future_dim} dimensions, got {self.groups}")


class UserCodeTokenizer(nn.Module):
    """Whole-history user vector → ``levels`` residual codes of ``codes`` entries each.

    Args:
        num_items: item catalogue size (item ids ``0 .. num_items-1``).
        config: the tokenizer's settings (:class:`UserCodesConfig`: the vector's blocks, the
            codes, the seed).
    """

    def __init__(self, num_items: int, config: UserCodesConfig = UserCodesConfig()) -> None:
        super().__init__()
        self.num_items, self.config = num_items, config
        cfg = config
        self.factors = ItemFactors(num_items, cfg.factor_dim)
        self.recent = ItemFactors(num_items, cfg.factor_dim) if cfg.recent_items else None
        n_in = cfg.factor_dim * (2 if cfg.recent_items else 1)
        self.register_buffer("future_map", torch.zeros(n_in, cfg.future_dim, dtype=torch.float64))
        self.register_buffer("block_scale", torch.ones(2, dtype=torch.float64))
        self.dim = cfg.history_dim + cfg.future_dim
        self.block_dims = [len(b) for b in torch.arange(self.dim).tensor_split(cfg.groups)]
        self.quantizers = nn.ModuleList(ResidualGroupQuantizer(d, ["user"], QuantizerConfig(
            n_shared_levels=cfg.levels // cfg.groups, n_specific_levels=0, shared_codes=cfg.codes, kmeans_init=True,
            kmeans_iters=cfg.kmeans_iters, respawn=False, data_init=False, seed=cfg.seed + g))
            for g, d in enumerate(self.block_dims))

    @property
    def levels(self) -> int:
        return sum(q.n_levels for q in self.quantizers)

    @property
    def bytes_per_user(self) -> float:
        return self.levels * int(np.ceil(np.log2(max(self.config.codes, 2)))) / 8

    def _recent(self, histories: Sequence[np.ndarray]) -> list[np.ndarray]:
        n = self.config.recent_items
        return [np.asarray(h)[-n:] for h in histories]

    def _blocks(self, histories: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(whole-history block, regression inputs) before scaling, float64."""
        whole = self.factors.user_vectors(histories).double()
        inputs = whole
        if self.recent is not None:
            inputs = torch.cat([whole, self.recent.user_vectors(self._recent(histories)).double()], 1)
        return whole[:, : self.config.history_dim], inputs

    @torch.no_grad()
    def vectors(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """``[U, dim]`` user vectors of time-ordered history item ids (0-based)."""
        hist, inputs = self._blocks(histories)
        parts = [hist / self.block_scale[0]]
        if self.config.future_dim:
            parts.append(inputs @ self.future_map / self.block_scale[1])
        return torch.cat(parts, 1).float()

    @torch.no_grad()
    def fit(self, histories: Sequence[np.ndarray], futures: Sequence[np.ndarray] | None = None) -> UserCodeTokenizer:
        """Fit the item factors, the future regression and the codebooks on these users (pass
        the train users only; ``futures``, their future item ids, is needed when ``future_dim``)."""
        cfg = self.config
        self.factors.fit(histories, seed=cfg.seed)
        if self.recent is not None:
            self.recent.fit(self._recent(histories), seed=cfg.seed)
        hist, inputs = self._blocks(histories)
        self.block_scale[0] = hist.pow(2).sum(1).mean().sqrt().clamp_min(1e-12)
        if cfg.future_dim:
            if futures is None or len(futures) != len(histories):
                raise ValueError("future_dim > 0: fit needs the same users' future item ids")
            self.future_map.copy_(_reduced_rank_ridge(inputs, history_bag(futures, self.num_items),
                                                      cfg.future_dim, cfg.ridge))
            self.block_scale[1] = (inputs @ self.future_map).pow(2).sum(1).mean().sqrt().clamp_min(1e-12)
        z = self.vectors(histories)
        src = torch.zeros(len(z), dtype=torch.long)
        for q, block in zip(self.quantizers, z.split(self.block_dims, 1), strict=True):
            q.config = q.config.replace(kmeans_buffer=z.shape[0])  # k-means on every row at once
            q.train()
            q(block.contiguous(), src)  # buffers every row, then residual k-means per level
            q.eval()
        return self

    @torch.no_grad()
    def encode_vectors(self, z: torch.Tensor) -> torch.Tensor:
        """``[U, levels]`` codes (long) of user vectors (block after block)."""
        src = torch.zeros(len(z), dtype=torch.long)
        out = []
        for q, block in zip(self.quantizers, z.float().split(self.block_dims, 1), strict=True):
            q.eval()
            out.append(q(block.contiguous(), src).codes)
        return torch.cat(out, 1)

    def encode(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """``[U, levels]`` codes of time-ordered histories."""
        return self.encode_vectors(self.vectors(histories))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``[U, dim]`` the decoded user vector: per block, the sum of its levels' code vectors."""
        src = torch.zeros(len(codes), dtype=torch.long)
        per = self.levels // len(self.quantizers)
        return torch.cat([q.decode_codes(c, src) for q, c in zip(self.quantizers, codes.long().split(per, 1),
                                                                   strict=True)], 1)

    # -------------------------------------------------------------------------- persistence
    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` (``num_items`` and the :class:`UserCodesConfig`),
        ``model.safetensors`` and their ``checksums.json``."""
        save_export(folder, {"kind": "user_codes", "num_items": self.num_items, **dataclasses.asdict(self.config)},
                    self.state_dict())

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> UserCodeTokenizer:
        """Rebuild a tokenizer saved by `save_pretrained` (eval mode); a damaged folder is a DataError."""
        cfg, state = load_export(folder, "user-tokenizer export")
        cfg.pop("kind", None)
        model = cls(cfg.pop("num_items"), UserCodesConfig.from_dict(cfg))
        model.load_state_dict(state)
        return model.eval()


def _reduced_rank_ridge(Z: torch.Tensor, F, rank: int, lam: float) -> torch.Tensor:
    """``[d, rank]`` map ``M = W V_k``: ridge ``W = (ZᵀZ + λI)⁻¹ ZᵀF`` from inputs ``Z [U, d]``
    to targets ``F [U, I]`` (scipy sparse), then the top-``rank`` right singular directions
    ``V_k`` of the fitted ``Z W`` (reduced-rank regression), all in float64."""
    Zn = Z.double().numpy()
    W = np.linalg.solve(Zn.T @ Zn + lam * np.eye(Zn.shape[1]), np.asarray((F.T @ Zn).T))
    R = np.linalg.qr(Zn, mode="r")  # Z W = Q (R W): the same right singular vectors, a small SVD
    _, _, vt = np.linalg.svd(R @ W, full_matrices=False)
    vt = vt[:rank]
    vt = vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]  # largest entry positive
    return torch.from_numpy(W @ vt.T)
