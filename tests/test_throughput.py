"""What the predict paths do to go fast, held to what they replace: the quantisers' inference
codes equal their forward's; pages of memory-mapped data are handed back and the data reads the
same after; a length-ordered predict covers every user once with the same numbers to float
rounding; the throughput measure reports its figures (never timed here)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.datamodule import UserDataModule, release_pages
from data_modules.schema import DataError
from data_modules.store import read_stage_output
from foundv2.nn.mrqvae import MultiViewRQVAE, RQVAEConfig
from foundv2.nn.qformer import QFormerConfig
from foundv2.nn.quantizer import QuantizerConfig


@pytest.mark.parametrize("layout", ["sequential", "union"])
@pytest.mark.parametrize("tabular_separate", [False, True])
def test_inference_codes_equal_the_forward_codes(layout, tabular_separate):
    torch.manual_seed(0)
    config = QuantizerConfig(layout=layout, n_shared_levels=2, n_specific_levels=1, shared_codes=16,
                             specific_codes=8, kmeans_buffer=64)
    rqvae = RQVAEConfig(code_dim=8, hidden=[16], tabular_separate=tabular_separate, tabular_levels=2, tabular_codes=8)
    model = MultiViewRQVAE({"a": 12, "b": 16, "tabular": 6}, config=rqvae, quantizer=config)
    feat, source = torch.randn(300, 16), torch.randint(0, 3, (300,))
    model.train()
    for _ in range(3):  # the k-means init and a few steps: codes that are not the initial ones
        model(feat, source)
    model.eval()
    mask = torch.rand(300) > 0.2
    for m in (None, mask):
        with torch.no_grad():
            want = model(feat, source, m).codes
        assert torch.equal(model.tokenize(feat, source, m), want)
    assert (want[~mask] == -1).all()


def _dm(cache, **kw) -> UserDataModule:
    return UserDataModule(dataset="synthetic", loader_args={"n_users": 200, "seed": 8}, window_mode="day",
                          text_encoder="hashing", cache_dir=str(cache), batch_size=16, progress=False, **kw)


def _rss_of(path) -> int:
    """KiB of ``path``'s mappings resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_released_pages_leave_the_resident_set_and_read_the_same(tmp_path):
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("madvise and /proc are Linux's")
    dm = _dm(tmp_path)
    dm.prepare_data()
    dm.setup()
    shard = dm.data_files()[0]
    loader = dm.predict_dataloader()
    loader.dataset.release_every = 10**9  # by hand below
    before = [b for b in loader]
    assert _rss_of(shard) > 0  # reading the users mapped the shard's pages in
    assert release_pages(dm.data_files()) > 0
    assert _rss_of(shard) == 0
    after = [b for b in loader]  # read again from the page cache: the same batches
    for a, b in zip(before, after, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    assert release_pages([str(tmp_path / "no-such-file")]) == 0


def test_a_length_ordered_predict_covers_everyone_once_with_the_same_numbers(tmp_path):
    from foundv2.stages.qformer import QFormerStage

    with pytest.raises(DataError, match="predict_order"):
        _dm(tmp_path, predict_order="random")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    out = {}
    for order in ("rows", "length"):
        L.seed_everything(0)
        stage = QFormerStage(qformer=QFormerConfig(dim=16, num_layers=1, num_heads=2), predict_dir=str(tmp_path / order))
        trainer.predict(stage, datamodule=_dm(tmp_path, predict_order=order), return_predictions=False)
        out[order] = read_stage_output(tmp_path / order)[0]
    rows, length = out["rows"], out["length"]
    assert rows["row"] == list(range(200)) and sorted(length["row"]) == list(range(200))
    dm = _dm(tmp_path, predict_order="length")
    dm.setup()
    assert np.all(np.diff(dm.row_lengths(np.asarray(length["row"]))) >= 0)  # shortest users first
    assert length["row"] != rows["row"]
    at = {r: i for i, r in enumerate(length["row"])}
    a = np.stack(rows.with_format("numpy")["user_emb"])
    b = np.stack(length.with_format("numpy")["user_emb"])[[at[r] for r in range(200)]]
    np.testing.assert_allclose(a, b, atol=1e-5)  # float rounding only
    for r in (0, 57, 199):
        np.testing.assert_allclose(np.stack(rows[r]["feat"]), np.stack(length[at[r]]["feat"]), atol=1e-5)
        assert rows[r]["slice_key"] == length[at[r]]["slice_key"]


def test_predict_throughput_reports_its_figures(tmp_path):
    from foundv2.stages.qformer import QFormerStage
    from foundv2.throughput import count_flops, predict_throughput

    stage = QFormerStage(qformer=QFormerConfig(dim=16, num_layers=1, num_heads=2), predict_dir=str(tmp_path / "kept"))
    res = predict_throughput(stage, _dm(tmp_path), max_users=40, flop_batches=2)
    assert res["users"] == 48  # whole batches of 16
    assert res["seconds"] > 0 and res["users_per_s"] == pytest.approx(48 / res["seconds"])
    assert res["peak_flops"] > 0 and res["flops_per_user"] > 0
    assert res["utilisation"] == pytest.approx(res["users_per_s"] * res["flops_per_user"] / res["peak_flops"])
    assert set(res["breakdown"]) == {"data", "model", "write", "other"} and res["breakdown"]["model"] > 0
    assert stage.predict_dir == str(tmp_path / "kept") and not (tmp_path / "kept").exists()  # scratch output only
    # the FLOP count is torch's: a known matmul counts 2·m·n·k
    assert count_flops(lambda a, b: a @ b, torch.ones(3, 4), torch.ones(4, 5)) == 2 * 3 * 4 * 5


def test_a_measured_sample_is_spread_over_the_length_order(tmp_path):
    """``max_users`` reads whole batches spread over the predict order: with the users ordered by
    length, the sample holds the longest batch too, not only the shortest (which would flatter)."""
    from foundv2.stages.qformer import QFormerStage
    from foundv2.throughput import predict_throughput

    dm = _dm(tmp_path, predict_order="length")
    stage = QFormerStage(qformer=QFormerConfig(dim=16, num_layers=1, num_heads=2))
    predict_throughput(stage, dm, max_users=48, flop_batches=1, keep_dir=str(tmp_path / "out"))
    order = dm.predict_rows()  # every user again: the sample is undone after the run
    assert len(order) == 200 and dm.predict_subset is None
    got = set(read_stage_output(tmp_path / "out")[0]["row"])
    assert set(order[:16]) <= got and set(order[192 - 16:192]) <= got and len(got) == 48
