"""Data-parallel training under ``torchrun``: process group, devices, batch sharding, rank-0 helpers.

``torchrun --nproc-per-node N -m training.train ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set; :func:`setup` sees them and joins the process group (NCCL when ``--device cuda``, each
process on GPU ``LOCAL_RANK``; gloo on the CPU). Without those variables (plain ``python -m training.train``)
it returns a one-process :class:`Dist` and nothing else changes.

How a step is split (``training.train``): every rank draws the *same* global batch (same seed, so the same
permutation and the same sampled negatives as one process), takes its contiguous share of it
(:meth:`Dist.shard`), and scales its loss by ``local / global * world`` so that DDP's gradient average equals
the gradient of the global batch's mean loss, whatever the remainder of the last batch.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, shows the progress bar, evaluates and writes checkpoints."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of a global batch of ``n`` (sizes differ by <= 1)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (GPU ``local_rank``: one GPU per process) or an explicit ``cuda:K``."""
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")
        return torch.device("cuda", local_rank)
    if name.startswith("cuda:") or name == "cpu":
        return torch.device(name)
    raise ValueError(f"--device must be cpu, cuda or cuda:K, got {name!r}")


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor.to(device)``; a CPU tensor goes to a GPU through pinned memory, asynchronously, so the CPU goes
    on to the next batch's lexical features while the GPU computes (a pageable copy waits for the GPU)."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def setup(device: str = "cpu") -> Dist:
    """Join the process group torchrun describes in the environment; a one-process Dist without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return Dist(device=dev)
    rank = int(os.environ["RANK"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def no_buffer_sync() -> dict:
    """DistributedDataParallel's argument that stops it broadcasting buffers before every forward (the model's
    only buffers are the fixed region PCA): ``forward_sync_buffers`` where torch has it, else the older name."""
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in parameters
        else {"broadcast_buffers": False}
    )


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
