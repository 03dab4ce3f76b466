"""User-level code tuples: one residual code per level for a whole-history user vector.

Per-window tokens spend their bytes on many small windows; a user-level tuple spends them on one
vector, one byte per level (256 codes), so the storage-vs-quality curve gets points at 8, 16,
32, 64 ... bytes per user. The vector is collaborative: a user's history projected on item
factors fitted on the train users' histories (:class:`~foundv2.nn.item_factors.ItemFactors`),
optionally beside the same projection of the user's most recent items (what comes next depends
most on what came last). The quantiser is the project's
:class:`~foundv2.nn.quantizer.ResidualGroupQuantizer` with one source (``user``), initialised by
residual k-means on the train users' vectors, level after level.

Codes are read back either as the decoded vector (the sum of the chosen code vectors, a dense
``dim``-wide approximation of the user vector) or as a bag of level-namespaced code ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_modules.store import atomic_dir, atomic_write_json
from foundv2.nn.item_factors import ItemFactors
from foundv2.nn.quantizer import ResidualGroupQuantizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class UserCodeTokenizer(nn.Module):
    """Whole-history user vector → ``levels`` residual codes of ``codes`` entries each.

    Args:
        num_items: item catalogue size (item ids ``0 .. num_items-1``).
        factor_dim: item factors (SVD components) of the whole-history projection.
        recent_items: also project the last ``recent_items`` history items on their own factors
            and concatenate (0: whole history only).
        levels: residual levels = codes per user (bytes per user with 256 codes).
        codes: codes per level.
        kmeans_iters: Lloyd iterations of each level's k-means.
        seed: seed of the SVD and the k-means.
    """

    def __init__(self, num_items: int, factor_dim: int = 64, recent_items: int = 0, levels: int = 16,
                 codes: int = 256, kmeans_iters: int = 20, seed: int = 0) -> None:
        super().__init__()
        self.config = {"num_items": num_items, "factor_dim": factor_dim, "recent_items": recent_items,
                       "levels": levels, "codes": codes, "kmeans_iters": kmeans_iters, "seed": seed}
        self.factors = ItemFactors(num_items, factor_dim)
        self.recent = ItemFactors(num_items, factor_dim) if recent_items else None
        self.dim = factor_dim * (2 if recent_items else 1)
        self.quantizer = ResidualGroupQuantizer(self.dim, ["user"], n_shared_levels=levels, n_specific_levels=0,
                                                shared_codes=codes, kmeans_init=True, kmeans_iters=kmeans_iters,
                                                respawn=False, seed=seed)

    @property
    def levels(self) -> int:
        return self.quantizer.n_levels

    @property
    def bytes_per_user(self) -> float:
        return self.levels * int(np.ceil(np.log2(max(self.config["codes"], 2)))) / 8

    def _recent(self, histories: Sequence[np.ndarray]) -> list[np.ndarray]:
        n = self.config["recent_items"]
        return [np.asarray(h)[-n:] for h in histories]

    @torch.no_grad()
    def vectors(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """``[U, dim]`` user vectors of time-ordered history item ids (0-based)."""
        v = self.factors.user_vectors(histories)
        if self.recent is not None:
            v = torch.cat([v, self.recent.user_vectors(self._recent(histories))], 1)
        return v

    @torch.no_grad()
    def fit(self, histories: Sequence[np.ndarray]) -> UserCodeTokenizer:
        """Fit the item factors and the codebooks on these users (pass the train users only)."""
        seed = self.config["seed"]
        self.factors.fit(histories, seed=seed)
        if self.recent is not None:
            self.recent.fit(self._recent(histories), seed=seed)
        z = self.vectors(histories)
        q = self.quantizer
        q.kmeans_buffer = z.shape[0]
        q.train()
        q(z, torch.zeros(len(z), dtype=torch.long))  # buffers every row, then residual k-means per level
        q.eval()
        return self

    @torch.no_grad()
    def encode_vectors(self, z: torch.Tensor) -> torch.Tensor:
        """``[U, levels]`` codes (long) of user vectors."""
        self.quantizer.eval()
        return self.quantizer(z.float(), torch.zeros(len(z), dtype=torch.long)).codes

    def encode(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """``[U, levels]`` codes of time-ordered histories."""
        return self.encode_vectors(self.vectors(histories))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``[U, dim]`` sum of the code vectors (the decoded user vector)."""
        return self.quantizer.decode_codes(codes.long(), torch.zeros(len(codes), dtype=torch.long))

    # -------------------------------------------------------------------------- persistence
    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors``."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_dir(folder) as tmp:
            atomic_write_json(tmp / CONFIG_FILE, {"kind": "user_codes", **self.config})
            save_file(state, str(tmp / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> UserCodeTokenizer:
        """Rebuild a tokenizer saved by `save_pretrained` (eval mode)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        cfg.pop("kind", None)
        model = cls(**cfg)
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return model.eval()
