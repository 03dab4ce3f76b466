"""Resume after SIGKILL: a pipeline killed mid-fit and rerun ends with the same metrics and tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from data_modules.store import read_stage_output
from tests.helpers import ROOT, run_cli


def _configs(tmp_path, name: str) -> str:
    data = {"data": {"dataset": "synthetic", "loader_args": {"n_users": 300, "seed": 2}, "window_mode": "week",
                     "text_encoder": "hashing", "cache_dir": str(tmp_path / "cache"), "batch_size": 16,
                     "progress": False}}
    stage = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 6, "log_every_n_steps": 2,
                    "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "tb"}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True, "every_n_epochs": 1}}]},
        "model": {"class_path": "foundv2.stages.tokenizer.TokenizerStage",
                  "init_args": {"rqvae": {"code_dim": 8, "hidden": [32]},
                                "quantizer": {"n_shared_levels": 2, "n_specific_levels": 1, "shared_codes": 16,
                                              "specific_codes": 8, "kmeans_buffer": 256, "respawn_every": 5}}},
    }
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(stage))
    pipe = {"pipeline": {"run_dir": str(tmp_path / name), "data": str(tmp_path / "data.yaml"), "steps": [
        {"name": "tokenizer", "config": str(tmp_path / "tok.yaml"), "output": "tokens"}]}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(pipe))
    return str(path)


def _outcome(run_dir):
    metrics = json.loads((run_dir / "tokenizer" / "fit.done").read_text())["metrics"]
    tokens, _ = read_stage_output(run_dir / "tokenizer" / "tokens")
    codes = {u: np.asarray(c) for u, c in zip(tokens["user_id"], tokens["codes"], strict=True)}
    return metrics, codes


@pytest.mark.slow
def test_sigkill_mid_fit_then_rerun_matches_uninterrupted(tmp_path):
    clean = _configs(tmp_path, "clean")
    run_cli("pipeline", "--config", clean)
    killed = _configs(tmp_path, "killed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "foundv2", "pipeline", "--config", killed], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    ckpt_dir = tmp_path / "killed" / "tokenizer"
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.startswith("epoch=1") for p in ckpt_dir.rglob("*.ckpt")):
            break  # two epochs saved: now inside the third
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt_dir / "fit.done").exists()
    res = run_cli("pipeline", "--config", killed)
    assert "resuming from" in res.stdout
    m_clean, c_clean = _outcome(tmp_path / "clean")
    m_killed, c_killed = _outcome(tmp_path / "killed")
    for key in ("val/loss", "val/recon_mse", "train/loss_epoch", "val/collision_rate"):
        assert m_killed[key] == pytest.approx(m_clean[key], rel=1e-5, abs=1e-6), key
    assert c_clean.keys() == c_killed.keys()
    assert all(np.array_equal(c_clean[u], c_killed[u]) for u in c_clean)
