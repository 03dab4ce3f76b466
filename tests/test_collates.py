"""The collates build every padded array from Arrow offsets at once; these tests hold them to a
plain per-user reference (a Python loop over users, as the batches were first made), bit for bit,
on real prepared data, stage-1 features and tokens, with caps that cut windows and events."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.activity import activity_reference_from_calendar
from data_modules.datamodule import UserDataModule, UserRows
from data_modules.store import Split
from foundv2.bench.baselines import activity_features
from foundv2.stages.qformer import QFormerStage


def _dm(cache, **kw) -> UserDataModule:
    kw.setdefault("max_windows", 5)  # caps that cut most users' windows and some users' events
    kw.setdefault("max_events", 9)
    return UserDataModule(dataset="synthetic", loader_args={"n_users": 160, "seed": 6}, window_mode="day",
                          text_encoder="hashing", cache_dir=str(cache), batch_size=16, progress=False, **kw)


def _pad(seqs, pad, dtype):
    out = np.full((len(seqs), max(max((len(s) for s in seqs), default=0), 1)), pad, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = np.asarray(s, dtype=dtype)
    return out


def _reference_events(cols: dict, meta: dict, text_emb, max_windows: int, max_events: int) -> dict:
    """The event batch, user by user."""
    B = len(cols["user_id"])
    keep, win_off = [], []
    for i in range(B):
        win = np.asarray(cols["h_window"][i], np.int64)
        first = max(0, int(cols["n_windows"][i]) - max_windows)
        start = max(int(np.searchsorted(win, first, side="left")), len(win) - max_events)
        keep.append(slice(start, len(win)))
        win_off.append(int(win[start]) if start < len(win) else 0)

    def hist(name, pad, dtype):
        return _pad([np.asarray(cols[name][i])[keep[i]] for i in range(B)], pad, dtype)

    def text(ids):
        emb = np.zeros(ids.shape + (text_emb.shape[1],), np.float32)
        emb[ids >= 0] = text_emb[ids[ids >= 0]]
        return emb

    mask = hist("h_source", -1, np.int64) >= 0
    w_keys = [cols["w_key"][i][win_off[i]:][:max_windows] for i in range(B)]
    w_days = [cols["w_day"][i][win_off[i]:][:max_windows] for i in range(B)]
    win_mask = _pad([[1] * len(k) for k in w_keys], 0, np.int64).astype(bool)
    ref = int(meta["calendar"]["reference_day"])
    from data_modules.prepare import window_calendar

    win_day = np.where(win_mask, _pad(w_days, 0, np.int64) - ref, 0)
    fut = np.asarray(cols["fut_text"], np.int64)
    split = np.asarray(cols["split"], np.int64)
    out = {
        "ev_source": np.maximum(hist("h_source", -1, np.int64), 0), "ev_item": hist("h_item", 0, np.int64),
        "ev_text": hist("h_text", -1, np.int64), "ev_text_emb": text(hist("h_text", -1, np.int64)),
        "ev_value": hist("h_value", 0.0, np.float32), "ev_time": hist("h_time", 0, np.int64),
        "ev_category": hist("h_category", -1, np.int64),
        "ev_window": np.where(mask, hist("h_window", 0, np.int64) - np.asarray(win_off)[:, None], 0),
        "ev_mask": mask, "win_key": _pad(w_keys, 0, np.int64), "win_mask": win_mask, "win_day": win_day,
        "win_calendar": window_calendar(win_day, win_mask, cols["first_day"], meta),
        "fut_item": _pad(cols["f_item"], 0, np.int64), "fut_text_emb": text(fut),
        "has_fut_text": (fut >= 0) & (split == Split.TRAIN),
        "tabular": (np.asarray(cols["tabular"], np.float32) - np.asarray(meta["tabular_mean"], np.float32))
        / np.asarray(meta["tabular_std"], np.float32),
        # from the whole history (the caps cut events), as the bench's activity row computes them
        "activity": activity_features([np.asarray(x) for x in cols["h_source"]], [np.asarray(x) for x in cols["h_time"]],
                                      [np.asarray(x, np.float64) for x in cols["h_value"]], len(meta["spec"]["sources"]),
                                      split, reference=activity_reference_from_calendar(meta["calendar"]))[0],
    }
    return out


def _reference_tokens(cols: dict, max_windows: int) -> dict:
    """The token batch's sequences, user by user."""
    seqs, keys = [], []
    for i in range(len(cols["user_id"])):
        k = np.asarray(cols["slice_key"][i], np.int64)
        ids = np.asarray(cols["token_ids"][i], np.int64).reshape(len(k), -1)
        timed = k >= 0
        uniq = np.unique(k[timed])
        first = max(0, len(uniq) - max_windows)
        pos = np.searchsorted(uniq, k) - first
        kept = ~timed | (pos >= 0)
        pos = np.where(timed, pos, 0)[kept]
        src = np.asarray(cols["slice_source"][i], np.int64)[kept]
        ids = ids[kept]
        real = ids >= 0
        L_ = ids.shape[1]
        seqs.append((ids[real], np.broadcast_to(np.arange(L_), ids.shape)[real],
                     np.repeat(src, L_).reshape(ids.shape)[real], np.repeat(pos, L_).reshape(ids.shape)[real]))
        keys.append(uniq[first:])
    out = {name: _pad([s[j] for s in seqs], fill, np.int64) for j, (name, fill) in
           enumerate((("token_id", -1), ("tok_level", 0), ("tok_source", 0), ("tok_window", 0)))}
    out["tok_mask"] = _pad([[1] * len(s[0]) for s in seqs], 0, np.int64).astype(bool)
    out["win_key"] = _pad(keys, 0, np.int64)
    out["win_mask"] = _pad([[1] * len(k) for k in keys], 0, np.int64).astype(bool)
    return out


def _batches(dm):
    """(the collate's batch, the same users' columns as Python lists) for every predict batch."""
    table = dm.input_table
    for start in range(0, len(table), dm.hparams.batch_size):
        idx = list(range(start, min(start + dm.hparams.batch_size, len(table))))
        cols = table.with_format(None)[idx]
        cols.setdefault("row", idx)
        yield dm.collate()(UserRows(table, np.arange(len(table))).__getitems__(idx)), cols


def _same(batch: dict, want: dict) -> None:
    for k, v in want.items():
        got = batch[k].numpy()
        assert got.dtype == np.asarray(v).dtype and got.shape == np.asarray(v).shape, k
        assert np.array_equal(got, v), k


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("collate")
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(QFormerStage(backbone="pooled", predict_dir=str(root / "features")), _dm(root, max_windows=32,
                                                                                                max_events=512),
                    return_predictions=False)
    return root


def test_event_batches_equal_the_per_user_reference(data):
    dm = _dm(data)
    dm.setup()
    cut = 0
    for batch, cols in _batches(dm):
        _same(batch, _reference_events(cols, dm.meta, dm.text_emb, 5, 9))
        assert np.array_equal(batch["row"].numpy(), cols["row"])
        cut += int((np.asarray(cols["n_windows"]) > 5).sum())
    assert cut > 20  # the caps did cut: the test exercises them


def test_slice_and_token_batches_equal_the_per_user_reference(data):
    dm = _dm(data, features_dir=str(data / "features"))
    dm.setup()
    for batch, cols in _batches(dm):
        counts = [len(w) for w in cols["slice_window"]]
        assert np.array_equal(batch["slice_user"].numpy(), np.repeat(np.arange(len(counts)), counts))
        for k in ("slice_window", "slice_source", "slice_key"):
            assert np.array_equal(batch[k].numpy(), np.concatenate([np.asarray(v, np.int64) for v in cols[k]]))
        assert np.array_equal(batch["feat"].numpy(),
                              np.concatenate([np.asarray(f, np.float32).reshape(len(w), -1)
                                              for f, w in zip(cols["feat"], cols["slice_window"], strict=True)]))
    # token batches from made-up tokens over those slices: some ids -1 (a level a slice lacks)
    from data_modules.tokens import TokenCollate

    rng = np.random.default_rng(0)
    collate = TokenCollate(dm.table, dm.text_emb, [lab.name for lab in dm.spec.labels], max_windows=4)
    for _, cols in _batches(dm):
        cols["token_ids"] = [np.where(rng.random((len(w), 3)) < 0.2, -1, rng.integers(0, 50, (len(w), 3)))
                             for w in cols["slice_window"]]
        batch = collate({k: cols[k] for k in ("user_id", "row", "split", "slice_source", "slice_key", "token_ids")})
        _same(batch, _reference_tokens(cols, 4))
        assert torch.equal(batch["row"], torch.as_tensor(cols["row"]))
