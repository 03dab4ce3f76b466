"""The docs blocks that the long benchmarks write render from their results files: each writer
run on a small results dict of the shape its benchmark saves (the benchmarks themselves take
minutes to hours, so a broken writer would otherwise show only at the end of a long run)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_probe  # noqa: E402
import bench_qanchor  # noqa: E402
import bench_qformer  # noqa: E402

from foundv2.bench.report import table  # noqa: E402

INTERVAL = {"delta": 0.02, "lo": 0.01, "hi": 0.03, "p_le_0": 0.0}


def test_bench_qformer_block_shows_every_variant_and_the_interval_of_the_shown_metric():
    probe = {"pooled": {"bytes_per_user": 492, "segment": {"accuracy": 0.9, "macro_auc": 0.95},
                        "churn": {"auc": 0.70, "ks": 0.3}},
             "qformer_full": {"bytes_per_user": 1140, "segment": {"accuracy": 0.99, "macro_auc": 0.99},
                              "churn": {"auc": 0.75, "ks": 0.4}},
             "qformer_no_recon": {"bytes_per_user": 1140, "segment": {"accuracy": 0.95, "macro_auc": 0.97},
                                  "churn": {"auc": 0.72, "ks": 0.35}},
             "majority": {"segment": {"accuracy": 0.2, "macro_auc": 0.5}, "churn": {"auc": 0.5, "ks": 0.0}}}
    vs = {"qformer_full": {"segment": {**INTERVAL, "delta": 0.04}, "segment:accuracy": INTERVAL, "churn": INTERVAL},
          "qformer_no_recon": {"segment": INTERVAL, "segment:accuracy": INTERVAL, "churn": INTERVAL}}
    figures = {"synthetic": {"probe": probe, "vs_pooled": vs, "users_per_s": 80.0,
                             "fit_seconds": {"full": 300.0, "no_recon": 290.0}}}
    rows = [line for line in bench_qformer.docs_block(figures).splitlines() if line.startswith("|")]
    assert rows[0] == "| representation | segment accuracy | churn auc | bytes/user |"
    assert rows[2:] == ["| pooled | 0.9000 | 0.7000 | 492 |", "| all objectives | 0.9900 | 0.7500 | 1,140 |",
                        "| vs pooled | +0.020 [+0.010, +0.030] | +0.020 [+0.010, +0.030] | |",  # accuracy's interval
                        "| without reconstruction | 0.9500 | 0.7200 | 1,140 |", "| majority | 0.2000 | 0.5000 |  |"]


def test_bench_probe_block_holds_the_console_table_the_timings_and_the_repeat():
    bench = {"tasks": {"churn": "binary"},
             "results": {"pooled": {"churn": {"auc": 0.7}, "bytes_per_user": 256},
                         "majority": {"churn": {"auc": 0.5}, "bytes_per_user": 0}}}
    figures = {**bench, "pipeline_timings": {"stage1": 70.2, "bench": 500.4, "total": 570.6}, "end_to_end_s": 575.0,
               "load_average_1min": {"before": 1.25, "after": 2.0},
               "repeat": {"seconds": 130.0, "identical": True,
                          "steps": {"tokenizer": {"columns": ["token_ids", "codes"], "identical": True}}}}
    text = bench_probe.docs_block(figures)
    assert f"```\n{table(figures)}\n```" in text
    assert "575 s end to end (stage1 70 s, bench 500 s)" in text and "load 1.2 before, 2.0 after" in text
    assert "tokenizer (token_ids/codes): identical" in text


def test_bench_qanchor_serving_block_reads_both_prefix_kinds():
    kind = {"full_ms": 13000.0, "cached_ms": 340.0, "kv_speedup": 38.2, "single_query_full_ms": 2500.0,
            "single_query_cached_ms": 140.0, "single_query_speedup": 17.9, "prefix_encode_ms": 2400.0,
            "speedup_with_encode": 4.8, "max_abs_diff": 1e-6, "query_tokens": [11, 14], "prefix_slots": 706}
    figures = {"kinds": {"token": kind, "soft": {**kind, "kv_speedup": 39.0}}, "embed_users_per_s": 4.9,
               "embed_user_queries_per_s": 24.5, "token_prefix_build_s": 0.4, "peak_rss_mb": 1425.0,
               "token_lookup": {"per_name_s": 20.9, "one_read_s": 0.024, "ratio": 871.0}}
    config = {"threads": 2, "dtype": "float32", "users": 2, "queries": ["a"] * 5, "repeats": 3,
              "embed_users": 64, "embed_events": 64, "embed_batch": 16, "codes": 1024}
    text = bench_qanchor.serving_markdown(figures, config, {"cores": 2, "libraries": {"torch": "2.13"}})
    assert "| `kv_speedup` (goal >= 20) | **38.2** | **39.0** |" in text
    assert "11-14 tokens after a prefix of about 706 slots" in text and "**4.90 users/s**" in text
