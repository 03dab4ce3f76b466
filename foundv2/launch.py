"""Running a stage or a data function from config files: the library under ``foundv2.cli`` and
``foundv2.pipeline`` (neither imports the other).

- :func:`lightning_cli` builds the LightningCLI over any stage (``model: class_path: ...``) and
  the :class:`~data_modules.datamodule.UserDataModule` (``data:``) from ``--config`` files and flags.
- :func:`fit_stage` / :func:`predict_stage`: a fit into a stage folder that resumes from its
  ``last.ckpt`` and records ``fit.done`` (its metrics and its best and last checkpoints); a predict
  from that folder's best (else last) checkpoint. Checkpoints are chosen by what they are (that
  record, else the global step and ModelCheckpoint state inside them), never by modification
  time: a run folder copied with ``cp -r`` predicts from the same model.
  The checkpoint is verified (size and checksum, :mod:`foundv2.io`) and every folder the run
  will write is checked writable (:func:`check_outputs`) before any work: a damaged checkpoint or
  a read-only folder is a one-paragraph DataError up front, not a traceback after the fit.
- :func:`data_parser` / :func:`run_with_data`: a parser of the ``data:`` section (plus one
  function's section, e.g. ``bench:``), and a call of that function on the configured DataModule.

This module imports no stage and no bench code at import time or inside its functions, so a
step's code fingerprint (``foundv2.pipeline``) can count it without pulling them all in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from data_modules.schema import DataError
from data_modules.store import atomic_write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: the marker a finished fit leaves in its stage folder (its final callback metrics)
FIT_DONE = "fit.done"
#: the sections the shared YAML files may hold besides ``data:``; parsers that do not read one ignore it
SECTIONS = ("trainer", "model", "ckpt_path", "seed_everything", "optimizer", "lr_scheduler", "pipeline", "bench")


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """Build the LightningCLI (``run=False`` only parses and instantiates: a fit or predict is
    then called on ``cli.trainer`` by the caller)."""
    import importlib.util

    from jsonargparse import set_parsing_settings
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningCLI

    from data_modules.datamodule import UserDataModule

    # a config dataclass's attribute docstrings are its options' --help (litgpt style)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    from foundv2.console import filter_warnings

    filter_warnings()  # the known harmless ones, e.g. the pipeline's own args= to LightningCLI
    has_omegaconf = importlib.util.find_spec("omegaconf") is not None

    class CLI(LightningCLI):
        def instantiate_trainer(self, **kwargs):
            from foundv2.io import install_checksums

            trainer = super().instantiate_trainer(**kwargs)
            install_checksums(trainer)  # checkpoints carry a checksum, verified on every load
            return trainer

        def _parse_ckpt_path(self):
            # LightningCLI torch.loads a --ckpt_path (a flag or a config's ckpt_path) for its
            # hyperparameters: the checkpoint is verified first (foundv2.io.verify_checkpoint)
            from foundv2.io import verify_checkpoint

            sub = self.config.get("subcommand")
            ckpt = self.config[sub].get("ckpt_path") if sub else None
            if ckpt and "://" not in str(ckpt) and Path(ckpt).is_file():
                verify_checkpoint(ckpt, "use another one, e.g. --ckpt_path last, or train again")
            return super()._parse_ckpt_path()

        def before_fit(self):
            check_outputs(self.trainer, self.model, "fit")
            remove_dead_leftovers(self.trainer, self.model)

        def before_predict(self):
            check_outputs(self.trainer, self.model, "predict")

    return CLI(
        LightningModule,
        UserDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": "omegaconf"} if has_omegaconf else None,
    )


def _choice_fix(path: Path, stage_dir: Path) -> str:
    return (f"delete it (rm {path}; the choice then falls to the other checkpoints), or delete the stage folder "
            f"{stage_dir} to fit the stage again")


def checkpoint_contents(path: Path, fix: str) -> dict:
    """A checkpoint's contents (global step, epoch, callback states; tensors memory-mapped, not
    read) through the weights-only loader; a damaged file is the DataError of its own check."""
    from foundv2.io import read_checkpoint_safely, verify_checkpoint

    try:
        return read_checkpoint_safely(path, fix)
    except DataError:
        verify_checkpoint(path, fix)  # truncated, checksum mismatch: that message, else the read error's
        raise


def _version(path: Path) -> int:
    """The logger version a checkpoint lies under (``.../version_3/checkpoints/x.ckpt`` → 3), else -1."""
    return max((int(p.split("_", 1)[1]) for p in path.parts if p.startswith("version_") and p[8:].isdigit()),
               default=-1)


def _newest(ckpts: list[Path], stage_dir: Path) -> Path:
    """Of a stage's checkpoints, the one furthest into training: the highest global step (then
    epoch, then logger version) recorded inside it."""
    if len(ckpts) == 1:
        return ckpts[0]

    def key(p: Path) -> tuple:
        ckpt = checkpoint_contents(p, _choice_fix(p, stage_dir))
        return int(ckpt.get("global_step") or 0), int(ckpt.get("epoch") or 0), _version(p), str(p)

    return max(ckpts, key=key)


def last_checkpoint(stage_dir: Path) -> Path | None:
    """The ``last*.ckpt`` under a stage folder furthest into training (what an interrupted fit
    resumes from): a resumed fit's in ``version_1``, not the killed one's in ``version_0``."""
    found = sorted(Path(stage_dir).rglob("last*.ckpt"))
    return _newest(found, Path(stage_dir)) if found else None


def _recorded(path: str, stage_dir: Path, ckpts: list[Path]) -> Path | None:
    """The checkpoint of ``ckpts`` (under ``stage_dir``) that a path recorded by the fit names,
    wherever the folder is now: the one whose path inside ``stage_dir`` ends the recorded path."""
    if not path:
        return None
    recorded = "/" + Path(path).as_posix().lstrip("/")
    ends = [c for c in ckpts if recorded.endswith("/" + c.relative_to(stage_dir).as_posix())]
    return max(ends, key=lambda c: len(c.parts)) if ends else None


def best_or_last_checkpoint(stage_dir: Path) -> Path:
    """The checkpoint a predict uses: the best one of the fit that finished (its first
    ModelCheckpoint's ``best_model_path``), else the last one. Chosen by what they are, not by
    modification time: the fit's record in ``fit.done``; else the ModelCheckpoint state inside
    the last checkpoint furthest into training; else the monitored checkpoint furthest into
    training; else that last one."""
    stage_dir = Path(stage_dir)
    ckpts = sorted(stage_dir.rglob("*.ckpt"))
    try:
        done = json.loads((stage_dir / FIT_DONE).read_text())
    except (OSError, ValueError):
        done = {}
    record = done.get("checkpoints") if isinstance(done, dict) else None
    if isinstance(record, dict) and record.get("best") and (stage_dir / record["best"]).is_file():
        return stage_dir / record["best"]
    last = last_checkpoint(stage_dir)
    if last is not None:
        callbacks = checkpoint_contents(last, _choice_fix(last, stage_dir)).get("callbacks") or {}
        for name, state in callbacks.items():
            if str(name).startswith("ModelCheckpoint") and isinstance(state, dict):
                if best := _recorded(str(state.get("best_model_path") or ""), stage_dir, ckpts):
                    return best
    others = [p for p in ckpts if not p.name.startswith("last")]
    if others:
        return _newest(others, stage_dir)
    if last is None:
        raise DataError(f"{stage_dir}: no checkpoint to predict from; the fit did not save one.")
    return last


def _checkpoint_record(trainer, stage_dir: Path) -> dict[str, str]:
    """The finished fit's best and last checkpoints (its first ModelCheckpoint's), relative to
    ``stage_dir``: what ``fit.done`` records for :func:`best_or_last_checkpoint`."""
    cb = trainer.checkpoint_callback
    record = {}
    for key, attr in (("best", "best_model_path"), ("last", "last_model_path")):
        path = getattr(cb, attr, "") if cb is not None else ""
        if path and "://" not in str(path) and Path(path).is_file():
            try:
                record[key] = Path(path).resolve().relative_to(Path(stage_dir).resolve()).as_posix()
            except ValueError:  # outside the stage folder
                continue
    return record


def check_outputs(trainer, model, command: str) -> None:
    """Every folder a fit (logs, checkpoints, the model's ``export_dir``) or a predict (the
    model's ``predict_dir``) will write must be writable: a DataError naming it, before any work."""
    from data_modules.store import check_output_folder, check_writable

    fix = "point {key} at a folder you can write, or fix its permissions"
    folders = []
    if command == "fit":
        folders.append((trainer.default_root_dir, "trainer.default_root_dir"))
        if trainer.logger is not None and getattr(trainer.logger, "save_dir", None):
            folders.append((trainer.logger.save_dir, "the logger's save_dir"))
        folders += [(cb.dirpath, "the ModelCheckpoint dirpath") for cb in trainer.checkpoint_callbacks
                    if getattr(cb, "dirpath", None)]
    # folders replaced whole (written aside in their parent, then swapped in): the parent and the folder
    key = "model.export_dir" if command == "fit" else "model.predict_dir"
    whole = getattr(model, key.split(".")[1], None)
    if whole and command == "fit":
        folders += [(Path(whole).absolute().parent, key)] + ([(whole, key)] if Path(whole).exists() else [])
    for folder, key in folders:
        if folder and "://" not in str(folder):
            check_writable(folder, f"{command} output ({key})", fix.format(key=key))
    if whole and command == "predict":
        check_output_folder(whole, f"{command} output ({key})", fix.format(key=key))


def remove_dead_leftovers(trainer, model) -> None:
    """Before a fit, on rank 0: what a killed fit left beside its checkpoints and its export
    (``<name>.tmp-<pid>-<id>`` of a dead pid: a checkpoint or an export being written)."""
    from data_modules.store import remove_dead_tmp

    if not trainer.is_global_zero:
        return
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "dirpath", None) and "://" not in str(cb.dirpath):
            remove_dead_tmp(cb.dirpath)
    if export := getattr(model, "export_dir", None):
        remove_dead_tmp(Path(export).absolute().parent, prefix=Path(export).name)


def remove_leftovers(stage_dir: Path) -> list[Path]:
    """Remove the temporary files and folders (``<name>.tmp-<pid>-<id>``: a checkpoint, an export,
    a report being written) under a stage folder whose writer is dead, i.e. killed; return them."""
    from data_modules.store import remove_dead_tmp

    return remove_dead_tmp(stage_dir, recursive=True)


def _stage_cli(args: list[str], fn: str, quiet: bool):
    """The stage's LightningCLI (not run), its outputs checked for ``fn`` (fit or predict) before
    any work, the trainer made quiet when asked."""
    cli = lightning_cli(args, run=False)
    check_outputs(cli.trainer, cli.model, fn)
    if quiet:
        from foundv2.console import quiet_trainer

        quiet_trainer(cli.trainer)
    return cli


def fit_stage(args: list[str], stage_dir: Path, say: Callable[[str], None] = print, quiet: bool = False) -> dict:
    """Fit the stage that ``args`` configure; resume from ``stage_dir``'s ``last.ckpt`` when a
    run was cut off; rank 0 then writes ``stage_dir/fit.done`` with the final metrics (returned).

    ``args`` should point the trainer's root and logger into ``stage_dir`` so the checkpoints land
    there. ``quiet``: one progress-bar line, the model summary logged (:func:`foundv2.console.quiet_trainer`).
    """
    from foundv2.io import verify_checkpoint

    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:  # the rank that writes them
        for p in remove_leftovers(stage_dir):
            say(f"  fit: removed {p}, left by a killed run")
    last = last_checkpoint(stage_dir)
    if last is not None:
        verify_checkpoint(last, f"delete it (rm {last}) to start this fit again from the beginning, or delete "
                                f"the stage folder {stage_dir} to run the whole stage again")
    cli = _stage_cli(args, "fit", quiet)
    if last is not None:
        say(f"  fit: resuming from {last}")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last else None)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    if cli.trainer.is_global_zero:  # which checkpoints this fit ended with: what a predict uses
        atomic_write_json(Path(stage_dir) / FIT_DONE,
                          {"metrics": metrics, "checkpoints": _checkpoint_record(cli.trainer, stage_dir)})
    cli.trainer.strategy.barrier("fit-stage")
    return metrics


def predict_stage(args: list[str], stage_dir: Path, quiet: bool = False) -> None:
    """Predict with the stage that ``args`` configure from ``stage_dir``'s best (else last)
    checkpoint; ``args`` name the output (``--model.predict_dir``)."""
    from foundv2.io import verify_checkpoint

    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:  # what a killed predict left
        remove_leftovers(stage_dir)
    ckpt = best_or_last_checkpoint(stage_dir)
    verify_checkpoint(ckpt, f"delete it (rm {ckpt}; the predict then uses the newest other checkpoint, else "
                            f"last.ckpt), or delete the stage folder {stage_dir} to fit the stage again")
    cli = _stage_cli(args, "predict", quiet)
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt), return_predictions=False)


def data_parser(prog: str = "", description: str = "", skip: tuple[str, ...] = (), data_class=None):
    """A parser of ``--config`` files' ``data:`` section (the other shared sections are accepted
    and ignored, except those in ``skip``, which the caller adds itself). ``data:`` builds a
    UserDataModule, or ``data_class`` (:class:`~data_modules.settings.DataSettings`: the same
    settings without Lightning, for ``foundv2 data``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    if data_class is None:
        from data_modules.datamodule import UserDataModule as data_class

    parser = ArgumentParser(prog=prog, description=description, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with a `data:` section (repeatable)")
    parser.add_class_arguments(data_class, "data")
    for extra in SECTIONS:
        if extra not in skip:
            parser.add_argument(f"--{extra}", type=object, default=None, help="(read by other commands)")
    return parser


def function_parser(fn: Callable, section: str, prog: str = "", description: str = ""):
    """:func:`data_parser` plus ``fn``'s arguments (all but its first, the DataModule) under ``section``."""
    import inspect

    first = next(iter(inspect.signature(fn).parameters))
    parser = data_parser(prog, description, skip=(section,))
    parser.add_function_arguments(fn, section, skip={first})
    return parser


def run_with_data(fn: Callable, section: str, args: list[str], prog: str = "", description: str = "") -> tuple:
    """Parse ``args`` (``--config data.yaml --config fn.yaml --<section>.x ...``), build the
    DataModule from ``data:`` and call ``fn(dm, **kwargs)`` with the section's arguments: how
    the bench runs (``run_with_data(run_bench, "bench", args)``). Returns (its result, kwargs)."""
    parser = function_parser(fn, section, prog, description)
    cfg = parser.parse_args(args)
    dm = parser.instantiate_classes(cfg).data
    kwargs = cfg[section].as_dict()
    return fn(dm, **kwargs), kwargs
