"""``foundv2 embed`` on real synthetic data with a trained tiny-LM QAnchorStage checkpoint: the
written embeddings equal a full pass per user and query, bad input is one paragraph and exit 2
with nothing written, and 2-process gloo DDP writes one part per rank with the same embeddings."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.datamodule import UserDataModule
from data_modules.schema import DataError
from data_modules.store import read_stage_output
from foundv2.embed import embed_command
from foundv2.nn.anchor import AnchorHeadConfig
from foundv2.stages.base import OptimConfig
from foundv2.stages.qanchor import QAnchorStage
from tests.helpers import run_cli

QUESTIONS = [{"name": "future", "query": "What will this user do next?", "answer": "future_summary"},
             {"name": "fav", "query": "Which categories does this user like most?", "answer": "top_categories"}]
SERVED = ["Is this user a night owl?", "Which categories will this user buy next?", "How loyal is this user?"]


def _data(cache) -> dict:
    return {"dataset": "synthetic", "loader_args": {"n_users": 60, "seed": 5}, "window_mode": "day",
            "text_encoder": "hashing", "cache_dir": str(cache), "batch_size": 16, "progress": False,
            "max_events": 24, "questions": QUESTIONS}


def _flags(data: dict) -> list[str]:
    return [a for k, v in data.items()
            for a in (f"--data.{k}", json.dumps(v) if isinstance(v, (dict, list, bool)) else str(v))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A QAnchorStage checkpoint after a few steps on the training users' pairs."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("embed")
    data = _data(root / "cache")
    L.seed_everything(0)
    stage = QAnchorStage(lm="tiny", head=AnchorHeadConfig(emb_dim=16, hidden=32),
                         optim=OptimConfig(lr=3e-3, weight_decay=0.0))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, max_steps=3,
                        default_root_dir=str(root))
    trainer.fit(stage, datamodule=UserDataModule(**data))
    ckpt = root / "qanchor.ckpt"
    trainer.save_checkpoint(ckpt)
    return root, data, ckpt


def _args(data: dict, ckpt, out, *extra: str) -> list[str]:
    return [*_flags(data), "--embed.checkpoint", str(ckpt), "--embed.output_dir", str(out),
                 "--embed.accelerator", "cpu", "--embed.devices", "1", "--embed.progress", "false", *extra]


def _embed(data: dict, ckpt, out, *extra: str) -> int:
    return embed_command(_args(data, ckpt, out, *extra))


def _by_user(folder) -> tuple[dict, dict]:
    table, meta = read_stage_output(folder)
    return {int(u): np.asarray(v, dtype=np.float32) for u, v in zip(table["user_id"], table["user_emb"],
                                                                     strict=True)}, meta


def test_embed_writes_every_user_for_every_query_as_a_full_pass(trained, tmp_path):
    root, data, ckpt = trained
    out = tmp_path / "emb"
    assert _embed(data, ckpt, out, "--embed.queries", json.dumps(SERVED)) == 0
    emb, meta = _by_user(out)
    dm = UserDataModule(**data)
    dm.prepare_data()
    dm.setup("predict")
    assert meta["queries"] == SERVED and meta["emb_dim"] == 16 and meta["parts"] == ["part-rank000.arrow"]
    assert len(emb) == len(dm.table) and all(v.shape == (16 * len(SERVED),) for v in emb.values())
    stage = QAnchorStage.load_from_checkpoint(ckpt).eval()
    checked = 0
    with torch.no_grad():
        for batch in dm.predict_dataloader():
            prefix = stage.net.prefix.inputs_from(batch)
            for q, text in enumerate(SERVED):
                # cut to max_query_tokens as in training (the byte-level tiny LM: one token a byte)
                ids, mask = stage.net.tokenize_queries([text] * len(batch["user_id"]),
                                                       max_length=stage.hparams.max_query_tokens)
                full = stage.net(prefix, ids, mask).embedding.numpy()
                for u, f in zip(batch["user_id"].tolist(), full, strict=True):
                    np.testing.assert_allclose(emb[u][16 * q: 16 * (q + 1)], f, atol=1e-4)
                    checked += 1
    assert checked == len(dm.table) * len(SERVED)
    # the same users embedded for the checkpoint's own queries (no list given), and from a file
    own = tmp_path / "own"
    assert _embed(data, ckpt, own) == 0
    assert _by_user(own)[1]["queries"] == [q["query"] for q in QUESTIONS]
    listed = tmp_path / "queries.txt"
    listed.write_text(f"{SERVED[2]}\n\n{SERVED[0]}\n")
    assert _embed(data, ckpt, tmp_path / "file", "--embed.queries_file", str(listed)) == 0
    from_file, meta = _by_user(tmp_path / "file")
    assert meta["queries"] == [SERVED[2], SERVED[0]]
    for u, v in from_file.items():  # the same embedding for a query whatever the other queries of the list
        np.testing.assert_allclose(v[:16], emb[u][32:48], atol=1e-5)


def test_bad_input_is_one_paragraph_and_nothing_written(trained, tmp_path):
    root, data, ckpt = trained
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(ckpt.read_bytes()[:5000])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = {
        "missing checkpoint": (tmp_path / "nope.ckpt", [], "no such checkpoint"),
        "corrupt checkpoint": (corrupt, [], "corrupt"),
        "unknown query list": (ckpt, ["--embed.queries_file", str(tmp_path / "nope.txt")], "cannot be read"),
        "empty query list": (ckpt, ["--embed.queries_file", str(empty)], "empty"),
        "both query sources": (ckpt, ["--embed.queries", '["a"]', "--embed.queries_file", str(empty)], "not both"),
    }
    for what, (path, extra, words) in cases.items():
        out = tmp_path / what.replace(" ", "-")
        with pytest.raises(DataError) as err:
            _embed(data, path, out, *extra)
        assert words in str(err.value) and "\n" not in str(err.value), (what, err.value)
        assert not out.exists() and not list(tmp_path.glob(f"{out.name}*")), what
    # the command turns it into one paragraph and exit status 2, without a traceback
    out = tmp_path / "cli"
    res = run_cli("embed", *_args(data, tmp_path / "nope.ckpt", out), check=False)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("foundv2: error: ")
    assert "no such checkpoint" in res.stderr and "Traceback" not in res.stderr and not out.exists()


@pytest.mark.ddp
def test_embed_under_two_process_ddp_writes_one_part_per_rank(trained, tmp_path):
    root, data, ckpt = trained
    common = [*_flags(data), "--embed.checkpoint", str(ckpt), "--embed.accelerator", "cpu",
              "--embed.progress", "false", "--embed.queries", json.dumps(SERVED[:2])]
    run_cli("embed", *common, "--embed.devices", "1", "--embed.output_dir", str(tmp_path / "one"))
    run_cli("embed", *common, "--embed.devices", "2", "--embed.strategy", "ddp", "--embed.output_dir",
            str(tmp_path / "two"))
    one, _ = _by_user(tmp_path / "one")
    two, meta = _by_user(tmp_path / "two")
    assert meta["world_size"] == 2 and meta["parts"] == ["part-rank000.arrow", "part-rank001.arrow"]
    assert one.keys() == two.keys() and len(one) == 60
    for u in one:
        np.testing.assert_allclose(one[u], two[u], atol=1e-5)
