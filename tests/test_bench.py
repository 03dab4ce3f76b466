"""foundv2 bench end to end at toy size: every key of bench.json, the report, the plots."""

from __future__ import annotations

import json

import lightning as L
import pytest

from data_modules.datamodule import UserDataModule
from foundv2.bench.run import run_bench
from foundv2.stages.tokenizer import TokenizerStage

RANKING = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    dm = UserDataModule(dataset="synthetic", loader_args={"n_users": 400, "seed": 5}, window_mode="week",
                        text_encoder="hashing", cache_dir=str(tmp / "cache"), batch_size=64, progress=False)
    L.seed_everything(0)
    stage = TokenizerStage(shared_codes=16, specific_codes=8, code_dim=8, hidden=[32],
                           quantizer_options={"kmeans_buffer": 512, "respawn_every": 10},
                           predict_dir=str(tmp / "tokens"), export_dir=str(tmp / "export"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(stage, datamodule=dm)
    trainer.predict(stage, datamodule=dm, return_predictions=False)
    out = run_bench(dm, str(tmp / "out"), tokens_dir=str(tmp / "tokens"), tokenizer_dir=str(tmp / "export"),
                    sasrec_epochs=2, probe_epochs=5)
    return out, tmp / "out"


def test_bench_json_has_every_key(bench):
    out, folder = bench
    saved = json.loads((folder / "bench.json").read_text())
    assert saved["protocol"] == "foundv2-bench-v1" and saved["dataset"] == "synthetic"
    assert sum(saved["split_sizes"].values()) == 400
    res = saved["results"]
    for name in ("pooled", "tokens_bag", "tokens_sum", "tfidf"):
        assert res[name]["segment"].keys() >= {"accuracy", "macro_auc"}
        assert res[name]["churn"].keys() >= {"auc", "ks"}
        assert "macro_auc" in res[name]["future_categories"]
        assert all(k in res[name]["next_items"] for k in RANKING)
        assert res[name]["bytes_per_user"] > 0
    for name in ("popularity", "ease", "itemknn", "sasrec"):
        assert all(k in res[name]["next_items"] for k in RANKING)
    assert res["majority"]["churn"]["auc"] == pytest.approx(0.5)
    assert res["tokens_bag"]["bytes_per_user"] < res["pooled"]["bytes_per_user"] / 10
    assert "verdicts" in saved and "segment" in saved["verdicts"]


def test_planted_signal_and_sane_baselines(bench):
    res = bench[0]["results"]
    # the archetype is planted in behaviour: every representation recovers it far above chance (1/6)
    for name in ("pooled", "tokens_bag", "tfidf"):
        assert res[name]["segment"]["accuracy"] > 0.5, name
    pop = res["popularity"]["next_items"]["ndcg@10"]
    assert res["ease"]["next_items"]["ndcg@10"] > pop and res["itemknn"]["next_items"]["ndcg@10"] > pop


def test_report_and_plots(bench):
    folder = bench[1]
    md = (folder / "report.md").read_text()
    assert "## segment (multiclass)" in md and "the best baseline" in md
    assert (folder / "next_items_vs_bytes.png").stat().st_size > 1000
    assert (folder / "code_usage.png").exists()
    assert any((folder / "tb").iterdir())
