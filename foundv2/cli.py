"""The ``foundv2`` command.

``fit | validate | test | predict`` are LightningCLI subcommands over any stage (``model:
class_path: foundv2.stages....``) and the UserDataModule (``data:``). The framework's own
commands read the same YAML files:

    foundv2 data --config experiments/movielens-1m/data.yaml     prepare a data set, print its summary

Expected mistakes (bad input files, a missing wheel, a corrupt cache) print one paragraph and
exit with status 2, without a traceback.

``--allow_no_checksum``, given to any command, lets it use checkpoints and export folders that
carry no checksum record (written by another tool or an older foundv2, or copied without it);
they are still read with torch's weights-only loader and refused when a weight is NaN or inf.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from foundv2 import launch  # sets the offline defaults (no download at run time) before anything loads

LIGHTNING_COMMANDS = {
    "fit": "train a stage",
    "validate": "run a stage's validation loop",
    "test": "run a stage's test loop",
    "predict": "write a stage's output dataset (features, tokens, embeddings)",
}
#: the framework's own commands: name → what it does (its --help description); each is run by
#: ``<name>_command`` below
OWN_COMMANDS = {
    "data": "prepare a configured data set and print its summary",
    "tokenize": "tokenize a data set with a trained tokenizer folder (save_pretrained)",
    "bench": "linear-probe benchmark (foundv2-bench-v1): representations and baselines side by side",
    "embed": "query-aware user embeddings for a list of queries from a QAnchorStage checkpoint (Arrow dataset)",
    "pipeline": "the declared steps of a pipeline YAML (stage fits and predicts, the bench): one run folder, resumable",
}

USAGE = """usage: foundv2 <command> [--config FILE.yaml] [options]

Commands (LightningCLI: --help after a command lists every option; --print_config prints the merged config):
{lightning}
Framework commands:
{own}

Options of every command:
  {allow}  use checkpoints and exports that carry no checksum record (still checked for NaN/inf)

Example: foundv2 data --config experiments/movielens-1m/data.yaml
"""


def _usage() -> str:
    fmt = lambda d: "\n".join(f"  {k:<10} {v}" for k, v in d.items())  # noqa: E731
    from data_modules.store import ALLOW_NO_CHECKSUM_FLAG

    return USAGE.format(lightning=fmt(LIGHTNING_COMMANDS), own=fmt(OWN_COMMANDS), allow=ALLOW_NO_CHECKSUM_FLAG)


def _fail(err: BaseException) -> int:
    print(f"foundv2: error: {err}", file=sys.stderr)
    return 2


def tokenize_command(args: list[str]) -> int:
    """``foundv2 tokenize --tokenizer DIR --output DIR --config data.yaml``; with ``--append``, new
    windows of existing users onto a tokens dataset (:mod:`foundv2.append`)."""
    if "--append" in args:
        from foundv2.append import append_command

        return append_command([a for a in args if a != "--append"])
    import lightning as L

    from foundv2.stages.tokenizer import TokenizerStage

    parser = launch.data_parser("foundv2 tokenize", OWN_COMMANDS["tokenize"])
    parser.add_argument("--append", action="store_true",
                        help="append new events' windows to a tokens dataset instead (foundv2 tokenize --append --help)")
    parser.add_argument("--tokenizer", required=True, help="a folder written by save_pretrained (export_dir)")
    parser.add_argument("--output", required=True, help="where the tokens dataset and report.json go")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    cfg = parser.parse_args(args)
    from data_modules.schema import DataError
    from data_modules.store import check_output_folder

    # before anything is loaded: the output (written aside in its parent, then swapped in) and the tokenizer
    check_output_folder(cfg.output, "tokenize output (--output)", "point --output at a folder you can write, or "
                        "fix its permissions")
    if not (Path(cfg.tokenizer) / "config.json").exists():
        raise DataError(f"{cfg.tokenizer}: not a tokenizer folder (no config.json); pass the fit's export_dir.")
    dm = parser.instantiate_classes(cfg).data
    stage = TokenizerStage(pretrained=cfg.tokenizer, predict_dir=cfg.output)
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, logger=False)
    trainer.predict(stage, datamodule=dm, return_predictions=False)
    if trainer.is_global_zero:
        print((Path(cfg.output) / "report.json").read_text())
    return 0


def bench_command(args: list[str]) -> int:
    """``foundv2 bench --config experiments/<data>/data.yaml --config experiments/<data>/bench.yaml``:
    probes, baselines, report."""
    from foundv2.bench.report import table
    from foundv2.bench.run import run_bench

    bench, kwargs = launch.run_with_data(run_bench, "bench", args, "foundv2 bench", OWN_COMMANDS["bench"])
    print(table(bench))
    print(f"\nreport: {Path(kwargs['output_dir']) / 'report.md'}")
    return 0


def pipeline_command(args: list[str]) -> int:
    """``foundv2 pipeline --config experiments/<data>/pipeline.yaml``."""
    from foundv2.pipeline import parse_config, run_pipeline

    run_pipeline(parse_config(args, "foundv2 pipeline", OWN_COMMANDS["pipeline"]))
    return 0


def data_command(args: list[str]) -> int:
    """``foundv2 data``: prepare (or reuse) the configured data set and print its summary."""
    from data_modules.ranks import Ranks
    from data_modules.schema import DataError
    from data_modules.settings import DataSettings

    parser = launch.data_parser("foundv2 data", OWN_COMMANDS["data"], data_class=DataSettings)
    cfg = parser.parse_args(args)
    init = parser.instantiate_classes(cfg)
    dm: DataSettings = init.data
    ranks = Ranks.from_env()  # torchrun / srun: every rank does its share
    try:
        meta = dm.prepare_data(ranks)
        if ranks.is_zero:
            from data_modules.prepare import summary_lines

            print("\n".join(summary_lines(meta, dm.prepared_dir)))
            for warning in dm.data_warnings(meta):
                print(f"warning: {warning}")
            if meta.get("ranks", 1) > 1:
                print(f"prepared by     {meta['ranks']} ranks in {meta['prepare_seconds']:.1f} s")
    except DataError:
        if not ranks.is_zero:  # every rank raises the same error; rank 0 says it
            raise SystemExit(2) from None
        raise
    finally:
        ranks.close()
    return 0


def check_checkpoint(argv: list[str]) -> None:
    """A ``--ckpt_path`` that names a file must be a whole checkpoint (its checksum, torch's zip format)."""
    from foundv2.io import verify_checkpoint

    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--ckpt_path=") else (
            argv[i + 1] if arg == "--ckpt_path" and i + 1 < len(argv) else None)
        if value is None or value in ("last", "best", "hpc", "registry", "null"):
            continue
        verify_checkpoint(Path(value), "use another one, e.g. --ckpt_path last, or train again")


def embed_command(args: list[str]) -> int:
    """``foundv2 embed``: :mod:`foundv2.embed`."""
    from foundv2.embed import embed_command as run

    return run(args, OWN_COMMANDS["embed"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from data_modules.store import ALLOW_NO_CHECKSUM_ENV, ALLOW_NO_CHECKSUM_FLAG

    if ALLOW_NO_CHECKSUM_FLAG not in argv:
        return _main(argv)
    # any command's flag, as an environment variable for the span of the command: what the checks
    # read, and what DDP ranks and subprocesses inherit
    before = os.environ.get(ALLOW_NO_CHECKSUM_ENV)
    os.environ[ALLOW_NO_CHECKSUM_ENV] = "1"
    try:
        return _main([a for a in argv if a != ALLOW_NO_CHECKSUM_FLAG])
    finally:
        if before is None:
            os.environ.pop(ALLOW_NO_CHECKSUM_ENV, None)
        else:
            os.environ[ALLOW_NO_CHECKSUM_ENV] = before


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from data_modules.schema import DataError
    from foundv2.console import filter_warnings

    filter_warnings()

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command = argv[0]
    try:
        if command in OWN_COMMANDS:
            return globals()[f"{command}_command"](argv[1:])
        if command in LIGHTNING_COMMANDS:
            check_checkpoint(argv)
            if command == "predict" and not any(a.startswith("--return_predictions") for a in argv):
                argv.append("--return_predictions=false")  # outputs stream to disk; never hold them all
            launch.lightning_cli(argv)
            return 0
    except DataError as err:
        return _fail(err)
    print(_usage(), file=sys.stderr)
    return _fail(ValueError(f"unknown command '{command}'"))


if __name__ == "__main__":
    sys.exit(main())
