"""``foundv2 embed``: query-aware embeddings of every user for every query of a list, from a
trained :class:`~foundv2.stages.qanchor.QAnchorStage` checkpoint, into an Arrow dataset.

    foundv2 embed --config experiments/<data>/data.yaml --embed.checkpoint runs/.../last.ckpt \\
        --embed.output_dir runs/embeddings --embed.queries_file my-queries.txt

It is the stage's ``predict`` with the queries swapped in: each batch of users has its prefix
encoded once into a KV cache and all queries run against it in one pass
(:meth:`~foundv2.nn.anchor.QueryAnchor.embed_users`, equal to a full pass per query); the
dataset is written by the stage's :class:`~foundv2.io.ArrowPredictionWriter` (one part per rank
in a staging folder, swapped in whole when complete), with a progress bar. Columns: ``user_id``,
``row``, ``split`` and ``user_emb`` (``Q × emb_dim`` floats, query by query); ``meta.json``
records the queries. ``--embed.devices 2 --embed.strategy ddp`` splits the users over two
processes (one part each).

Queries come from ``--embed.queries`` (a list, in a YAML ``embed:`` section or on the command
line) or ``--embed.queries_file`` (one query per line, blank lines skipped); with neither, the
queries the checkpoint was trained to serve. Bad input (no such checkpoint, a damaged one, one of
another stage or of other data, an unreadable query file, an empty list) is a one-paragraph
DataError before anything is written.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import lightning as L

from data_modules.schema import DataError

FIX = "pass the checkpoint of a QAnchorStage fit (e.g. <run>/qanchor/.../last.ckpt)"


def read_queries(queries: list[str] | None, queries_file: str | None) -> list[str] | None:
    """The query list (None: the checkpoint's own); a DataError for an unreadable file, both
    sources at once, or an empty list."""
    if queries is not None and queries_file is not None:
        raise DataError("foundv2 embed: give the queries either as embed.queries or as embed.queries_file, not both.")
    if queries_file is not None:
        try:
            text = Path(queries_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{queries_file}: the query list cannot be read ({type(err).__name__}: {err}); give a "
                            "text file with one query per line.") from err
        queries = [line.strip() for line in text.splitlines() if line.strip()]
        where = queries_file
    else:
        where = "embed.queries"
    if queries is not None:
        queries = [q.strip() for q in queries if q and q.strip()]
        if not queries:
            raise DataError(f"{where}: the query list is empty; give at least one query (one per line in a file).")
    return queries


def load_stage(checkpoint: str | Path):
    """The QAnchorStage of a checkpoint (``load_from_checkpoint`` verifies the file first); a
    DataError for anything else."""
    from foundv2.stages.qanchor import QAnchorStage

    path = Path(checkpoint)
    try:
        stage = QAnchorStage.load_from_checkpoint(path, map_location="cpu")
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a QAnchorStage checkpoint that can be loaded ({type(err).__name__}: "
                        f"{str(err)[:300]}); {FIX}.") from err
    if stage.net is None:
        raise DataError(f"{path}: the checkpoint holds no QAnchorStage nets; {FIX}.")
    return stage.eval()


class SameData(L.Callback):
    """Once the DataModule is set up (before any output is staged): its sources and event
    embedding width must be those the checkpoint was trained on."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint

    def setup(self, trainer, pl_module, stage: str) -> None:
        here = trainer.datamodule.dims()
        differ = [k for k in ("num_sources", "text_dim") if pl_module.dims.get(k) != here.get(k)]
        if differ:
            raise DataError(f"{self.checkpoint}: the checkpoint was trained on other data: "
                            + "; ".join(f"{k} {pl_module.dims.get(k)!r} there, {here.get(k)!r} here" for k in differ)
                            + ". Use the data config it was trained with.")


def embed(dm, checkpoint: str, output_dir: str, queries: list[str] | None = None, queries_file: str | None = None,
          accelerator: str = "auto", devices: str | int = "auto", strategy: str = "auto",
          progress: bool = True) -> Path:
    """Write query-aware embeddings of every user of the data for every query into an Arrow dataset.

    Args:
        dm: the DataModule (the ``data:`` section).
        checkpoint: a QAnchorStage checkpoint (a fit's ``last.ckpt`` or best one).
        output_dir: the dataset folder (replaced whole when complete).
        queries: the queries (None: ``queries_file``, else the checkpoint's own queries).
        queries_file: a text file with one query per line (blank lines skipped).
        accelerator: the trainer's accelerator (cpu, gpu, auto).
        devices: the trainer's devices (2 with ``strategy`` ddp: one part per process).
        strategy: the trainer's strategy (auto, ddp).
        progress: show a progress bar.
    """
    from data_modules.store import check_output_folder

    # before anything is loaded: the output (written aside in its parent, then swapped in)
    check_output_folder(output_dir, "embed output (embed.output_dir)",
                        "point embed.output_dir at a folder you can write, or fix its permissions")
    wanted = read_queries(queries, queries_file)
    stage = load_stage(checkpoint)
    if wanted is not None:
        stage.queries = wanted
    stage.predict_dir = str(output_dir)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                        enable_progress_bar=progress, enable_model_summary=False,
                        callbacks=[SameData(Path(checkpoint))])
    trainer.predict(stage, datamodule=dm, return_predictions=False)
    return Path(output_dir)


def embed_command(args: list[str], description: str = "") -> int:
    """``foundv2 embed --config data.yaml [--config embed.yaml] --embed.checkpoint X --embed.output_dir Y``."""
    from data_modules.store import read_output_meta
    from foundv2 import launch

    out, _ = launch.run_with_data(embed, "embed", args, "foundv2 embed", description)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # the launching process (DDP: rank 0)
        meta = read_output_meta(out) or {}
        print(f"wrote {out}: {len(meta.get('queries', []))} queries x {meta.get('emb_dim')} floats per user, "
              f"{len(meta.get('parts', []))} part(s)")
    return 0
