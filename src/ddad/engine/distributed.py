"""Data-parallel training on PyTorch's own engine (torchrun + DistributedDataParallel; NCCL on GPUs, gloo on
CPUs), and a no-op in a single process.

``torchrun --nproc_per_node N -m ddad train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`context`
joins the process group once. The training engine then gives each rank its slice of every global batch (the
same seeded permutation and random draws on every rank, so N processes with global batch B compute what one
process with batch B computes), averages gradients through DDP, and lets only rank 0 write checkpoints, logs
and progress bars.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """The rank's own GPU under torchrun (cuda:LOCAL_RANK); ``device`` otherwise."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of ``n`` (sizes differ by at most one)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on every rank when it is true on any (a stop decided by one rank's clock or
        signal); one all-reduce for all of them."""
        if not self.distributed:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def context(device_type: str = "cpu") -> Context:
    """This process's place in the job: joins the process group under torchrun (once), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                   dist.get_backend())
