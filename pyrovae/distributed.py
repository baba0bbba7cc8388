"""Data parallelism on :mod:`torch.distributed`: which process this is, and what it exchanges.

Launch any pyrovae program with ``torchrun --nproc_per_node N`` (one process per GPU, or
per group of CPU cores) and :func:`init_from_environment` joins the process group that
``torchrun`` describes in its environment variables (NCCL on GPUs, gloo on CPUs). From then
on :func:`pyrovae.training.fit` and :func:`pyrovae.evaluation.importance.evaluate` see the
initialized default group through :func:`active_context` and run data-parallel:

* training: every rank holds the full data and draws the same permutation each epoch
  (same seed); each global minibatch is split into contiguous shards, one per rank; the
  loss of a shard is scaled as if the data plate held the whole global batch, and gradients
  are all-reduced each step (:class:`torch.nn.parallel.DistributedDataParallel` for eager
  steps, one flat all-reduce for compiled steps); only rank 0 writes files;
* evaluation: data points are split into blocks whose random draws are keyed by the block,
  so each rank evaluates a contiguous run of blocks and the gathered per-datapoint results
  equal a one-process evaluation.

Each rank draws its own Monte Carlo noise (rank 0 from the run's seed, rank r from a seed
derived from (seed, r)), so a run on N processes follows a different, equally valid, random
path than a run on one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pyrovae.randomness import derived_seed

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Variables ``torchrun`` sets for every process it starts."""


@dataclass(frozen=True)
class DataParallelContext:
    """This process's place in a data-parallel run over the default process group.

    Attributes
    ----------
    rank : int
        Index of this process, 0 to ``world_size - 1``; rank 0 writes files.
    world_size : int
        Number of processes.
    local_rank : int
        Index of this process on its machine (its GPU, when there are GPUs).
    """

    rank: int
    world_size: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, total: int) -> slice:
        """This rank's contiguous part of ``range(total)``; the first ``total % world_size``
        ranks get one item more (as :func:`torch.tensor_split`)."""
        size, extra = divmod(total, self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return slice(start, start + size + (self.rank < extra))

    def seed_for_rank(self, seed: int) -> int:
        """The Monte Carlo seed of this rank: ``seed`` itself on rank 0."""
        return seed if self.rank == 0 else derived_seed(seed, self.rank)

    def device(self, requested: torch.device) -> torch.device:
        """The device of this rank: ``cuda:<local_rank>`` when CUDA is requested without an
        index, else ``requested``."""
        if requested.type == "cuda" and requested.index is None:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
            return device
        return requested

    # -- collectives (every rank must call them, in the same order) --------------------------
    def sum_(self, tensors: list[torch.Tensor], scale: float = 1.0) -> None:
        """Replace each tensor by ``scale`` times its sum over ranks, with one all-reduce."""
        flat = torch.cat([t.reshape(-1) for t in tensors]) * scale
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            tensor.copy_(part.view_as(tensor))

    def broadcast_(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def gather(self, value) -> list:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def broadcast_object(self, value):
        """Rank 0's ``value`` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def active_context() -> DataParallelContext | None:
    """The data-parallel context of the initialized default process group, or ``None`` when
    there is none or it has a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DataParallelContext(dist.get_rank(), dist.get_world_size(), local_rank)


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process run (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(backend: str = "auto") -> DataParallelContext | None:
    """Join the process group described by ``torchrun``'s environment variables.

    With NCCL, this process's current CUDA device becomes ``cuda:<LOCAL_RANK>``.

    Parameters
    ----------
    backend : str
        ``"auto"``: NCCL when CUDA is available, else gloo; or a backend name.

    Returns
    -------
    DataParallelContext or None
        ``None`` for a single-process run (no ``WORLD_SIZE`` above 1): nothing to join.
    """
    if not launched_by_torchrun():
        return None
    missing = [name for name in ENVIRONMENT if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun "
            "(see docs/distributed.md)"
        )
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # collectives of Python objects use the current device
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend)
    return active_context()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
