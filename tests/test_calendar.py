"""Absolute time in the representations: each window's calendar position in the event batches,
read by stage 1's event encoder and by the pooled slice features, causally; labels tied to the
calendar become predictable (measured against the bench's activity baseline); checkpoints from
before the calendar input still load and predict the same; fits stay bit-identical.

The data: the item-free purchases of experiments/files-purchases (its generator, at other sizes).
"""

from __future__ import annotations

import importlib.util

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.datamodule import UserDataModule
from data_modules.prepare import WINDOW_CALENDAR, calendar_span
from foundv2.bench.run import run_bench
from foundv2.nn.qformer import QFormerConfig
from foundv2.objectives import ObjectivesConfig
from foundv2.stages.base import OptimConfig
from foundv2.stages.qformer import QFormerStage
from tests.helpers import ROOT

TINY = {"qformer": QFormerConfig(dim=16, num_layers=1, num_heads=2, num_queries=1),
        "objectives": ObjectivesConfig(enabled={"semantic": False})}


def _generator():
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "experiments" / "files-purchases" / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.purchases


def purchases_dm(folder, n_users: int, seed: int = 0, **kw) -> UserDataModule:
    """The example's data config (week windows, nothing held back) on ``n_users`` generated customers."""
    events, users = _generator()(n_users, seed)
    folder.mkdir(parents=True, exist_ok=True)
    events.to_csv(folder / "purchases.csv", index=False)
    users.to_csv(folder / "customers.csv", index=False)
    labels = [{"name": "cohort", "kind": "binary", "class_names": ["early", "late"]},
              {"name": "lifecycle", "kind": "binary", "class_names": ["active", "lapsed"]},
              {"name": "spender", "kind": "binary", "class_names": ["low", "high"]}]
    args = {"events": str(folder / "purchases.csv"), "users": str(folder / "customers.csv"), "sources": ["purchase"],
            "tabular_inputs": ["age"], "labels": labels}
    opts = {"window_mode": "week", "future_frac": 0.0, "max_windows": 53, "batch_size": 32, **kw}
    dm = UserDataModule(dataset="files", loader_args=args, text_encoder="hashing", cache_dir=str(folder / "cache"),
                        progress=False, **opts)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> UserDataModule:
    return purchases_dm(tmp_path_factory.mktemp("calendar") / "small", 60, max_windows=4)


def test_event_batches_carry_each_windows_calendar_position(small):
    dm = small
    ref, span = dm.meta["calendar"]["reference_day"], calendar_span(dm.meta)
    assert span > 300 and dm.dims()["calendar_dim"] == len(WINDOW_CALENDAR) == 2
    batch = next(iter(dm.predict_dataloader()))
    table = dm.table.with_format("numpy", columns=["w_day", "first_day", "n_windows"])
    capped = 0
    for i, row in enumerate(batch["row"].tolist()):
        w_day, first = np.asarray(table[row]["w_day"]), int(table[row]["first_day"])
        kept = w_day[-4:]  # the batch keeps the latest max_windows windows
        capped += len(w_day) > 4
        n = len(kept)
        assert batch["ref_day"][i] == ref
        assert batch["win_day"][i, :n].tolist() == (kept - ref).tolist() and not batch["win_day"][i, n:].any()
        cal = batch["win_calendar"][i]
        torch.testing.assert_close(cal[:n, 0], torch.as_tensor((kept - ref) / span, dtype=torch.float32))
        # tenure counts from the user's first history day, also when its first windows were cut off
        torch.testing.assert_close(cal[:n, 1], torch.as_tensor((kept - first) / span, dtype=torch.float32))
        assert not cal[n:].any()
    assert capped > 0  # the cap did cut some histories: tenure above is measured from the true first day


def test_calendar_off_or_absent_builds_nets_without_it(small, tmp_path):
    off = UserDataModule(**{**small.hparams, "calendar": False})
    off.setup()
    assert off.dims()["calendar_dim"] == 0
    stage = QFormerStage(backbone="pooled")
    stage.build(off.dims())
    on = QFormerStage(backbone="pooled")
    on.build(small.dims())
    assert on.frozen.dim == stage.frozen.dim + 2


def _views(stage: QFormerStage, batch: dict) -> torch.Tensor:
    stage.eval()
    with torch.no_grad():
        return stage.encode(batch)[0]


def test_stage1_reads_absolute_time_causally(small):
    torch.manual_seed(0)
    stage = QFormerStage(**TINY)
    stage.build(small.dims())
    batch = next(iter(small.predict_dataloader()))
    n_win = batch["win_mask"].sum(1)
    u = int(torch.nonzero(n_win >= 3)[0])  # a user with at least 3 windows
    last = int(n_win[u]) - 1
    moved = {**batch, "win_calendar": batch["win_calendar"].clone()}
    moved["win_calendar"][u, last] += torch.tensor([0.5, 0.5])  # the last window happens later
    a, b = _views(stage, batch), _views(stage, moved)
    assert not torch.allclose(a[u, last], b[u, last])  # the encoder reads the calendar...
    assert torch.equal(a[u, :last], b[u, :last])  # ...and earlier windows never see a later one's
    others = torch.arange(a.shape[0]) != u
    assert torch.equal(a[others], b[others])


def test_calendar_labels_become_predictable(tmp_path):
    """A signup cohort (first purchase day) and a lifecycle stage (last purchase day): with the
    calendar the pooled features match the activity baseline (first/last active day, recency);
    without it they are near chance on the cohort."""
    figures = {}
    for calendar in (True, False):
        dm = purchases_dm(tmp_path / "data", 600, seed=1, calendar=calendar)
        out = run_bench(dm, str(tmp_path / f"bench-{calendar}"), representations=["pooled"],
                        baselines=["activity", "majority"], storage_bytes=[], compare=[["pooled", "activity"]],
                        progress=False)
        figures[calendar] = {t: out["results"]["pooled"][t]["auc"] for t in ("cohort", "lifecycle")}
        figures[calendar].update({f"{t}_vs_activity": out["pairs"][t][0] for t in ("cohort", "lifecycle")})
        activity = {t: out["results"]["activity"][t]["auc"] for t in ("cohort", "lifecycle")}
    assert activity["cohort"] > 0.95 and activity["lifecycle"] > 0.9
    on, off = figures[True], figures[False]
    for t in ("cohort", "lifecycle"):
        assert on[t] > 0.9, (t, on[t])
        assert on[f"{t}_vs_activity"]["delta"] > -0.03, on[f"{t}_vs_activity"]  # not below recency alone
    assert off["cohort"] < 0.75 and off["cohort_vs_activity"]["hi"] < 0  # the calendar is what carries it


def _fit(dm, steps: int = 3) -> QFormerStage:
    L.seed_everything(0)
    stage = QFormerStage(**TINY, optim=OptimConfig(lr=3e-3))
    L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(stage, dm)
    return stage


def test_two_fits_are_bit_identical_and_the_calendar_layer_trains(small):
    a, b = _fit(small), _fit(small)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and "encoder.calendar.weight" in sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    L.seed_everything(0)
    fresh = QFormerStage(**TINY, optim=OptimConfig(lr=3e-3))
    fresh.build(small.dims())
    assert not torch.equal(fresh.encoder.calendar.weight, sa["encoder.calendar.weight"])
