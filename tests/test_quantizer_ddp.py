"""Codebook care under real DDP: 2 CPU processes (gloo), each rank feeding different data."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from foundv2.nn.quantizer import QuantizerConfig, ResidualGroupQuantizer
from tests.helpers import free_port

WORLD = 2
DIM = 8


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _batch(rank: int, gen: torch.Generator, n: int = 96, spread: float = 1.0):
    """Latents of this rank; rank 1's live around 5.0, so a local k-means would differ."""
    return 5.0 * rank + spread * torch.randn(n, DIM, generator=gen), torch.randint(2, (n,), generator=gen)


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        for ema in (False, True):
            torch.manual_seed(0)  # same initial module on both ranks, as DDP requires
            config = QuantizerConfig(layout="union", n_shared_levels=2, n_specific_levels=0, shared_codes=16,
                                     specific_codes=16, kmeans_buffer=256, respawn_every=10_000,
                                     recent_size=256, ema=ema)
            q = ResidualGroupQuantizer(DIM, ["a", "b"], config).train()
            gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
            q(*_batch(rank, gen))  # 192 rows over both ranks: below the k-means buffer
            assert not bool(q.initialised)
            q(*_batch(rank, gen))  # 384 rows ≥ 256: k-means init on the gathered buffer
            assert bool(q.initialised)
            assert _same_on_all_ranks(q.codebook.detach())
            # the init saw both ranks' latents: codes near both centres
            level0 = q.codebook.detach()[: q.levels[0].size].mean(1)
            assert (level0 < 2.5).any() and (level0 > 2.5).any()

            before = q.usage.sum()
            q(*_batch(rank, gen))
            # usage is counted once, over both ranks' rows: 2 ranks x 96 rows x 2 levels
            assert q.usage.sum() - before == WORLD * 96 * q.n_levels
            assert _same_on_all_ranks(q.usage)
            for _ in range(3):  # latents squeezed into a small region: most codes go dead
                q(*_batch(rank, gen, spread=0.05))
            assert _same_on_all_ranks(q.codebook.detach())  # EMA updates use summed statistics
            respawned = q.respawn_dead_codes()
            assert respawned.sum() > 0
            assert _same_on_all_ranks(q.codebook.detach())
            if ema:
                assert _same_on_all_ranks(q.ema_sum) and _same_on_all_ranks(q.ema_count)
            metrics = q.usage_metrics()  # counts already summed over ranks
            assert _same_on_all_ranks(torch.tensor(sorted(metrics.values())))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_codebook_care_identical_on_all_ranks() -> None:
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)
