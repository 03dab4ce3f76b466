"""The bench at any size, on real synthetic users: its probes fitted on a sample of the train users
and its test users scored a batch at a time give the figures of the same probes in memory; a
baseline that cannot run at a size is reported with why; one config run twice is bit-identical;
and the command takes the size settings as flags."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_modules.datamodule import UserDataModule
from data_modules.store import Split
from foundv2.bench.probes import fit_label_probe, fit_next_item_probe
from foundv2.bench.report import table
from foundv2.bench.run import load_bench_data, pooled_representation, run_bench
from foundv2.bench.users import sample_rows
from tests.helpers import run_cli

DATA = {"dataset": "synthetic", "loader_args": {"n_users": 700, "seed": 11}, "window_mode": "week",
        "text_encoder": "hashing", "batch_size": 64, "progress": False}
#: streamed and in-memory probes are the same computation: equal up to float summation order
TOL = 1e-9


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    dm = UserDataModule(**DATA, cache_dir=str(tmp / "cache"))
    dm.prepare_data()
    data = load_bench_data(dm)
    X, _ = pooled_representation(dm)
    return dm, data, X, tmp


def _bench(dm, out, **kw):
    kw = {"representations": ["pooled"], "baselines": [], "probe_epochs": 4, "progress": False, **kw}
    return run_bench(dm, str(out), **kw)


def test_sampled_streamed_probes_equal_in_memory_probes(small):
    """probe_users and val_users below their splits, 50 test users a batch: every figure is the
    in-memory probe's on the same sampled users, to ``TOL``."""
    dm, data, X, tmp = small
    n_train, n_val = int((data.split == Split.TRAIN).sum()), int((data.split == Split.VAL).sum())
    probe_users, val_users = n_train // 2, n_val // 2
    out = _bench(dm, tmp / "sampled", probe_users=probe_users, val_users=val_users, batch_users=50,
                 skip_tasks=["future_categories"])  # 18 one-vs-rest fits: slow, and the same code as churn
    assert out["users"]["train"] == {"users": n_train, "read": probe_users}
    assert out["users"]["val"] == {"users": n_val, "read": val_users}
    assert out["users"]["test"]["read"] == out["users"]["test"]["users"] > 50  # every test user, in batches
    split = np.full_like(data.split, -1)  # the users the bench read, nobody else
    split[sample_rows(data.split, Split.TRAIN, probe_users, 0, 0)] = Split.TRAIN
    split[sample_rows(data.split, Split.VAL, val_users, 0, 1)] = Split.VAL
    split[data.split == Split.TEST] = Split.TEST
    res = out["results"]["pooled"]
    for task in data.tasks:
        if task.name == "future_categories":
            continue
        if task.kind == "ranking":
            ref = fit_next_item_probe(X, data.history, data.future, split, epochs=4, batch_size=256)
        else:
            ref = fit_label_probe(X, task.y, split, task.kind, epochs=4)
        for key, value in ref.items():
            assert res[task.name][key] == pytest.approx(value, abs=TOL), (task.name, key)


def test_samples_as_large_as_the_splits_read_every_user(small):
    """The defaults on a small set: every user read, the figures of the probes on all users."""
    dm, data, X, tmp = small
    out = _bench(dm, tmp / "all", skip_tasks=["next_items", "future_categories"])
    assert all(part["read"] == part["users"] for part in out["users"].values())
    for task in data.tasks:
        if task.name in out["tasks"]:
            ref = fit_label_probe(X, task.y, data.split, task.kind, epochs=4)
            assert out["results"]["pooled"][task.name]["weight_decay"] == ref["weight_decay"]
            for key in ref:
                assert out["results"]["pooled"][task.name][key] == pytest.approx(ref[key], abs=TOL)


def test_a_baseline_that_cannot_run_at_this_size_says_why(small, capsys):
    """EASE and item-kNN past their catalogue limits: absent from the results, listed with the
    reason in bench.json, report.md, the printed table and the console; the rest still runs."""
    dm, data, _, tmp = small
    n_items = data.history.shape[1]
    out_dir = tmp / "limits"
    only_ranking = ["segment", "churn", "spender", "future_categories"]
    out = _bench(dm, out_dir, baselines=["popularity", "ease", "itemknn"], skip_tasks=only_ranking, probe_epochs=1,
                 ease_max_items=n_items - 1, itemknn_max_items=n_items // 2)
    assert set(out["results"]) == {"pooled", "popularity"}
    assert set(out["not_run"]) == {"ease", "itemknn"}
    assert f"{n_items:,} items" in out["not_run"]["ease"] and "bench.ease_max_items" in out["not_run"]["ease"]
    assert "bench.itemknn_max_items" in out["not_run"]["itemknn"]
    saved = json.loads((out_dir / "bench.json").read_text())
    assert saved["not_run"] == out["not_run"]
    md = (out_dir / "report.md").read_text()
    assert "## Not run at this size" in md and "**ease**" in md and "**itemknn**" in md
    printed = table(out)
    assert "not run at this size:" in printed and "itemknn: " in printed
    console = capsys.readouterr().out
    assert "bench: ease not run at this size:" in console and "bench: itemknn not run at this size:" in console
    ok = _bench(dm, tmp / "limits-ok", baselines=["ease"], skip_tasks=only_ranking, probe_epochs=1,
                ease_max_items=n_items)
    assert "ease" in ok["results"] and not ok["not_run"]


def test_one_config_twice_is_bit_identical(small):
    dm, _, _, tmp = small
    kw = {"baselines": ["tfidf_svd", "popularity", "majority"], "storage_bytes": [8], "probe_users": 300,
          "val_users": 40, "batch_users": 33, "skip_tasks": ["future_categories"], "probe_epochs": 2}
    a = _bench(dm, tmp / "twice-a", **kw)
    b = _bench(dm, tmp / "twice-b", **kw)
    strip = lambda res: {r: {t: {k: v for k, v in m.items() if k != "seconds"} if isinstance(m, dict) else m  # noqa: E731
                             for t, m in row.items()} for r, row in res.items()}
    assert strip(a["results"]) == strip(b["results"])
    assert a["verdicts"] == b["verdicts"]


def test_the_command_takes_the_size_settings_as_flags(small, tmp_path):
    """What a scale run calls: ``foundv2 bench`` with config flags only."""
    dm, _, _, tmp = small
    cfg = tmp_path / "data.json"
    cfg.write_text(json.dumps({"data": {**DATA, "cache_dir": str(tmp / "cache")}}))
    out = tmp_path / "out"
    run_cli("bench", "--config", str(cfg), "--bench.output_dir", str(out), "--bench.representations", "[pooled]",
            "--bench.baselines", "[majority, ease]", "--bench.skip_tasks", "[next_items, future_categories]",
            "--bench.probe_users", "200", "--bench.val_users", "30", "--bench.batch_users", "64",
            "--bench.ease_max_items", "2", "--bench.progress", "false")
    saved = json.loads((out / "bench.json").read_text())
    assert saved["settings"]["probe_users"] == 200 and saved["users"]["train"]["read"] == 200
    assert saved["users"]["val"]["read"] == 30 and "ease" in saved["not_run"]
    assert set(saved["results"]) == {"pooled", "majority"}
    with pytest.raises(AssertionError, match="positive number"):
        run_cli("bench", "--config", str(cfg), "--bench.output_dir", str(tmp_path / "bad"), "--bench.probe_users", "0")
