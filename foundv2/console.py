"""What foundv2 prints, in one place: the known harmless warnings it filters, and the quiet
console of ``foundv2 pipeline`` (what a person needs on screen; the rest in a log file).

- :data:`HARMLESS_WARNINGS` / :func:`filter_warnings`: warnings that say nothing about the run
  (third-party deprecations, Lightning remarks on what foundv2 does on purpose); every command
  filters them (``foundv2.cli``).
- :func:`log_to_file`: for the span of a pipeline step, every log record (Lightning's INFO lines,
  foundv2's own) and every other warning go to ``<run_dir>/<step>/log.txt`` instead of the console.
- :func:`quiet_trainer`: a stage fit or predict of the pipeline shows one progress bar line
  (TQDM, its metrics on the same line; no sanity-check or validation bars) and logs its model
  summary instead of drawing it.

Lightning is imported inside the functions only: ``foundv2 --help`` and ``foundv2 data`` stay quick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

#: (message regex, category) of the warnings that are filtered everywhere; each one says why
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # the pipeline builds stage CLIs from its own arguments on purpose
    (r"LightningCLI's args parameter", UserWarning),
    # torch's pytree rename, raised inside Lightning's own code
    (r".*isinstance\(treespec, LeafSpec\)", Warning),
    # predict reloads a fit checkpoint without the fit's logger: its ModelCheckpoint state is not needed
    (r"The dirpath has changed from", UserWarning),
    # small data sets: an epoch is shorter than the logging interval
    (r"The number of training batches .* is smaller than the logging interval", UserWarning),
    # the DataModule chooses its workers (2-core machines, in-memory tables)
    (r".*does not have many workers which may be a bottleneck", UserWarning),
    # a resumed or restarted fit writes into its own checkpoint folder again
    (r"Checkpoint directory .* exists and is not empty", UserWarning),
)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def filter_warnings() -> None:
    """Ignore :data:`HARMLESS_WARNINGS` (every other warning is still shown, or logged)."""
    for message, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _console_handler(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
        sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


@contextlib.contextmanager
def log_to_file(path: str | Path) -> Iterator[Path]:
    """Send every log record and warning to ``path`` (appended) while the block runs; the
    console handlers of every logger are put back afterwards. Prints (progress bars, the
    pipeline's own lines) still reach the console."""
    import lightning  # noqa: F401 - importing it adds a console handler to its logger: do it before they are set aside

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)  # no file until there is a record
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    loggers = [root, *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    saved = [(lg, list(lg.handlers), lg.propagate) for lg in loggers]
    root_level = root.level
    for lg in loggers:
        for h in [h for h in lg.handlers if _console_handler(h)]:
            lg.removeHandler(h)
        if lg is not root and not lg.handlers:
            lg.propagate = True
    root.addHandler(handler)
    root.setLevel(min(root_level or logging.INFO, logging.INFO))
    captured = logging._warnings_showwarning is not None  # already captured by someone else
    logging.captureWarnings(True)
    try:
        yield path
    finally:
        if not captured:
            logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()
        root.setLevel(root_level)
        for lg, handlers, propagate in saved:
            lg.handlers[:] = handlers
            lg.propagate = propagate


def step_log_name() -> str:
    """``log.txt`` on rank 0, ``log-rank<r>.txt`` on the other ranks of a torchrun pipeline."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    return "log.txt" if rank == 0 else f"log-rank{rank}.txt"


def quiet_trainer(trainer) -> None:
    """One console line per progress bar (:func:`one_line_bar` in place of the trainer's, e.g. a
    Rich one, which draws its metrics on lines of their own), and the model summary as a log
    record, not a drawn table."""
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichModelSummary

    for i, cb in enumerate(trainer.callbacks):
        if isinstance(cb, ProgressBar):
            trainer.callbacks[i] = one_line_bar()
        elif isinstance(cb, RichModelSummary):
            trainer.callbacks[i] = ModelSummary(max_depth=cb._max_depth)


def one_line_bar():
    """A TQDM progress bar with the train (or predict) bar only: one line, which the metrics
    share; the sanity-check and validation bars, which print lines of their own into a log or a
    pipe, are off."""
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    class OneLineBar(TQDMProgressBar):
        def init_sanity_tqdm(self):
            return Tqdm(disable=True)

        def init_validation_tqdm(self):
            return Tqdm(disable=True)

    return OneLineBar()
