"""info_nce under a real 2-process CPU (gloo) process group: negatives gathered from both
ranks with gradients, uneven and empty ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from foundv2.objectives import WindowObjective, info_nce
from tests.helpers import free_port

WORLD = 2
N, D = 6, 8  # rows per rank in the even case, width


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * N, D, generator=g), torch.randn(WORLD * N, D, generator=g)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        a_all, b_all = _data()
        res = {}
        # even split, symmetric, with false-negative masking
        sl = slice(rank * N, (rank + 1) * N)
        a = a_all[sl].clone().requires_grad_(True)
        b = b_all[sl].clone().requires_grad_(True)
        loss, acc = info_nce(a, b, tau=0.5, fn_margin=0.3)
        loss.backward()
        res.update(loss=loss.detach(), acc=acc, grad_a=a.grad, grad_b=b.grad)
        # local only when gather=False
        res["local"] = info_nce(a_all[sl], b_all[sl], tau=0.5, fn_margin=0.3, gather=False)[0]
        # uneven split: rank 0 holds 3 rows, rank 1 the other 9; a→b only
        cut = 3
        sl2 = slice(0, cut) if rank == 0 else slice(cut, WORLD * N)
        a2 = a_all[sl2].clone().requires_grad_(True)
        loss2, _ = info_nce(a2, b_all[sl2], tau=0.5, symmetric=False)
        loss2.backward()
        res.update(loss_uneven=loss2.detach(), n_uneven=sl2.stop - sl2.start)
        # rank 1 has no rows at all: must not hang, gets a zero loss still in the graph
        a3 = (a_all[: 2 * N] if rank == 0 else a_all[:0]).clone().requires_grad_(True)
        loss3, _ = info_nce(a3, a3 + 0.1, tau=0.5)
        loss3.backward()
        res["loss_empty"] = loss3.detach()
        # a window objective with identical weights on both ranks runs through the gather too
        torch.manual_seed(0)
        obj = WindowObjective(D, period=2)
        reps = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(rank))
        wl, _, wn = obj(reps, torch.ones(3, 4, dtype=torch.bool), torch.arange(4).expand(3, -1))
        wl.backward()
        res["window_loss"], res["window_pairs"] = wl.detach(), wn
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_info_nce_gathers_across_ranks(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    a_all, b_all = _data()

    # the loss averaged over ranks equals the single-process loss on the concatenated batch
    a = a_all.clone().requires_grad_(True)
    b = b_all.clone().requires_grad_(True)
    full, full_acc = info_nce(a, b, tau=0.5, fn_margin=0.3, gather=False)
    full.backward()
    assert torch.allclose(sum(r["loss"] for r in res) / WORLD, full, atol=1e-5)
    assert torch.allclose(sum(r["acc"] for r in res) / WORLD, full_acc)
    # ... and differs from a local-only loss (the other rank's negatives were seen)
    assert not torch.allclose(res[0]["loss"], res[0]["local"], atol=1e-4)
    # gradients: each rank's inputs get the gradient of *both* ranks' losses, so rank r's
    # gradient equals WORLD × the full-batch gradient on its half (DDP then averages).
    for r in range(WORLD):
        sl = slice(r * N, (r + 1) * N)
        assert torch.allclose(res[r]["grad_a"], WORLD * a.grad[sl], atol=1e-5)
        assert torch.allclose(res[r]["grad_b"], WORLD * b.grad[sl], atol=1e-5)

    # uneven ranks: the row-weighted mean of the rank losses is the full a→b loss
    full2, _ = info_nce(a_all, b_all, tau=0.5, symmetric=False, gather=False)
    weighted = sum(r["loss_uneven"] * r["n_uneven"] for r in res) / (WORLD * N)
    assert torch.allclose(weighted, full2, atol=1e-5)

    # an empty rank: zero loss there, the full loss on the other
    full3, _ = info_nce(a_all[: 2 * N], a_all[: 2 * N] + 0.1, tau=0.5, gather=False)
    assert torch.allclose(res[0]["loss_empty"], full3, atol=1e-5)
    assert res[1]["loss_empty"].item() == 0.0

    for r in res:
        assert r["window_pairs"].item() == 3 * 2 and torch.isfinite(r["window_loss"])
