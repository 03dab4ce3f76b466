"""Bench representations of a user tokens dataset (``UserTokenizerStage`` predict).

``user_codes_dec``: the decoded code vectors (dense); ``user_codes_bag``: one-hot of each
level's code, level-namespaced (sparse). Both are stored as the codes, so both report the
tokenizer's ``bytes_per_user``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp


def user_token_representations(folder: Path, n_rows: int) -> dict:
    """``{name: (features [n_rows, d], bytes_per_user)}`` for ``user_codes_dec`` and ``user_codes_bag``."""
    from data_modules.store import read_stage_output

    ds, meta = read_stage_output(folder)
    ds = ds.with_format("numpy", columns=["row", "user_codes", "user_emb"])
    rows = np.asarray(ds["row"], np.int64)
    codes = np.asarray(ds["user_codes"], np.int64)
    emb = np.asarray(ds["user_emb"], np.float32)
    nbytes = float(meta["bytes_per_user"])
    dec = np.zeros((n_rows, emb.shape[1]), np.float32)
    dec[rows] = emb
    K, L_ = int(meta["codes"]), codes.shape[1]
    cols = (codes + np.arange(L_) * K).ravel()
    bag = sp.csr_matrix((np.ones(cols.size, np.float32), (np.repeat(rows, L_), cols)), shape=(n_rows, K * L_))
    return {"user_codes_dec": (dec, nbytes), "user_codes_bag": (bag, nbytes)}
