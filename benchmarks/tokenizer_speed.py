"""Training-step speed of the multi-view RQ-VAE tokenizer against vector-quantize-pytorch's ResidualVQ.

Run:  .venv/bin/python benchmarks/tokenizer_speed.py      (prints one JSON object)

Fixed configuration: 4 sources of 384-d inputs, code dim 64, 2 shared + 1
source-specific level of 256 codes (``sequential`` layout), batches of 1024 slices (balanced over
the sources). Both contenders are the *same* `MultiViewRQVAE` - the same per-source encoders
(one Linear 384→64 each, ``hidden=()``), decoders (64→384) and reconstruction loss - and differ
only in the quantiser: (a) ours, `ResidualGroupQuantizer`; (b) a `ResidualVQ` of 3 quantisers of
256 codes (dim 64) behind a thin adapter. One timed step is forward + backward + AdamW step.

Both models are warmed up (k-means init done) before timing; the timed blocks of ``steps`` steps
alternate between the two (order flipped every repeat) and each figure is the median over
``repeats`` blocks of the per-block median step time (the median, not the mean: other processes
sharing the cores cause bursts; block means are reported too). Torch runs with its default
number of threads.

``distance_gflops`` is the rate achieved by our quantiser's distance computations: the FLOPs of
its ``N × K × dim`` distance matmuls (2·N·K·dim per level, K = the level's whole table as the
quantiser computes it - on the specific level that is every source's block, the other sources'
being masked afterwards) divided by the time of `foundv2.nn.quantizer._sq_dist` (the exact
expression `ResidualGroupQuantizer._assign` uses) timed in isolation with the same shapes.
``matmul_peak_gflops`` is the best rate of a 2048×2048 fp32 matmul on this machine.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from foundv2.nn.mrqvae import MultiViewRQVAE, RQVAEConfig  # noqa: E402
from foundv2.nn.quantizer import QuantizerConfig, _sq_dist  # noqa: E402

SOURCES = ["s0", "s1", "s2", "s3"]
INPUT_DIM = 384
CODE_DIM = 64
N_SHARED_LEVELS = 2
N_SPECIFIC_LEVELS = 1
CODES = 256
HIDDEN: tuple[int, ...] = ()  # encoder 384→64 and decoder 64→384, one Linear each
LR = 1e-3
BETA = 0.25


class ResidualVQAdapter(nn.Module):
    """`ResidualVQ` behind the interface `MultiViewRQVAE` expects of its quantiser.

    ResidualVQ options, chosen to be the closest to `ResidualGroupQuantizer`'s defaults:
    - ``learnable_codebook=True, ema_update=False``: the codebook is trained by gradients like
      ours (ResidualVQ's *default* is an EMA codebook, ``ema_update=True`` with decay 0.8; we do
      not match that default, we match our non-EMA training).
    - ``commitment_weight=0.25`` (our beta). With a learnable codebook its commitment loss
      ``mse(q, x)`` sends gradients to both the codebook and the input, i.e. it plays the role of
      our ``loss_codebook + beta * loss_commit`` (with one weight for both sides).
    - ``rotation_trick=False``: plain straight-through gradients like ours (ResidualVQ's default
      is the rotation trick).
    - ``kmeans_init=True, kmeans_iters=10``: k-means init like ours (theirs on the first batch,
      ours on a buffer of ``4 × batch`` rows).
    - ``threshold_ema_dead_code=0`` (its default): no dead-code replacement; ours respawns dead
      codes every 100 steps (left on, as in real training) - it costs nothing between respawns.
    Masked rows are not supported (the benchmark has none).
    """

    def __init__(self, dim: int, n_levels: int, codebook_size: int, beta: float) -> None:
        super().__init__()
        from vector_quantize_pytorch import ResidualVQ

        self.rvq = ResidualVQ(
            dim=dim,
            num_quantizers=n_levels,
            codebook_size=codebook_size,
            kmeans_init=True,
            kmeans_iters=10,
            learnable_codebook=True,
            ema_update=False,
            commitment_weight=beta,
            rotation_trick=False,
        )
        self.n_levels = n_levels
        self.vocab_size = n_levels * codebook_size

    def forward(self, z: Tensor, source: Tensor, mask: Tensor | None = None) -> SimpleNamespace:
        quantized, codes, losses = self.rvq(z[None])  # [1, N, dim], [1, N, L], [1, L]
        loss = losses.sum()
        zero = loss.new_zeros(())
        return SimpleNamespace(
            quantized=quantized[0],
            codes=codes[0],
            loss_codebook=zero,
            loss_commit=loss.detach(),
            loss=loss,
            counts=torch.zeros(self.vocab_size, device=z.device),
        )


def _build(kind: str, batch: int) -> MultiViewRQVAE:
    config = QuantizerConfig(
        layout="sequential", n_shared_levels=N_SHARED_LEVELS, n_specific_levels=N_SPECIFIC_LEVELS,
        shared_codes=CODES, specific_codes=CODES, beta=BETA, kmeans_init=True, kmeans_buffer=4 * batch,
        respawn=True, respawn_every=100,
    )  # fmt: skip
    model = MultiViewRQVAE(INPUT_DIM, SOURCES, RQVAEConfig(code_dim=CODE_DIM, hidden=list(HIDDEN)), config)
    if kind == "residualvq":
        model.quantizer = ResidualVQAdapter(CODE_DIM, N_SHARED_LEVELS + N_SPECIFIC_LEVELS, CODES, BETA)
    return model.train()


def _data(batch: int, n_batches: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """Clustered inputs (a few centres per source plus noise), sources balanced in each batch."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(SOURCES), 32, INPUT_DIM, generator=gen)
    out = []
    for _ in range(n_batches):
        source = torch.arange(batch) % len(SOURCES)
        pick = torch.randint(32, (batch,), generator=gen)
        feat = centres[source, pick] + 0.3 * torch.randn(batch, INPUT_DIM, generator=gen)
        out.append((feat, source))
    return out


class _Trainer:
    def __init__(self, kind: str, batch: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = _build(kind, batch)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR)
        self.data = _data(batch, 8, seed)
        self.i = 0

    def step(self) -> None:
        feat, source = self.data[self.i % len(self.data)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        self.model(feat, source).losses["loss"].backward()
        self.opt.step()

    def initialised(self) -> bool:
        q = self.model.quantizer
        if isinstance(q, ResidualVQAdapter):
            return all(bool(layer._codebook.initted) for layer in q.rvq.layers)
        return bool(q.initialised)

    def warm_up(self, warmup: int) -> None:
        for _ in range(1000):  # until the k-means init has run
            if self.initialised():
                break
            self.step()
        if not self.initialised():
            raise RuntimeError("the k-means init did not run")
        for _ in range(warmup):
            self.step()

    def timed(self, steps: int) -> list[float]:
        """Seconds of each of ``steps`` steps."""
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.step()
            out.append(time.perf_counter() - t0)
        return out


def _best_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_gflops(n: int = 2048, reps: int = 8) -> float:
    """Best fp32 rate of an ``n × n`` matmul."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    return 2 * n**3 / _best_time(lambda: a @ b, reps) / 1e9


def distance_rate(model: MultiViewRQVAE, batch: int, reps: int = 50) -> dict:
    """FLOPs of our quantiser's per-step distance matmuls and their rate, timed in isolation with
    the step's shapes (``_sq_dist`` of ``[batch, dim]`` residuals against each level's table)."""
    q = model.quantizer
    gen = torch.Generator().manual_seed(1)
    codebook = q.codebook.detach().float()
    tables = [codebook[lv.offset : lv.offset + lv.size] for lv in q.levels]
    r = torch.randn(batch, q.dim, generator=gen)
    flops = sum(2 * batch * t.shape[0] * q.dim for t in tables)

    def full() -> None:
        for t in tables:
            _sq_dist(r, t)

    def matmul_only() -> None:
        for t in tables:
            r @ t.t()

    t_full = _median_time(full, reps)
    t_mm = _median_time(matmul_only, reps)
    return {
        "distance_flops_per_step": flops,
        "distance_s_per_step": t_full,
        "distance_gflops": flops / t_full / 1e9,
        "distance_matmul_only_gflops": flops / t_mm / 1e9,
        "level_table_sizes": [t.shape[0] for t in tables],
    }


def measure_speed(steps: int = 30, warmup: int = 5, batch: int = 1024, repeats: int = 3) -> dict:
    """Median seconds per training step (forward + backward + AdamW) of ours and ResidualVQ,
    measured in alternating blocks in this process, plus the distance and matmul rates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the machine's default, stated explicitly
    trainers = {"ours": _Trainer("ours", batch, 0), "residualvq": _Trainer("residualvq", batch, 0)}
    for t in trainers.values():
        t.warm_up(warmup)
    blocks: dict[str, list[list[float]]] = {k: [] for k in trainers}
    for rep in range(repeats):
        order = list(trainers) if rep % 2 == 0 else list(reversed(trainers))
        for name in order:
            blocks[name].append(trainers[name].timed(steps))
    # a block's figure is the median of its steps (robust to bursts of load from other processes)
    medians = {k: [statistics.median(b) for b in v] for k, v in blocks.items()}
    means = {k: [statistics.fmean(b) for b in v] for k, v in blocks.items()}
    ours = statistics.median(medians["ours"])
    rvq = statistics.median(medians["residualvq"])
    dist = distance_rate(trainers["ours"].model, batch)
    return {
        "ours_step_s": ours,
        "residualvq_step_s": rvq,
        "ours_slices_per_s": batch / ours,
        "residualvq_slices_per_s": batch / rvq,
        "ratio_ours_over_residualvq": ours / rvq,
        "distance_gflops": dist["distance_gflops"],
        "distance_matmul_only_gflops": dist["distance_matmul_only_gflops"],
        "distance_s_per_step": dist["distance_s_per_step"],
        "distance_share_of_ours_step": dist["distance_s_per_step"] / ours,
        "matmul_peak_gflops": matmul_peak_gflops(),
        "torch_threads": threads,
        "block_median_step_s": medians,
        "block_mean_step_s": means,
        "fastest_step_s": {k: min(min(b) for b in v) for k, v in blocks.items()},
        "config": {
            "sources": len(SOURCES), "input_dim": INPUT_DIM, "code_dim": CODE_DIM,
            "encoder_hidden": list(HIDDEN), "layout": "sequential", "n_shared_levels": N_SHARED_LEVELS,
            "n_specific_levels": N_SPECIFIC_LEVELS, "codes_per_codebook": CODES, "batch": batch,
            "steps": steps, "warmup": warmup, "repeats": repeats, "optimizer": f"AdamW(lr={LR})",
            "beta": BETA, "ours_options": "kmeans_init, kmeans_buffer=4*batch, respawn every 100 steps",
            "residualvq_options": "num_quantizers=3, codebook_size=256, kmeans_init, learnable_codebook, "
            "ema_update=False, commitment_weight=0.25, rotation_trick=False",
            "distance_flops_per_step": dist["distance_flops_per_step"],
            "level_table_sizes": dist["level_table_sizes"],
            "torch": torch.__version__,
        },
    }  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(measure_speed(), indent=1))
