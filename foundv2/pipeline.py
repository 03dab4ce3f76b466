"""``foundv2 pipeline``: stage 1 fit → predict → stage 2 fit → predict → bench, in one run folder.

Each step leaves an artifact whose completeness can be checked (a ``fit.done`` marker, a stage
output with its ``meta.json``, ``bench.json``); a step whose artifact is complete is skipped, so
rerunning the same command after a crash resumes. An interrupted fit resumes from its
``last.ckpt``. Every stage is configured by its own YAML (the ones a user also runs by hand);
the pipeline only points their outputs into the run folder and passes the common trainer flags.

Run folder::

    <run_dir>/stage1/          TensorBoard logs, checkpoints, fit.done
    <run_dir>/features/        stage-1 features dataset (Arrow parts + meta.json)
    <run_dir>/tokenizer/       logs, checkpoints, export/ (save_pretrained), fit.done
    <run_dir>/tokens/          tokens dataset + report.json
    <run_dir>/bench/           bench.json, report.md, plots, tb/
    <run_dir>/fingerprint.json what the results depend on (config, stage YAMLs, code); a folder
                               written by another fingerprint is not silently reused
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_modules.schema import DataError
from data_modules.store import atomic_write_json, output_is_complete


@dataclass
class PipelineConfig:
    """What the pipeline runs.

    Args:
        run_dir: the run folder; every artifact goes under it.
        stage1: stage-1 YAML (QFormerStage), or null to feed the tokenizer pooled features.
        tokenizer: stage-2 YAML (TokenizerStage).
        bench: bench YAML (its ``data`` section should match the stages').
        trainer_args: extra CLI flags for every fit/predict, e.g. ["--trainer.devices", "2"].
        stage1_args: extra CLI flags for stage 1 only (e.g. a shorter schedule).
        tokenizer_args: extra CLI flags for the tokenizer only.
        bench_args: extra flags for the bench (e.g. ["--bench.sasrec_epochs", "5"]).
        on_change: what to do when the run folder holds steps made by another pipeline config,
            other stage YAMLs or other foundv2 code (see :func:`fingerprint`): ``error`` (stop
            and say so; nothing is touched) or ``restart`` (remove those steps' outputs and run
            them again). Complete steps of an unchanged run are always skipped.
    """

    run_dir: str
    stage1: str | None = None
    tokenizer: str | None = None
    bench: str | None = None
    trainer_args: list[str] = field(default_factory=list)
    stage1_args: list[str] = field(default_factory=list)
    tokenizer_args: list[str] = field(default_factory=list)
    bench_args: list[str] = field(default_factory=list)
    on_change: str = "error"


#: the folders and files a pipeline run writes under its run_dir (what ``restart`` removes)
STEP_OUTPUTS = ("stage1", "features", "tokenizer", "tokens", "bench", "timings.json")
FINGERPRINT = "fingerprint.json"
FINGERPRINT_WAIT_S = 600


def fingerprint(cfg: PipelineConfig) -> dict:
    """What a run folder's results depend on: the pipeline config, the text of every stage YAML
    it names, and a hash of the foundv2 and data_modules sources. Two runs with equal
    fingerprints may share a folder; otherwise skipping "complete" steps would report results
    of other code or other settings as this run's."""
    import hashlib
    from dataclasses import asdict

    import data_modules
    import foundv2

    h = hashlib.sha256()
    for pkg in (foundv2, data_modules):
        root = Path(pkg.__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    conf = {k: v for k, v in asdict(cfg).items() if k != "on_change"}
    yamls = {s: hashlib.sha256(Path(p).read_bytes()).hexdigest() for s in ("stage1", "tokenizer", "bench")
             if (p := getattr(cfg, s)) and Path(p).exists()}
    return {"config": conf, "yaml_sha256": yamls, "code_sha256": h.hexdigest()}


def _check_fingerprint(cfg: PipelineConfig, run: Path) -> None:
    """Compare the run folder's recorded fingerprint with this run's; act on ``on_change``."""
    if cfg.on_change not in ("error", "restart"):
        raise DataError(f"pipeline.on_change must be 'error' or 'restart', got {cfg.on_change!r}.")
    now = fingerprint(cfg)
    path = run / FINGERPRINT
    existing = [name for name in STEP_OUTPUTS if (run / name).exists()]
    try:
        before = json.loads(path.read_text())  # none or unreadable: nothing says what made the steps
    except (OSError, json.JSONDecodeError):
        before = {}
    if existing and before != now:
        changed = [k for k in ("config", "yaml_sha256", "code_sha256") if before.get(k) != now[k]]
        why = (f"made with a different {' and '.join(changed)} than this run" if before
               else f"but no {FINGERPRINT} says what made them")
        if cfg.on_change == "error":
            raise DataError(
                f"{run}: this run folder holds steps ({', '.join(existing)}) {why}; skipping them "
                f"could report stale results. "
                f"Use a new pipeline.run_dir, delete the folder, or pass --pipeline.on_change restart "
                f"to remove those steps and run them again."
            )
        if _is_rank_zero():
            import shutil

            _say(f"the steps in {run} were {why}: restarting every step")
            for name in existing:
                target = run / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
    if _is_rank_zero():
        atomic_write_json(path, now)
        return
    # other ranks (torchrun starts the pipeline on each) go on once rank 0 has cleaned up
    deadline = time.monotonic() + FINGERPRINT_WAIT_S
    while time.monotonic() < deadline:
        try:
            if json.loads(path.read_text()) == now:
                return
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise DataError(f"{path}: rank 0 did not record this run's fingerprint within {FINGERPRINT_WAIT_S} s.")

def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _say(msg: str) -> None:
    if _is_rank_zero():
        print(f"[pipeline] {msg}", flush=True)


def _fit(config: str, stage_dir: Path, extra: list[str]) -> None:
    """Fit one stage from its YAML into ``stage_dir``; resume from last.ckpt if a run was cut off."""
    from foundv2.cli import lightning_cli

    done = stage_dir / "fit.done"
    if done.exists():
        _say(f"  fit: done before ({done}), skipped")
        return
    args = ["--config", config, "--trainer.default_root_dir", str(stage_dir),
            "--trainer.logger.init_args.save_dir", str(stage_dir), *extra]
    cli = lightning_cli(args, run=False)
    last = _last_checkpoint(stage_dir)
    if last is not None:
        _say(f"  fit: resuming from {last}")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last else None)
    if cli.trainer.is_global_zero:
        atomic_write_json(done, {"metrics": {k: float(v) for k, v in cli.trainer.callback_metrics.items()}})
    cli.trainer.strategy.barrier("pipeline-fit")


def _last_checkpoint(stage_dir: Path) -> Path | None:
    found = sorted(stage_dir.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _best_or_last(stage_dir: Path) -> Path:
    ckpts = [p for p in stage_dir.rglob("*.ckpt") if not p.name.startswith("last")]
    if ckpts:
        return max(ckpts, key=lambda p: p.stat().st_mtime)
    last = _last_checkpoint(stage_dir)
    if last is None:
        raise DataError(f"{stage_dir}: no checkpoint to predict from; the fit did not save one.")
    return last


def _predict(config: str, stage_dir: Path, out_dir: Path, extra: list[str]) -> None:
    from foundv2.cli import lightning_cli

    if output_is_complete(out_dir):
        _say(f"  predict: {out_dir} complete, skipped")
        return
    ckpt = _best_or_last(stage_dir)
    args = ["--config", config, "--trainer.default_root_dir", str(stage_dir), "--trainer.logger", "false",
            "--model.predict_dir", str(out_dir), *extra]
    cli = lightning_cli(args, run=False)
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt), return_predictions=False)


def run_pipeline(cfg: PipelineConfig) -> dict:
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    _check_fingerprint(cfg, run)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    features = run / "features"
    steps = [s for s in ("stage1", "tokenizer", "bench") if getattr(cfg, s)]
    for k, step in enumerate(steps, 1):
        t0 = time.perf_counter()
        _say(f"[{k}/{len(steps)}] {step}: {getattr(cfg, step)}")
        if step == "stage1":
            _fit(cfg.stage1, run / "stage1", cfg.trainer_args + cfg.stage1_args)
            _predict(cfg.stage1, run / "stage1", features, cfg.trainer_args + cfg.stage1_args)
        elif step == "tokenizer":
            extra = cfg.trainer_args + cfg.tokenizer_args + ["--model.export_dir", str(run / "tokenizer" / "export")]
            if cfg.stage1:
                extra += ["--data.features_dir", str(features)]
            _fit(cfg.tokenizer, run / "tokenizer", extra)
            _predict(cfg.tokenizer, run / "tokenizer", run / "tokens", extra)
        elif step == "bench":
            if not _is_rank_zero():
                continue
            if (run / "bench" / "bench.json").exists():
                _say("  bench: bench.json exists, skipped")
            else:
                from foundv2.cli import bench_command

                args = ["--config", cfg.bench, "--bench.output_dir", str(run / "bench")]
                if cfg.tokenizer:
                    args += ["--bench.tokens_dir", str(run / "tokens"), "--bench.tokenizer_dir",
                             str(run / "tokenizer" / "export")]
                if cfg.stage1:
                    args += ["--bench.embeddings", json.dumps({"qformer": str(features)})]
                from contextlib import redirect_stdout
                from io import StringIO

                with redirect_stdout(StringIO()):  # the table is printed once, at the end
                    bench_command(args + cfg.bench_args)
        timings[step] = time.perf_counter() - t0
        _say(f"[{k}/{len(steps)}] {step}: finished in {timings[step]:.0f}s")
    timings["total"] = time.perf_counter() - t_all
    if _is_rank_zero():
        atomic_write_json(run / "timings.json", timings)
        bench_json = run / "bench" / "bench.json"
        if bench_json.exists():
            from foundv2.bench.report import table

            print("\n" + table(json.loads(bench_json.read_text())), flush=True)
        _say(f"all steps done in {timings['total']:.0f}s; report: {run / 'bench' / 'report.md'}")
    return timings
