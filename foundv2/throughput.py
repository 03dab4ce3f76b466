"""How fast a stage's ``predict`` runs, and how close to the machine's arithmetic it comes.

:func:`predict_throughput` runs a stage's real ``predict`` (the DataModule's predict loader, the
stage's ``predict_step``, the Arrow writer into a scratch folder, Lightning's loop) in one
process and returns::

    users            users predicted (the run's batches, up to ``max_users``)
    seconds          wall-clock seconds of the predict loop
    users_per_s      users / seconds
    flops_per_user   matmul-class FLOPs of ``predict_step`` per user (FlopCounterMode over
                     ``flop_batches`` of the run's batches, spread over it: matmuls, linear
                     layers, attention, padding included; elementwise work is not counted)
    peak_flops       the measured fp32 matmul peak of this machine (:func:`matmul_peak_flops`)
                     with this process's thread count, FLOP/s (the better of two measures, before
                     and after the run, unless given)
    utilisation      users_per_s * flops_per_user / peak_flops
    breakdown        seconds in ``data`` (reading rows and collating them into a batch),
                     ``model`` (``predict_step``), ``write`` (the Arrow writer) and ``other``
                     (the rest of Lightning's loop)
    threads          torch intra-op threads
    peak_rss_mb      this process's peak resident memory so far (MB)

The stage and the DataModule are the ones a run would use: build them from config files with
:func:`from_config` (``foundv2.launch.lightning_cli``, not run) or pass your own. The stage's
weights come from ``ckpt_path`` when given (a frozen backbone or a ``pretrained`` tokenizer needs
none). The output goes to a scratch folder that is removed afterwards (``keep_dir`` keeps it
there instead, to compare outputs). Numbers are for one process; under DDP each rank runs this
loop on its share.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def matmul_peak_flops(n: int = 1024, reps: int = 30) -> float:
    """The best fp32 FLOP/s of an ``n × n`` matmul over ``reps`` tries (this process's threads):
    the ceiling the stages' matmuls are measured against. On a machine shared with other work a
    measure taken while another process holds a core comes out low: take the best of several,
    spread over a run (:func:`predict_throughput` measures before and after)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def count_flops(fn, *args) -> int:
    """Matmul-class FLOPs of ``fn(*args)`` (``torch.utils.flop_counter.FlopCounterMode``), no grad."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*args)
    return int(counter.get_total_flops())


class _Timer:
    """Per-batch timings of a predict loop: wraps the stage's ``predict_step`` and the writer's
    ``write_on_batch_end`` on the instances; the data time is the gap between the end of one
    batch (its write) and the start of the next ``predict_step``."""

    def __init__(self):
        self.data = self.model = self.write = 0.0
        self.mark = None

    def _gap(self) -> None:
        now = time.perf_counter()
        if self.mark is not None:
            self.data += now - self.mark
        self.mark = now

    @contextlib.contextmanager
    def wrap(self, stage, writer):
        step, write = stage.predict_step, writer.write_on_batch_end

        def timed_step(*a, **k):
            self._gap()
            t0 = time.perf_counter()
            out = step(*a, **k)
            self.model += time.perf_counter() - t0
            self.mark = time.perf_counter()
            return out

        def timed_write(*a, **k):
            t0 = time.perf_counter()
            out = write(*a, **k)
            self.write += time.perf_counter() - t0
            self.mark = time.perf_counter()
            return out

        stage.predict_step, writer.write_on_batch_end = timed_step, timed_write
        try:
            yield self
        finally:
            del stage.predict_step, writer.write_on_batch_end


def predict_throughput(stage, datamodule, ckpt_path: str | None = None, max_users: int | None = None,
                       flop_batches: int = 8, peak_flops: float | None = None, keep_dir: str | None = None,
                       precision: str = "32-true") -> dict:
    """Run ``stage``'s predict over ``datamodule`` (one CPU process) and measure it; the returned
    dict is described in the module docstring.

    Args:
        stage: a :class:`~foundv2.stages.base.PredictStage` (its ``predict_dir`` is replaced by a
            scratch folder for the run and restored after).
        datamodule: the :class:`~data_modules.datamodule.UserDataModule` it reads.
        ckpt_path: the checkpoint predict loads (None: the stage's weights as they are).
        max_users: predict only ``max_users`` users (whole batches of the predict order, spread
            evenly over it: an order by length puts the shortest users first, so the first batches
            alone would flatter a stage); None: every user ``predict_splits`` covers.
        flop_batches: predict batches whose FLOPs are counted (after the timed run), spread
            evenly over the run's batches.
        peak_flops: the machine's peak (FLOP/s); None measures it (:func:`matmul_peak_flops`, the
            better of a measure before and one after the run).
        keep_dir: write the predict output here and keep it (None: a scratch folder, removed).
        precision: the trainer's precision (``bf16-mixed``: autocast to bfloat16, on a CPU too,
            where the matmuls of a CPU with bf16 instructions run faster than fp32's).
    """
    import lightning as L

    from foundv2.io import ArrowPredictionWriter

    datamodule.prepare_data()
    datamodule.setup("predict")
    peak_before = None if peak_flops else matmul_peak_flops()
    saved_subset = datamodule.predict_subset
    if max_users is not None:
        bs, n = int(datamodule.hparams.batch_size), len(datamodule.predict_rows())
        blocks = max(1, n // bs)  # whole batches (the last, partial one only when there is no other)
        picked = np.unique(np.linspace(0, blocks - 1, min(blocks, max(1, -(-int(max_users) // bs)))).round().astype(int))
        datamodule.predict_subset = np.concatenate([np.arange(k * bs, min((k + 1) * bs, n)) for k in picked])
    scratch = Path(tempfile.mkdtemp(prefix="foundv2-throughput-"))
    out_dir = Path(keep_dir) if keep_dir else scratch / "out"
    saved_dir = stage.predict_dir
    stage.predict_dir = str(out_dir)
    timer = _Timer()

    class Timing(L.Callback):
        def on_predict_start(self, trainer, pl_module):
            writer = next(cb for cb in trainer.callbacks if isinstance(cb, ArrowPredictionWriter))
            self.ctx = timer.wrap(pl_module, writer)
            self.ctx.__enter__()
            self.t0 = timer.mark = time.perf_counter()

        def on_predict_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.t0
            self.ctx.__exit__(None, None, None)

    timing = Timing()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timing], precision=precision,
                        default_root_dir=str(scratch))
    try:
        trainer.predict(stage, datamodule=datamodule, ckpt_path=ckpt_path, return_predictions=False)
        from data_modules.store import read_stage_output

        users = len(read_stage_output(out_dir)[0])
        flops, counted = 0, 0
        stage.eval()
        loader = datamodule.predict_dataloader()
        batches = list(loader.batch_sampler)  # the run's batches, as index lists
        picks = np.unique(np.linspace(0, len(batches) - 1, min(flop_batches, len(batches))).round().astype(int))
        for i in picks.tolist():  # spread over the run: an ordered predict's first batches are its shortest
            batch = loader.collate_fn(loader.dataset.__getitems__(batches[i]))
            flops += count_flops(stage.predict_step, batch, i)
            counted += int(batch["user_id"].shape[0])
    finally:
        stage.predict_dir = saved_dir
        datamodule.predict_subset = saved_subset
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = timing.seconds
    peak = float(peak_flops) if peak_flops else max(peak_before, matmul_peak_flops())
    per_user = flops / max(counted, 1)
    users_per_s = users / seconds
    return {"users": users, "seconds": seconds, "users_per_s": users_per_s, "flops_per_user": per_user,
            "peak_flops": peak, "utilisation": users_per_s * per_user / peak,
            "breakdown": {"data": timer.data, "model": timer.model, "write": timer.write,
                          "other": max(seconds - timer.data - timer.model - timer.write, 0.0)},
            "threads": torch.get_num_threads(), "precision": precision, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def from_config(args: list[str]):
    """(stage, datamodule) from ``foundv2`` command-line arguments (``--config data.yaml --config
    stage.yaml --data.x ...``), as ``foundv2 predict`` would build them."""
    from foundv2.launch import lightning_cli

    cli = lightning_cli(args, run=False)
    return cli.model, cli.datamodule
