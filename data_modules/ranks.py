"""The processes that share a piece of work (data preparation): torch.distributed's ranks.

``foundv2 data`` under ``torchrun`` or SLURM's ``srun`` runs one process per rank; they find each
other through the launcher's environment (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` from torchrun,
``SLURM_PROCID``/``SLURM_NTASKS``/the node list from srun, read through Lightning's SLURM
environment, the one training uses) and a gloo process group: CPU-only, no GPU needed. Without a
launcher there is one rank and no process group.

:meth:`Ranks.step` runs one phase of the work on every rank and then makes every rank agree on how
it went: when any rank failed, every rank raises (the failing rank its own error, the others a
:class:`~data_modules.schema.DataError` with the same message), so no rank waits forever at the next
barrier and the error is reported once, by rank 0.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from data_modules.schema import DataError

T = TypeVar("T")
TIMEOUT = timedelta(hours=2)  # the longest one rank may wait for the others at a barrier


@dataclass
class Ranks:
    """This process's place among the processes sharing the work (``rank`` of ``world``)."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        """Join the launcher's ranks (torchrun, srun), or one rank when there is no launcher; a
        process group already set up (by Lightning, say) is used as it is."""
        if "torch" in sys.modules:  # torch is imported only where there are ranks to join
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                return cls(dist.get_rank(), dist.get_world_size())
        # torchrun (or any launcher that sets torch.distributed's env:// variables): no Lightning import
        torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ
        env = None if torchrun else _launcher_env()  # srun: Lightning's SLURM environment finds the main node
        if not torchrun and (env is None or env.world_size() <= 1):
            return cls()
        import torch.distributed as dist

        if torchrun:
            dist.init_process_group("gloo", init_method="env://", timeout=TIMEOUT)
        else:
            os.environ.setdefault("MASTER_ADDR", env.main_address)
            os.environ.setdefault("MASTER_PORT", str(env.main_port))
            dist.init_process_group("gloo", rank=env.global_rank(), world_size=env.world_size(), timeout=TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size())

    def close(self) -> None:
        """Leave the process group this object set up (after the last barrier)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def step(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it failed on any, raise on every rank (see the module
        docstring); else return this rank's result."""
        if not self.distributed:
            return fn()
        err: BaseException | None = None
        out = None
        try:
            out = fn()
        except Exception as e:  # shared with the other ranks, then raised again
            err = e
        report = None if err is None else (isinstance(err, DataError), f"{type(err).__name__}: {err}", str(err))
        reports = self.gather(report)
        if err is not None:
            raise err
        failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
        if failed:
            rank, (is_data, described, message) = failed[0]
            if is_data:
                raise DataError(message)
            raise RuntimeError(f"rank {rank} failed: {described}")
        return out

    # ------------------------------------------------------------------ sharing work out
    def share(self, sizes: list[int]) -> list[int]:
        """The indices of the items (of the given sizes) this rank takes: largest first, each to
        the rank with the least work so far (ties to the lower rank), so every rank computes the
        same assignment."""
        load = [0] * self.world
        mine = []
        for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            r = min(range(self.world), key=lambda k: (load[k], k))
            load[r] += max(int(sizes[i]), 1)
            if r == self.rank:
                mine.append(i)
        return sorted(mine)


def _launcher_env():
    """Lightning's cluster environment of SLURM, when srun started this process, or None."""
    if "SLURM_NTASKS" not in os.environ:  # Lightning is imported only where SLURM is
        return None
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment() if SLURMEnvironment.detect() else None
