"""Process-group setup for one process or many (torchrun, one or many nodes; SLURM).

Launch styles understood (through PyTorch Ignite's ``idist``, which reads their environments):

- one process: ``volpre pretrain ...``
- torchrun: ``torchrun --nproc_per_node=N [--nnodes=M --rdzv_backend=c10d --rdzv_endpoint=H:P] -m volpre pretrain ...``
  (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` set by torchrun)
- SLURM without torchrun: ``srun`` with one task per GPU (``SLURM_PROCID``, ``SLURM_LOCALID``,
  ``SLURM_NTASKS``, ``SLURM_JOB_NODELIST``); or ``srun`` one task per node running torchrun.

Backend: NCCL on CUDA devices, gloo on the CPU. Each process drives ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    """``nccl``, ``gloo``, or None for a single process."""
    processes_per_node: int = 1
    """Training processes on this process's node (they share its CPUs among their DataLoader workers)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs and writes checkpoints."""
        return self.rank == 0


def _requested_world_size() -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and "SLURM_JOB_ID" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


def setup_distributed(device: str | None = None) -> DistContext:
    """Join the process group the launcher describes (if any) and pick this process's device.

    ``device``: ``"cuda"``, ``"cpu"`` or None (CUDA when available). Returns the rank, world size
    and device; call :func:`teardown_distributed` at the end.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    world = _requested_world_size()
    backend = None
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        if idist.get_world_size() == 1:
            idist.initialize(backend)
    rank, local_rank = idist.get_rank(), idist.get_local_rank()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return DistContext(rank=rank, world_size=idist.get_world_size(), local_rank=local_rank, device=dev, backend=backend,
                       processes_per_node=idist.get_nproc_per_node())


def patient_group(ctx: DistContext, timeout: datetime.timedelta) -> dist.ProcessGroup | None:
    """A gloo group of every rank whose collectives wait up to ``timeout`` for the slowest rank.

    The default group keeps torch's timeout (30 min for gloo), so a launch that promises more
    ranks than it starts fails within it; work whose ranks finish far apart (``volpre cache``:
    a rank's share of a large manifest takes hours) meets at the end in this group instead.
    Every rank must call this, at the same point. None for one process.
    """
    if ctx.world_size == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timeout)


def gather_objects(ctx: DistContext, value: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank; ``[value]`` for one process."""
    if ctx.world_size == 1:
        return [value]
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value, group=group)
    return values


def teardown_distributed(ctx: DistContext) -> None:
    """Destroy the process group. Drop every DDP-wrapped model first.

    A DDP reducer holds the process group; if the reducer is the last holder, the group is
    destroyed inside the reducer's destructor, which keeps the GIL while it waits for gloo's worker
    threads, and a worker thread that needs the GIL to release a finished collective's tensors
    then deadlocks the process at exit. Collecting garbage here, with the group still registered,
    leaves :func:`idist.finalize` to destroy it through the binding that releases the GIL.
    """
    gc.collect()
    if ctx.backend is not None:
        idist.finalize()


def sync_batchnorm(module: torch.nn.Module, ctx: DistContext, enabled: bool) -> tuple[torch.nn.Module, bool]:
    """BatchNorm over the global batch under DDP (``train.sync_batchnorm``).

    With several processes on CUDA (NCCL), every BatchNorm layer of ``module`` (already on
    ``ctx.device``) becomes a ``torch.nn.SyncBatchNorm`` (``convert_sync_batchnorm``), so each
    normalises with the statistics of every rank's batch: SimCLR's global BN (Chen et al. 2020,
    section 2.2; its official code's ``global_bn``), without which two views of one crop on one rank
    can find each other through their shared local statistics; SparK's masked BatchNorm reduces
    across the same group. ``torch.nn.SyncBatchNorm`` runs on CUDA only, so CPU processes (gloo)
    keep per-process BatchNorm and rank 0 logs one line saying so. One process, a model without
    BatchNorm, or ``enabled=False``: unchanged.

    Returns ``(module, converted)``; ``converted`` says whether layers now reduce across ranks (the
    checkpoint records it).
    """
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
    if not (enabled and has_batchnorm and ctx.world_size > 1):
        return module, False
    if ctx.device.type != "cuda":
        if ctx.is_main:
            log.warning(
                "train.sync_batchnorm: BatchNorm layers keep per-process statistics on %d %s processes "
                "(torch.nn.SyncBatchNorm runs on CUDA only); on GPUs they reduce across ranks",
                ctx.world_size, ctx.device.type,
            )
        return module, False
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module), True
