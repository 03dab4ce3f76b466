"""foundv2 bench end to end at toy size: every key of bench.json, the storage-matched rows, the
verdicts with paired intervals, the report and plots, resuming after a failure, item-free data."""

from __future__ import annotations

import json
import shutil

import lightning as L
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from data_modules.datamodule import UserDataModule
from data_modules.schema import DataError
from foundv2.bench.report import MAX_CI_WIDTH, table
from foundv2.bench.run import PROGRESS_FILE, SCORES_DIR, run_bench
from foundv2.nn.mrqvae import RQVAEConfig
from foundv2.nn.quantizer import QuantizerConfig
from foundv2.stages.tokenizer import TokenizerStage
from tests.helpers import run_cli

RANKING = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
DATA = {"dataset": "synthetic", "loader_args": {"n_users": 400, "seed": 5}, "window_mode": "week",
        "text_encoder": "hashing", "batch_size": 64, "progress": False}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    dm = UserDataModule(**DATA, cache_dir=str(tmp / "cache"))
    L.seed_everything(0)
    stage = TokenizerStage(rqvae=RQVAEConfig(code_dim=8, hidden=[32]),
                           quantizer=QuantizerConfig(n_shared_levels=2, n_specific_levels=1, shared_codes=16,
                                                     specific_codes=8, kmeans_buffer=512, respawn_every=10),
                           predict_dir=str(tmp / "tokens"), export_dir=str(tmp / "export"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(stage, datamodule=dm)
    trainer.predict(stage, datamodule=dm, return_predictions=False)
    return dm, tmp


@pytest.fixture(scope="module")
def bench(tokens):
    dm, tmp = tokens
    out = run_bench(dm, str(tmp / "out"), tokens_dir=str(tmp / "tokens"), tokenizer_dir=str(tmp / "export"),
                    storage_bytes=[16], sasrec_epochs=2, probe_epochs=5, progress=False)
    return out, tmp / "out"


@pytest.mark.slow  # a whole bench over tokens: make test-full
def test_bench_json_has_every_key(bench):
    out, folder = bench
    saved = json.loads((folder / "bench.json").read_text())
    assert saved["protocol"] == "foundv2-bench-v1" and saved["dataset"] == "synthetic"
    assert sum(saved["split_sizes"].values()) == 400
    res = saved["results"]
    tok = res["tokens_bag"]["bytes_per_user"]
    sizes = sorted({16, int(round(tok))})
    storage_rows = [f"tfidf_svd{k}_int8" for k in sizes] + [f"top_items{2 * (k // 2)}" for k in sizes]
    for name in ("pooled", "tokens_bag", "tokens_sum", "tfidf", "activity", *storage_rows):
        assert res[name]["segment"].keys() >= {"accuracy", "macro_auc"}, name
        assert res[name]["churn"].keys() >= {"auc", "ks"}
        assert "macro_auc" in res[name]["future_categories"]
        assert all(k in res[name]["next_items"] for k in RANKING)
        assert res[name]["bytes_per_user"] > 0
    for k in sizes:  # storage-matched: exactly k bytes (int8 × k; uint16 ids × k/2)
        assert res[f"tfidf_svd{k}_int8"]["bytes_per_user"] == k
        assert res[f"top_items{2 * (k // 2)}"]["bytes_per_user"] == 2 * (k // 2)
    assert res["pooled"]["bytes_per_user"] % 4 == 0 and res["activity"]["bytes_per_user"] % 4 == 0
    rate = json.loads((folder.parent / "tokens" / "report.json").read_text())["collisions"]["collision_rate"]
    assert res["tokens_bag"]["collision_rate"] == res["tokens_sum"]["collision_rate"] == rate
    assert "collision_rate" not in res["pooled"]
    for name in ("popularity", "ease", "itemknn", "sasrec"):
        assert all(k in res[name]["next_items"] for k in RANKING)
    assert res["ease"]["bytes_per_user"] is None and res["majority"]["bytes_per_user"] == 0
    assert res["majority"]["churn"]["auc"] == pytest.approx(0.5)
    assert res["tokens_bag"]["bytes_per_user"] < res["pooled"]["bytes_per_user"] / 10


@pytest.mark.slow  # a whole bench over tokens: make test-full
def test_planted_signal_and_sane_baselines(bench):
    res = bench[0]["results"]
    # the archetype is planted in behaviour: every representation recovers it far above chance (1/6)
    for name in ("pooled", "tokens_bag", "tfidf", "tfidf_svd16_int8"):
        assert res[name]["segment"]["accuracy"] > 0.5, name
    pop = res["popularity"]["next_items"]["ndcg@10"]
    assert res["ease"]["next_items"]["ndcg@10"] > pop and res["itemknn"]["next_items"]["ndcg@10"] > pop


@pytest.mark.slow  # a whole bench over tokens: make test-full
def test_verdicts_carry_paired_intervals(bench):
    out, _ = bench
    res = out["results"]
    assert set(out["verdicts"]) == set(out["tasks"])
    for task, v in out["verdicts"].items():
        assert v["best"] in ("tokens_bag", "tokens_sum")
        size = v["bytes_per_user"]
        names = {c["baseline"] for c in v["comparisons"]}
        # every row of equal or larger size (or unbounded) is compared, no smaller one
        expect = {n for n, r in res.items() if task in r and r["kind"] != "tokens"
                  and (r["bytes_per_user"] is None or r["bytes_per_user"] >= size)}
        assert names == expect, task
        assert "majority" not in names and "tfidf_svd16_int8" not in names
        for c in v["comparisons"]:
            assert c["lo"] <= c["delta"] <= c["hi"] or np.isclose(c["lo"], c["hi"])
            word = "beats" if c["lo"] > 0 else "loses" if c["hi"] < 0 else "tie"
            assert c["verdict"] == word
        # 40 test users: flagged as too small to tell
        assert any("test users" in w for w in v["warnings"]) and v["test_users"] < 100
    assert any(c["verdict"] == "tie" for v in out["verdicts"].values() for c in v["comparisons"])
    printed = table(out)
    for task in out["tasks"]:
        line = next(x for x in printed.splitlines() if x.startswith(f"{task} ("))
        assert "[" in line and "too small to tell" in line  # the interval is printed with the verdict
    assert MAX_CI_WIDTH > 0


@pytest.mark.slow  # a whole bench over tokens: make test-full
def test_report_plots_and_marker_last(bench):
    folder = bench[1]
    md = (folder / "report.md").read_text()
    assert "## segment (multiclass)" in md and "95 % interval" in md and "| tie |" in md
    assert "![metric against bytes per user](metric_vs_bytes.png)" in md
    assert (folder / "metric_vs_bytes.png").stat().st_size > 5000
    assert (folder / "next_items_vs_bytes.png").stat().st_size > 1000
    assert (folder / "code_usage.png").exists()
    assert any((folder / "tb").iterdir())
    marker = (folder / "bench.json").stat().st_mtime_ns
    others = [p for p in folder.rglob("*") if p.is_file() and p.name != "bench.json" and p.name != "bench.log"]
    assert others and all(p.stat().st_mtime_ns <= marker for p in others)
    assert not (folder / PROGRESS_FILE).exists() and not (folder / SCORES_DIR).exists()
    log = (folder / "bench.log").read_text()
    assert "probe: chose weight decay" in log  # the probes' lines went to the log, not the console


@pytest.mark.slow  # a whole bench over tokens: make test-full
def test_failure_keeps_finished_tasks_and_rerun_finishes(tokens, capsys):
    dm, tmp = tokens
    broken = tmp / "tokens-broken"
    shutil.copytree(tmp / "tokens", broken)
    part = sorted(broken.glob("*.arrow"))[0]
    good = part.read_bytes()
    out = tmp / "out-resume"
    kw = dict(tokens_dir=str(broken), representations=["pooled", "tokens_bag"], baselines=["majority"],
              skip_tasks=["next_items"], progress=False)
    part.write_bytes(good[: len(good) // 3])  # truncated: refused before the first probe
    with pytest.raises(DataError, match="tokens-broken"):
        run_bench(dm, str(out), **kw)
    assert not (out / PROGRESS_FILE).exists() and not (out / SCORES_DIR).exists()
    table = pa.ipc.open_stream(pa.py_buffer(good)).read_all().drop_columns(["token_ids"])
    with pa.OSFile(str(part), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)  # whole, but without the column the token rows read: found at their first probe
    with pytest.raises(DataError, match="tokens-broken"):
        run_bench(dm, str(out), **kw)
    progress = json.loads((out / PROGRESS_FILE).read_text())
    assert set(progress["results"]["pooled"]) >= {"segment", "churn", "future_categories"}
    assert not (out / "bench.json").exists()
    part.write_bytes(good)
    capsys.readouterr()
    done = run_bench(dm, str(out), **kw)
    for task in ("segment", "churn", "future_categories"):  # reused, not probed again
        assert done["results"]["pooled"][task] == progress["results"]["pooled"][task]
    assert "tokens_bag" in done["results"] and (out / "bench.json").exists()
    assert not (out / PROGRESS_FILE).exists()
    assert "logistic probe" not in capsys.readouterr().err


def test_cli_corrupt_tokens_is_one_paragraph_exit_2(tokens, tmp_path):
    dm, tmp = tokens
    broken = tmp_path / "tokens"
    shutil.copytree(tmp / "tokens", broken)
    (broken / "report.json").write_text("{not json")
    cfg = tmp_path / "bench.json"
    cfg.write_text(json.dumps({"data": {**DATA, "cache_dir": str(tmp / "cache")},
                               "bench": {"output_dir": str(tmp_path / "out"), "tokens_dir": str(broken)}}))
    res = run_cli("bench", "--config", str(cfg), check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert str(broken) in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "bench.json").exists()


# ------------------------------------------------------------------------------ item-free data
def _purchases(tmp_path, n_users: int = 240, single_class: bool = False) -> UserDataModule:
    """Purchases with dates and amounts, no item ids; 'late' = the user started in the second half."""
    rng = np.random.default_rng(0)
    t0, span = 1_700_000_000, 200 * 86400
    rows, users = [], []
    for u in range(1, n_users + 1):
        start = t0 + int(rng.uniform(0, span * 0.8))
        for _ in range(int(rng.integers(6, 14))):
            rows.append({"user_id": u, "source": ["card", "cash"][int(rng.integers(2))],
                         "timestamp": start + int(rng.uniform(0, 30 * 86400)), "value": float(rng.gamma(2, 20))})
        users.append({"user_id": u, "late": 0 if single_class else int(start > t0 + span * 0.4)})
    pd.DataFrame(rows).to_csv(tmp_path / "events.csv", index=False)
    pd.DataFrame(users).to_csv(tmp_path / "users.csv", index=False)
    args = {"events": str(tmp_path / "events.csv"), "users": str(tmp_path / "users.csv"), "sources": ["card", "cash"],
            "labels": [{"name": "late", "kind": "binary", "num_classes": 2}]}
    return UserDataModule(dataset="files", loader_args=args, window_mode="day", text_encoder="hashing",
                          cache_dir=str(tmp_path / "cache"), batch_size=32, progress=False)


def test_item_free_data_runs_to_the_end(tmp_path, capsys):
    dm = _purchases(tmp_path)
    out = run_bench(dm, str(tmp_path / "out"), progress=False)
    said = capsys.readouterr().out
    assert said.count("no item ids") == 1 and "next_items" in said
    assert list(out["tasks"]) == ["late"]
    assert set(out["results"]) == {"pooled", "activity", "majority"}
    assert out["results"]["activity"]["bytes_per_user"] > 0
    # the label is tied to the calendar: the activity features (first active day) see it
    assert out["results"]["activity"]["late"]["auc"] > 0.9
    v = out["verdicts"]["late"]
    assert v["best"] == "pooled" and {c["baseline"] for c in v["comparisons"]} <= {"activity"}
    assert (tmp_path / "out" / "bench.json").exists() and (tmp_path / "out" / "late_vs_bytes.png").exists()


def test_single_class_label_is_a_data_error(tmp_path):
    dm = _purchases(tmp_path, n_users=60, single_class=True)
    with pytest.raises(DataError, match="late"):
        run_bench(dm, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "bench.json").exists()


def test_no_future_held_back_skips_the_future_tasks(tmp_path, capsys):
    """future_frac 0 (labels from a separate period): the bench runs to the end on the labels."""
    dm = UserDataModule(dataset="synthetic", loader_args={"n_users": 240, "seed": 3}, window_mode="week",
                        text_encoder="hashing", cache_dir=str(tmp_path / "cache"), future_frac=0.0, progress=False)
    out = run_bench(dm, str(tmp_path / "out"), representations=["pooled"], baselines=["majority", "tfidf"],
                    storage_bytes=[], progress=False)
    assert capsys.readouterr().out.count("no future events back") == 1
    assert "next_items" not in out["tasks"] and not any(t.startswith("future") for t in out["tasks"])
    assert out["tasks"] and (tmp_path / "out" / "bench.json").exists()


def test_budget_verdicts_follow_the_storage_rule():
    """A token row meets a budget only when it loses to no storage-matched baseline of that size
    on any task and beats each on at least two; rows above the budget and other sizes stay out."""
    from foundv2.bench.report import budget_line, budget_verdicts

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    noise = lambda s: y + rng.normal(0, s, 400)  # noqa: E731 - scores whose AUC falls with s
    bench = {"tasks": {"a": "binary", "b": "binary", "c": "binary"}, "results": {
        "good16": {"kind": "tokens", "bytes_per_user": 16.0}, "weak16": {"kind": "tokens", "bytes_per_user": 16.0},
        "big": {"kind": "tokens", "bytes_per_user": 62.0}, "tfidf_svd16_int8": {"kind": "baseline", "bytes_per_user": 16.0},
        "top_items16": {"kind": "baseline", "bytes_per_user": 16.0},
        "tfidf_svd64_int8": {"kind": "baseline", "bytes_per_user": 64.0}}}
    sd = {"good16": (0.3, 0.3, 1.0), "weak16": (3.0, 0.3, 1.0), "big": (0.3, 0.3, 0.3),
          "tfidf_svd16_int8": (1.0, 1.0, 1.0), "top_items16": (1.0, 1.0, 1.0), "tfidf_svd64_int8": (1.0, 1.0, 1.0)}
    scores = {(n, t): noise(s) for n, v in sd.items() for t, s in zip("abc", v, strict=True)}
    out = budget_verdicts(bench, lambda n, t: scores[(n, t)], {t: y for t in "abc"}, [16, 64])
    v16 = out["16"]
    assert sorted(v16["baselines"]) == ["tfidf_svd16_int8", "top_items16"] and set(v16["rows"]) == {"good16", "weak16"}
    assert v16["best"] == "good16" and v16["meets"] and not v16["rows"]["weak16"]["meets"]
    assert v16["rows"]["weak16"]["losses"] == 2  # task a against both baselines
    assert len(v16["rows"]["good16"]["comparisons"]) == 3 * 2
    assert out["64"]["baselines"] == ["tfidf_svd64_int8"] and set(out["64"]["rows"]) == {"good16", "weak16", "big"}
    assert out["64"]["best"] == "big" and out["64"]["meets"]
    assert "meets" in budget_line("16", v16) and "misses" in budget_line("16", {**v16, "best": "weak16", "meets": False})


def test_report_command_on_a_missing_or_broken_bench_json(tmp_path, capsys):
    """`python -m foundv2.bench.report <bench.json>`: a missing or broken file is a one-line
    error naming it, status 2, no traceback."""
    from foundv2.bench.report import main

    assert main([str(tmp_path / "none.json")]) == 2
    broken = tmp_path / "bench.json"
    broken.write_text('{"results": ')
    assert main([str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("foundv2: error:") == 2 and str(broken) in err and "Traceback" not in err


def test_the_table_leaves_out_rows_with_no_task_to_show_and_states_the_budget_rule():
    bench = {"tasks": {"churn": "binary", "next_items": "ranking"},
             "results": {"pooled": {"churn": {"auc": 0.7}, "bytes_per_user": 256},
                         "ease": {"bytes_per_user": None},  # its only task was skipped at this data set
                         "majority": {"churn": {"auc": 0.5}, "bytes_per_user": 0}},
             "budgets": {"16": {"best": "pooled", "meets": False, "baselines": ["tfidf_svd16_int8"],
                                "rows": {"pooled": {"bytes_per_user": 16, "wins": 1, "losses": 0, "comparisons": []}}}}}
    out = table(bench)
    assert "pooled" in out and "majority" in out and "ease" not in out
    assert "loses on no task and beats each on at least two" in out


def test_token_rows_show_their_collision_rate_beside_their_size():
    """A token row's whole-tuple collision rate (from its tokens' report.json) sits beside its
    bytes per user, on the console and in report.md; rows that are not tokens show '-'."""
    from foundv2.bench.report import markdown

    bench = {"protocol": "foundv2-bench-v1", "dataset": "files-example", "seed": 0, "num_items": 0,
             "split_sizes": {"train": 8, "val": 1, "test": 1}, "seconds": 1.0, "machine": {"cores": 2},
             "tasks": {"churn": "binary"},
             "results": {"tokens_bag": {"churn": {"auc": 0.7}, "bytes_per_user": 12, "collision_rate": 0.714},
                         "activity": {"churn": {"auc": 0.6}, "bytes_per_user": 40}}}
    lines = table(bench).splitlines()
    assert "collide" in lines[0]
    assert next(x for x in lines if x.startswith("tokens_bag")).split()[-1] == "71%"
    assert next(x for x in lines if x.startswith("activity")).split()[-1] == "-"
    md = markdown(bench, {}, [])
    assert md.startswith("# foundv2-bench-v1 on files-example")
    assert "| tokens_bag | 0.7000 |" in md and "| 12 | 71% |" in md and "| 40 | - |" in md


def test_every_learned_row_gets_a_verdict_against_the_best_baseline_of_its_size_and_of_any():
    from foundv2.bench.report import row_verdict_lines, row_verdicts

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    noise = lambda s: y + rng.normal(0, s, 400)  # noqa: E731 - scores whose AUC falls with s
    sd = {"tok16": 0.5, "stage1": 0.6, "svd16": 1.0, "svd64": 0.45, "tfidf": 0.3, "majority": None}
    bench = {"tasks": {"a": "binary"}, "results": {
        "tok16": {"kind": "tokens", "bytes_per_user": 16.0}, "stage1": {"kind": "representation", "bytes_per_user": None},
        "svd16": {"kind": "baseline", "bytes_per_user": 16.0}, "svd64": {"kind": "baseline", "bytes_per_user": 64.0},
        "tfidf": {"kind": "baseline", "bytes_per_user": None}}}
    scores = {n: noise(s) for n, s in sd.items() if s is not None}
    for n in scores:
        bench["results"][n]["a"] = {"auc": float(np.mean([(scores[n][y == 1] > x).mean() for x in scores[n][y == 0]]))}
    out = row_verdicts(bench, lambda n, t: scores.get(n), {"a": y})
    assert set(out) == {"tok16", "stage1"}  # the learned rows, each one
    tok = out["tok16"]["a"]
    assert tok["by_size"]["baseline"] == "svd16" and tok["by_size"]["verdict"] == "beats"
    assert tok["best"]["baseline"] == "tfidf" and tok["best"]["verdict"] == "loses"
    assert out["stage1"]["a"]["by_size"]["baseline"] == "tfidf"  # unbounded: any baseline is of its size
    lines = row_verdict_lines(out)
    assert any(x.startswith("tok16 a (auc") and "beats svd16" in x and "loses tfidf" in x for x in lines)
