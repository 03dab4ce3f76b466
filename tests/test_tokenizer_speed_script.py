"""The tokenizer speed benchmark runs end to end on a tiny budget (no timing assertions)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("vector_quantize_pytorch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from tokenizer_speed import measure_speed  # noqa: E402

KEYS = (
    "ours_step_s",
    "residualvq_step_s",
    "ours_slices_per_s",
    "residualvq_slices_per_s",
    "ratio_ours_over_residualvq",
    "distance_gflops",
    "matmul_peak_gflops",
    "torch_threads",
)


def test_measure_speed_reports_every_figure():
    out = measure_speed(steps=2, warmup=1, batch=64, repeats=1)
    for key in KEYS:
        assert key in out, key
        assert out[key] > 0, key
    assert out["config"]["batch"] == 64 and out["config"]["sources"] == 4
