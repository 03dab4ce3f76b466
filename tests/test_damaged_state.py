"""Damaged and foreign state, each through the real CLI on real files (the toy runs of
test_pipeline: synthetic, 200 users, tiny nets, 1 epoch): a checkpoint without its checksum record
(NaN weights, a pickle that asks for ``posix.system``), an export without ``checksums.json``, a run
folder copied with new modification times, a restart over a folder the pipeline did not make,
read-only and file outputs of ``tokenize`` and ``embed``, a bench input that cannot be read, the
temporaries of a killed run.

Every refused case asserts exit 2, a one-paragraph message naming the file and the fix, no
traceback, and that nothing was deleted or half-written.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from data_modules.schema import DataError
from data_modules.store import ALLOW_NO_CHECKSUM_FLAG, CHECKSUMS_FILE
from foundv2 import launch
from foundv2.cli import main
from foundv2.io import STAGING
from tests.helpers import read_only, run_cli
from tests.test_integrity import _bytes, _checkpoints, _pipeline_yaml, _refused, first_run  # noqa: F401 - a fixture
from tests.test_pipeline import configs, run_copy  # noqa: F401 - fixtures


class AsksForSystem:
    """Pickles as a call of ``os.system`` (``posix.system``): what a booby-trapped checkpoint holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cli_refused(res, *phrases: str) -> str:
    """A ``python -m foundv2`` run that ended in one paragraph and exit 2, without a traceback."""
    assert res.returncode == 2, res.stderr[-3000:]
    message = res.stderr.rstrip("\n").split("\n")[-1]
    assert "Traceback" not in res.stderr and message.startswith("foundv2: error: "), res.stderr[-3000:]
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return message


def _predict(configs, ckpt: Path, out: Path, *extra: str) -> list[str]:  # noqa: F811
    return ["predict", "--config", configs["data"], "--config", configs["stage1"], "--ckpt_path", str(ckpt),
            "--trainer.logger", "false", "--model.predict_dir", str(out), *extra]


def _tokenize(configs, export: Path, out: Path, *extra: str) -> list[str]:  # noqa: F811
    return ["tokenize", "--config", configs["data"], "--tokenizer", str(export), "--output", str(out),
            "--accelerator", "cpu", "--devices", "1", *extra]


def _nothing_beside(out: Path) -> None:
    """No output and no staging or temporary folder of it."""
    assert not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*")), sorted(out.parent.iterdir())


# ------------------------------------------------------------------------------ bare checkpoints
def test_bare_checkpoint_is_used_only_when_allowed_and_never_with_nan(configs, first_run, tmp_path, capsys):  # noqa: F811
    best, _ = _checkpoints(first_run, "stage1")
    bare = tmp_path / "bare.ckpt"  # a whole checkpoint, copied without its checksum record
    shutil.copy(best, bare)
    out = tmp_path / "features"
    _refused(capsys, _predict(configs, bare, out), str(bare), "no checksum record", ALLOW_NO_CHECKSUM_FLAG)
    _nothing_beside(out)
    ckpt = torch.load(bare, map_location="cpu", weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key][0] = float("inf")
    nan = tmp_path / "nan.ckpt"
    ckpt["state_dict"][key][-1] = float("nan")
    torch.save(ckpt, nan)
    for extra in ([], [ALLOW_NO_CHECKSUM_FLAG]):  # NaN/inf is refused whether or not bare ones are allowed
        _refused(capsys, _predict(configs, nan, out, *extra), str(nan), "NaN or inf", key)
        _nothing_beside(out)
    assert main(_predict(configs, bare, out, ALLOW_NO_CHECKSUM_FLAG)) == 0  # allowed and finite: used
    assert (out / "meta.json").exists()


def test_bare_checkpoint_asking_for_posix_system_is_never_unpickled(configs, tmp_path, capsys):  # noqa: F811
    marker = tmp_path / "it-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": AsksForSystem(marker)}}, evil)
    out = tmp_path / "features"
    # LightningCLI reads a --ckpt_path's hyperparameters itself: the check comes first, allowed or not
    for extra in ([], [ALLOW_NO_CHECKSUM_FLAG]):
        _cli_refused(run_cli(*_predict(configs, evil, out, *extra), check=False), str(evil), "posix.system",
                     "weights-only")
    _nothing_beside(out)
    # the other loads: a stage's load_from_checkpoint (embed, the bench, append) and a fit's resume
    from foundv2.stages.qformer import QFormerStage

    with pytest.raises(DataError, match="posix.system"):
        QFormerStage.load_from_checkpoint(evil)
    _refused(capsys, ["embed", "--config", configs["data"], "--embed.checkpoint", str(evil), "--embed.output_dir",
                      str(out), ALLOW_NO_CHECKSUM_FLAG], str(evil), "posix.system")
    root = tmp_path / "fit"
    _refused(capsys, ["fit", "--config", configs["data"], "--config", configs["stage1"], "--ckpt_path", str(evil),
                      "--trainer.default_root_dir", str(root), "--trainer.logger", "false"], "posix.system")
    assert not marker.exists() and not out.exists()


# ------------------------------------------------------------------------------ exports
@pytest.fixture
def fitted_export(configs, tmp_path) -> Path:  # noqa: F811
    """A tokenizer fit's folder (``foundv2 fit``, 1 epoch) with its export in ``export/``."""
    root = tmp_path / "fit"
    assert main(["fit", "--config", configs["data"], "--config", configs["tokenizer"], "--trainer.default_root_dir",
                 str(root), "--trainer.logger.init_args.save_dir", str(root), "--model.export_dir",
                 str(root / "export")]) == 0
    return root / "export"


def test_export_without_checksums_is_refused_with_the_command_that_exports_it(configs, fitted_export, tmp_path,  # noqa: F811
                                                                              capsys):
    export = fitted_export
    weights = (export / "model.safetensors").read_bytes()
    (export / CHECKSUMS_FILE).unlink()
    out = tmp_path / "tokens"
    message = _refused(capsys, _tokenize(configs, export, out), str(export), CHECKSUMS_FILE, ALLOW_NO_CHECKSUM_FLAG,
                       f"--config {export.parent / 'tb' / 'version_0' / 'config.yaml'}")
    _nothing_beside(out)
    # allowed: used as it is; and a killed run's temporaries beside the output (their pid dead) go
    dead = _dead_pid()
    left = [out.parent / f"tokens.tmp-{dead}-0badc0de", out.parent / f"tokens{STAGING}.tmp-{dead}-report-x"]
    for p in left:
        p.mkdir()
        (p / "part").write_bytes(b"half")
    assert main(_tokenize(configs, export, out, ALLOW_NO_CHECKSUM_FLAG)) == 0
    assert (out / "meta.json").exists() and not any(p.exists() for p in left)
    # the command the message names exports it again, the same weights, with its checksums
    command = shlex.split(message.split("export it again: ", 1)[1].split(". To use it", 1)[0])
    assert command[0] == "foundv2" and main(command[1:]) == 0
    assert (export / CHECKSUMS_FILE).exists() and (export / "model.safetensors").read_bytes() == weights
    # a hand-edited config: said to have changed since it was written, one fix, not wrapped in another
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "note": "mine"}))
    message = _refused(capsys, _tokenize(configs, export, tmp_path / "tokens2"), str(export / "config.json"),
                       "changed since it was written", "size and checksum differ")
    assert "truncated" not in message and message.count("export it again") == 1, message


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------ choosing a checkpoint
def test_a_copied_run_folder_predicts_from_the_same_checkpoint(configs, tmp_path):  # noqa: F811
    """A fit killed after its first epoch (version_0), resumed to the end (version_1), then the
    folder copied as ``cp -r`` does (every file new) with the killed fit's files made the newest:
    the same checkpoint is chosen, by the fit's record and, without it, by what the checkpoints
    hold; and the copy predicts the same features."""
    stage = tmp_path / "run" / "stage1"
    args = ["--config", configs["data"], "--config", configs["stage1"], "--trainer.default_root_dir", str(stage),
            "--trainer.logger.init_args.save_dir", str(stage)]
    launch.fit_stage([*args, "--trainer.max_epochs", "1"], stage, say=lambda _: None, quiet=True)
    (stage / launch.FIT_DONE).unlink()  # as if killed after its first epoch's checkpoints
    launch.fit_stage([*args, "--trainer.max_epochs", "2"], stage, say=lambda _: None, quiet=True)
    best, last = launch.best_or_last_checkpoint(stage), launch.last_checkpoint(stage)
    assert "version_1" in best.parts and "version_1" in last.parts and not best.name.startswith("last")
    assert len(list(stage.rglob("*.ckpt"))) == 4  # both fits' best and last
    copy = tmp_path / "copy" / "stage1"
    shutil.copytree(stage, copy, copy_function=shutil.copyfile)  # cp -r: every modification time is now
    later = time.time() + 3600
    for p in (copy / "tb" / "version_0").rglob("*"):
        os.utime(p, (later, later))
    for record in (True, False):
        if not record:
            (copy / launch.FIT_DONE).unlink()  # no record of which fit finished: what the checkpoints hold
        assert launch.best_or_last_checkpoint(copy).relative_to(copy) == best.relative_to(stage)
        assert launch.last_checkpoint(copy).relative_to(copy) == last.relative_to(stage)
    for folder in (stage, copy):
        launch.predict_stage([*args, "--trainer.logger", "false", "--model.predict_dir", str(folder / "features")],
                             folder, quiet=True)
    assert _bytes(copy / "features")["part-rank000.arrow"] == _bytes(stage / "features")["part-rank000.arrow"]


# ------------------------------------------------------------------------------ restart
def test_restart_never_deletes_a_folder_the_pipeline_did_not_make(configs, run_copy, capsys):  # noqa: F811
    shutil.rmtree(run_copy / "bench")
    (run_copy / "bench").mkdir()
    (run_copy / "bench" / "notes.txt").write_text("mine")  # the user's folder, where the bench step writes
    before = _bytes(run_copy)
    argv = ["pipeline", "--config", _pipeline_yaml(configs, run_copy)]
    _refused(capsys, argv, str(run_copy / "bench"), "not made by the pipeline: restart leaves it")
    _refused(capsys, [*argv, "--pipeline.on_change", "restart"], str(run_copy / "bench"), "not made by the pipeline",
             "nothing was removed")
    assert _bytes(run_copy) == before
    shutil.rmtree(run_copy / "bench")
    (run_copy / "bench").write_text("mine")  # a file in the way
    _refused(capsys, [*argv, "--pipeline.on_change", "restart"], str(run_copy / "bench"), "is a file, not a folder")
    assert (run_copy / "bench").read_text() == "mine"


# ------------------------------------------------------------------------------ outputs
def test_tokenize_and_embed_check_their_output_up_front(configs, first_run, tmp_path, capsys):  # noqa: F811
    export = first_run / "tokenizer" / "export"
    locked = tmp_path / "locked"
    with read_only(locked):  # a read-only output folder, through the real command line
        _cli_refused(run_cli(*_tokenize(configs, export, locked), check=False), str(locked), "not writable",
                     "--output")
        assert list(locked.iterdir()) == []
        _refused(capsys, _tokenize(configs, export, locked / "tokens"), str(locked), "not writable")  # under it
        _refused(capsys, ["embed", "--config", configs["data"], "--embed.checkpoint", str(tmp_path / "none.ckpt"),
                          "--embed.output_dir", str(locked / "emb")], str(locked), "not writable",
                 "embed.output_dir")
        assert list(locked.iterdir()) == []
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for out in (a_file, a_file / "tokens"):
        message = _refused(capsys, _tokenize(configs, export, out), str(a_file), "is a file, not a folder")
        assert "NotADirectoryError" not in message
    assert a_file.read_text() == "mine"


# ------------------------------------------------------------------------------ the bench's inputs
def test_the_bench_checks_its_inputs_before_the_first_probe(configs, first_run, tmp_path, capsys):  # noqa: F811
    features = tmp_path / "features"
    shutil.copytree(first_run / "stage1" / "features", features)
    argv = ["bench", "--config", configs["data"], "--config", configs["bench"], "--bench.progress", "false",
            "--bench.tokens_dir", str(first_run / "tokenizer" / "tokens"), "--bench.tokenizer_dir",
            str(first_run / "tokenizer" / "export"), "--bench.embeddings", json.dumps({"qformer": str(features)})]
    part = features / "part-rank000.arrow"
    data = part.read_bytes()
    part.unlink()  # a part meta.json lists is missing: refused before anything is read or written
    out = tmp_path / "bench"
    _refused(capsys, [*argv, "--bench.output_dir", str(out)], "bench.embeddings.qformer", str(features),
             "part-rank000.arrow")
    assert not out.exists()
    part.write_bytes(data[: len(data) // 2])  # cut short: refused before the first probe (the token rows come first)
    _refused(capsys, [*argv, "--bench.output_dir", str(out)], str(features), "truncated")
    assert not (out / "scores").exists() and not (out / "bench.json").exists()
