"""The DataModule under real 2-process CPU DDP (gloo): each rank predicts a disjoint shard."""

from __future__ import annotations

import numpy as np
import pytest

from data_modules.store import read_stage_output
from tests.helpers import run_cli


@pytest.mark.ddp
def test_two_ranks_get_disjoint_shards_and_match_one_process(tmp_path):
    common = ["--model", "foundv2.stages.qformer.QFormerStage", "--model.backbone", "pooled", "--data.dataset", "synthetic",
              "--data.loader_args", '{"n_users": 300, "seed": 3}', "--data.window_mode", "day",
              "--data.text_encoder", "hashing", "--data.cache_dir", str(tmp_path / "cache"),
              "--data.batch_size", "16", "--data.progress", "false", "--trainer.accelerator", "cpu",
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    run_cli("predict", *common, "--trainer.devices", "1", "--model.predict_dir", str(tmp_path / "one"))
    run_cli("predict", *common, "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--model.predict_dir", str(tmp_path / "two"))
    one, meta1 = read_stage_output(tmp_path / "one")
    two, meta2 = read_stage_output(tmp_path / "two")
    assert meta2["world_size"] == 2 and len(meta2["parts"]) == 2
    import datasets

    parts = [set(datasets.Dataset.from_file(str(tmp_path / "two" / p))["user_id"]) for p in meta2["parts"]]
    assert parts[0] and parts[1] and not (parts[0] & parts[1])  # disjoint shards
    assert parts[0] | parts[1] == set(one["user_id"]) and len(one) == 300  # every user exactly once
    by_user = {u: i for i, u in enumerate(two["user_id"])}
    for i in range(0, 300, 37):
        j = by_user[one[i]["user_id"]]
        np.testing.assert_allclose(np.asarray(one[i]["feat"]), np.asarray(two[j]["feat"]), atol=1e-6)
        assert one[i]["slice_source"] == two[j]["slice_source"]
