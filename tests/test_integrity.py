"""Corrupt state, kills and read-only folders, each through the real CLI on a real toy run (the
synthetic pipeline of test_pipeline: 200 users, tiny nets, 1 epoch).

Every refused case asserts exit 2, a one-paragraph message naming the file and the fix, no
traceback, and that nothing was written: the run folder's bytes are the same before and after.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from data_modules.store import read_stage_output, save_export
from foundv2.cli import main
from foundv2.io import STAGING, ChecksumCheckpointIO
from tests.helpers import ROOT, kill_when, read_only
from tests.test_pipeline import _cfg, configs, run_copy  # noqa: F401 - the toy configs and a copy of this module's first run (fixtures)


# ------------------------------------------------------------------------------ the toy run
def _pipeline_yaml(configs, run: Path) -> str:  # noqa: F811
    path = run.parent / f"{run.name}-pipeline.yaml"
    path.write_text(yaml.safe_dump({"pipeline": dataclasses.asdict(_cfg(configs, run))}))
    return str(path)


@pytest.fixture(scope="module")
def first_run(configs, tmp_path_factory) -> Path:  # noqa: F811
    run = tmp_path_factory.mktemp("integrity") / "run"
    assert main(["pipeline", "--config", _pipeline_yaml(configs, run)]) == 0
    return run


def _bytes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` → the digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, argv: list[str], *phrases: str) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    message = err.replace("\r", "\n").rstrip("\n").split("\n")[-1]  # after a progress bar the step drew, if any
    assert "Traceback" not in err and message.startswith("foundv2: error: ") and err.count("foundv2:") == 1, err
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return message


def _pipeline(capsys, configs, run: Path, *phrases: str) -> str:  # noqa: F811
    """Rerun the pipeline on ``run`` twice: refused both times, the same message, nothing changed."""
    before = _bytes(run)
    argv = ["pipeline", "--config", _pipeline_yaml(configs, run)]
    first = _refused(capsys, argv, *phrases)
    assert _refused(capsys, argv, *phrases) == first  # every rerun, not only the first
    assert _bytes(run) == before, "a refused run changed the run folder"
    return first


def _checkpoints(run: Path, step: str) -> tuple[Path, Path]:
    """(the monitored best checkpoint, last.ckpt) of a step."""
    ckpts = sorted((run / step).rglob("*.ckpt"))
    return next(p for p in ckpts if not p.name.startswith("last")), next(p for p in ckpts if p.name == "last.ckpt")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoints_carry_a_checksum(first_run):
    best, last = _checkpoints(first_run, "stage1")
    for ckpt in (best, last):
        record = json.loads((ckpt.parent / f"{ckpt.name}.checksum").read_text())
        assert record["bytes"] == ckpt.stat().st_size
    removed = [p for p in (first_run / "stage1").rglob("*.checksum") if not Path(str(p)[: -len(".checksum")]).exists()]
    assert removed == [], "a removed checkpoint's checksum record stayed behind"


def test_truncated_last_checkpoint_in_a_pipeline_run(configs, run_copy, capsys):  # noqa: F811
    """A fit cut off while it wrote last.ckpt: every rerun says which file and how to go on."""
    (run_copy / "stage1" / "fit.done").unlink()  # the fit did not finish: the rerun resumes
    _, last = _checkpoints(run_copy, "stage1")
    _truncate(last)
    _pipeline(capsys, configs, run_copy, str(last), "truncated", f"rm {last}", "stage folder")


def test_truncated_best_checkpoint_used_by_predict(configs, run_copy, capsys):  # noqa: F811
    shutil.rmtree(run_copy / "stage1" / "features")  # the predict is to run again
    best, _ = _checkpoints(run_copy, "stage1")
    _truncate(best)
    _pipeline(capsys, configs, run_copy, str(best), "truncated", f"rm {best}")


def test_bit_flip_in_a_checkpoint(configs, run_copy, capsys):  # noqa: F811
    shutil.rmtree(run_copy / "tokenizer" / "tokens")
    best, _ = _checkpoints(run_copy, "tokenizer")
    _flip(best)
    _pipeline(capsys, configs, run_copy, str(best), "checksum mismatch")
    # the same checkpoint given to a LightningCLI command
    out = run_copy.parent / "out"
    _refused(capsys, ["predict", "--config", configs["data"], "--config", configs["tokenizer"], "--ckpt_path", str(best),
                      "--model.predict_dir", str(out)], str(best), "checksum mismatch")
    assert not out.exists()


def test_every_checkpoint_load_is_verified(first_run, tmp_path):
    """What Lightning itself loads (resume, --ckpt_path best) goes through the same check."""
    best, _ = _checkpoints(first_run, "stage1")
    copy = tmp_path / best.name
    shutil.copy(best, copy)
    shutil.copy(best.parent / f"{best.name}.checksum", tmp_path / f"{best.name}.checksum")
    io = ChecksumCheckpointIO()
    assert "state_dict" in io.load_checkpoint(copy, weights_only=False)
    _flip(copy)
    with pytest.raises(Exception, match="checksum mismatch") as err:
        io.load_checkpoint(copy, weights_only=False)
    assert type(err.value).__name__ == "DataError"


def test_an_unchanged_checkpoint_is_hashed_once(first_run, tmp_path, monkeypatch):
    """The pipeline checks a checkpoint, then the trainer's load checks it again: the second check
    of the same unchanged file does not hash it again; a changed record or file is checked anew."""
    import foundv2.io as fio

    best, _ = _checkpoints(first_run, "stage1")
    copy, record = tmp_path / best.name, tmp_path / f"{best.name}.checksum"
    shutil.copy(best, copy)
    shutil.copy(best.parent / f"{best.name}.checksum", record)
    hashed = []
    real = fio.verify_sidecar
    monkeypatch.setattr(fio, "verify_sidecar", lambda *a: hashed.append(a[0]) or real(*a))
    fio.verify_checkpoint(copy, "fix")
    assert "state_dict" in ChecksumCheckpointIO().load_checkpoint(copy, weights_only=False)
    assert len(hashed) == 1
    record.write_text(record.read_text().replace('"blake2b_128": "', '"blake2b_128": "0'))  # the record changed
    with pytest.raises(Exception, match="checksum mismatch"):
        fio.verify_checkpoint(copy, "fix")
    assert len(hashed) == 2


# ------------------------------------------------------------------------------ exports
def test_export_carries_checksums(first_run):
    export = first_run / "tokenizer" / "export"
    sums = json.loads((export / "checksums.json").read_text())
    assert sorted(sums) == ["config.json", "model.safetensors"]


def test_truncated_export_read_by_the_bench(configs, run_copy, capsys):  # noqa: F811
    weights = run_copy / "tokenizer" / "export" / "model.safetensors"
    _truncate(weights)
    shutil.rmtree(run_copy / "bench")  # the bench is to run again
    kept = {k: v for k, v in _bytes(run_copy).items() if not k.startswith("bench/")}
    _refused(capsys, ["pipeline", "--config", _pipeline_yaml(configs, run_copy)], str(weights), "truncated",
             "export it again")
    assert {k: v for k, v in _bytes(run_copy).items() if not k.startswith("bench/")} == kept
    assert not (run_copy / "bench" / "bench.json").exists() and not (run_copy / "bench" / "report.md").exists()


@pytest.mark.parametrize("damage", ["flip", "nan"])
def test_damaged_export_read_by_predict(configs, first_run, tmp_path, capsys, damage):  # noqa: F811
    export = tmp_path / "export"
    shutil.copytree(first_run / "tokenizer" / "export", export)
    if damage == "flip":
        _flip(export / "model.safetensors")
        phrases = (str(export / "model.safetensors"), "checksum mismatch")
    else:  # weights written whole, checksums and all, but NaN: a diverged fit
        from safetensors.torch import load_file

        state = load_file(str(export / "model.safetensors"))
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = torch.full_like(state[key], float("nan"))
        save_export(export, json.loads((export / "config.json").read_text()), state)
        phrases = (str(export / "model.safetensors"), "NaN", key)
    out = tmp_path / "tokens"
    _refused(capsys, ["tokenize", "--config", configs["data"], "--tokenizer", str(export), "--output", str(out),
                      "--accelerator", "cpu", "--devices", "1"], *phrases)
    assert not out.exists()


# ------------------------------------------------------------------------------ stage outputs
def test_a_stray_part_is_never_read(first_run, tmp_path):
    out = tmp_path / "features"
    shutil.copytree(first_run / "stage1" / "features", out)
    n = len(read_stage_output(out)[0])
    shutil.copy(out / "part-rank000.arrow", out / "part-rank001.arrow")  # left by another run
    assert len(read_stage_output(out)[0]) == n


def test_repredict_into_a_folder_with_a_stray_part(configs, run_copy):  # noqa: F811
    features = run_copy / "stage1" / "features"
    n = len(read_stage_output(features)[0])
    shutil.copy(features / "part-rank000.arrow", features / "part-rank001.arrow")
    (features / "meta.json").unlink()  # incomplete: the rerun predicts again
    assert main(["pipeline", "--config", _pipeline_yaml(configs, run_copy)]) == 0
    meta = json.loads((features / "meta.json").read_text())
    assert meta["parts"] == ["part-rank000.arrow"] and sorted(p.name for p in features.iterdir()) == [
        "dataset_info.json", "meta.json", "part-rank000.arrow", "state.json"]
    assert len(read_stage_output(features)[0]) == n
    assert not (features.parent / f"features{STAGING}").exists()


def test_predict_never_replaces_a_folder_that_is_not_a_stage_output(configs, first_run, tmp_path, capsys):  # noqa: F811
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a dataset")
    best, _ = _checkpoints(first_run, "stage1")
    _refused(capsys, ["predict", "--config", configs["data"], "--config", configs["stage1"], "--ckpt_path", str(best),
                      "--trainer.logger", "false", "--model.predict_dir", str(mine)],
             str(mine), "not a stage output", "notes.txt")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not (tmp_path / f"mine{STAGING}").exists()


class PauseAt(L.Callback):
    """Stops a predict (sleeps, to be killed) after ``batches`` batches, once ``marker`` is touched."""

    def __init__(self, marker: str, batches: int = 2):
        self.marker, self.batches = marker, batches

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 == self.batches:
            Path(self.marker).touch()
            time.sleep(600)


def test_killed_repredict_leaves_the_old_output_whole(configs, run_copy, tmp_path):  # noqa: F811
    """Kill a real predict into a complete output halfway: the old dataset is untouched; the next
    predict removes the staging folder the killed one left and swaps in its own."""
    features = run_copy / "stage1" / "features"
    before = _bytes(features)
    best, _ = _checkpoints(run_copy, "stage1")
    marker = tmp_path / "paused"
    pause = tmp_path / "pause.yaml"
    pause.write_text(yaml.safe_dump({"trainer": {"logger": False, "callbacks": [
        {"class_path": "tests.test_integrity.PauseAt", "init_args": {"marker": str(marker)}}]}}))
    argv = [sys.executable, "-m", "foundv2", "predict", "--config", configs["data"], "--config", configs["stage1"],
            "--config", str(pause), "--ckpt_path", str(best), "--model.predict_dir", str(features)]
    kill_when(argv, marker, 300, "predict", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = features.parent / f"features{STAGING}"
    assert staging.exists() and list(staging.glob("part-rank000.arrow.tmp"))  # it was writing aside
    assert _bytes(features) == before  # the old output, whole
    code = main(["predict", "--config", configs["data"], "--config", configs["stage1"], "--ckpt_path", str(best),
                 "--trainer.logger", "false", "--model.predict_dir", str(features)])
    assert code == 0 and not staging.exists()
    assert _bytes(features)["part-rank000.arrow"] == before["part-rank000.arrow"]  # the same model, the same rows


# ------------------------------------------------------------------------------ read-only folders
def test_read_only_run_folder_fails_up_front(configs, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    with read_only(run):
        _refused(capsys, ["pipeline", "--config", _pipeline_yaml(configs, run)], str(run), "not writable",
                 "pipeline.run_dir")
        assert list(run.iterdir()) == []


def test_read_only_step_folder_fails_before_any_step(configs, run_copy, capsys):  # noqa: F811
    shutil.rmtree(run_copy / "stage1" / "features")  # stage 1 would predict again: nothing may run
    before = _bytes(run_copy)
    with read_only(run_copy / "tokenizer"):
        _refused(capsys, ["pipeline", "--config", _pipeline_yaml(configs, run_copy)], str(run_copy / "tokenizer"),
                 "not writable")
    assert _bytes(run_copy) == before


def test_read_only_export_folder_fails_before_the_fit(configs, tmp_path, capsys):  # noqa: F811
    root, locked = tmp_path / "fit", tmp_path / "locked"
    with read_only(locked):
        _refused(capsys, ["fit", "--config", configs["data"], "--config", configs["tokenizer"],
                          "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                          "--model.export_dir", str(locked / "export")], str(locked), "not writable", "model.export_dir")
    assert not root.exists() or [p for p in root.rglob("*") if p.is_file()] == []


# ------------------------------------------------------------------------------ the console
def test_the_pipeline_console_is_quiet(configs, run_copy):  # noqa: F811
    """The whole toy pipeline again with progress bars on, as `make demo` runs it: the console
    holds the step lines, one line per progress bar, the table; Lightning's lines are in log.txt."""
    res = subprocess.run([sys.executable, "-m", "foundv2", "pipeline", "--config", _pipeline_yaml(configs, run_copy),
                          "--pipeline.trainer_args", '["--trainer.enable_progress_bar", "true"]',
                          "--pipeline.on_change", "restart"],
                         capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    out = (res.stdout + res.stderr).decode()  # bytes: text mode would turn the bars' \r into line ends
    assert res.returncode == 0, out[-3000:]
    console = out.rstrip("\n").split("\n")  # lines as a terminal or `wc -l` counts them
    bars = [line for line in console if "it/s]" in line or "probe/s" in line]
    assert len(bars) == 5, console  # each stage's fit and predict, the bench
    for noise in ("INFO", "GPU available", "Warning", "Params", "┏", "Sanity", "Validation"):
        assert not any(noise in line for line in console), (noise, console)
    assert sum(line.startswith("[pipeline] [") for line in console) == 6  # each step's start and end
    assert len(console) < 40, console
    log = (run_copy / "tokenizer" / "log.txt").read_text()
    assert "GPU available" in log and "Restoring states from the checkpoint" in log


def test_leftovers_of_a_killed_fit_are_removed_by_the_next_run(configs, run_copy):  # noqa: F811
    """A checkpoint and an export that a killed fit was writing (``.tmp-<pid>-<id>``, its pid dead)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    ckpts = next((run_copy / "tokenizer").rglob("last.ckpt")).parent
    tmp_ckpt = ckpts / f"last.ckpt.tmp-{dead.pid}-0badc0de"
    tmp_ckpt.write_bytes(b"half a checkpoint")
    tmp_export = run_copy / "tokenizer" / f"export.tmp-{dead.pid}-0badc0de"
    tmp_export.mkdir()
    (tmp_export / "config.json").write_text("{}")
    (run_copy / "tokenizer" / "fit.done").unlink()  # the fit is to run (resume) again
    assert main(["pipeline", "--config", _pipeline_yaml(configs, run_copy)]) == 0
    assert not tmp_ckpt.exists() and not tmp_export.exists()
    assert (run_copy / "tokenizer" / "fit.done").exists()


def test_a_single_fit_filters_the_known_harmless_warnings(configs, tmp_path):  # noqa: F811
    """`foundv2 fit` keeps Lightning's console, without the warnings foundv2.console filters."""
    root = tmp_path / "fit"
    res = subprocess.run([sys.executable, "-m", "foundv2", "fit", "--config", configs["data"], "--config",
                          configs["tokenizer"], "--trainer.default_root_dir", str(root),
                          "--trainer.logger.init_args.save_dir", str(root), "--trainer.log_every_n_steps", "50",
                          "--trainer.max_steps", "3"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GPU available" in res.stdout + res.stderr  # Lightning's own lines stay
    for harmless in ("smaller than the logging interval", "LeafSpec", "does not have many workers"):
        assert harmless not in res.stderr, harmless
