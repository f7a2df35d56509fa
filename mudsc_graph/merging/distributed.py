"""Calibration across processes with ``torch.distributed``.

Every statistic a merge reads from data is a sum over batches: the activation moments
(:class:`~mudsc_graph.merging.statistics.StackedMoments`) and the BatchNorm running averages of
the reset passes. When a process group is initialised (``torchrun``, or a user's own
``init_process_group``) with more than one process, each rank runs its share of the calibration
batches (round robin: batch ``k`` on rank ``k % world``, unless the data is already sharded), the
sums are all-reduced, and every rank holds the statistics of all the data. Matching is then
deterministic on identical inputs, so every rank computes the same matchings and merged weights;
the CLI writes on rank 0 only.

A failure on one rank (a bad batch) would leave the others waiting in a collective forever:
:func:`together` runs a step on every rank and, when any rank failed, raises on all of them.

    torchrun --nproc-per-node 2 -m mudsc_cli merge a.pt b.pt --arch resnet20 --data data.pt -o m.pt
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import MudscError

T = TypeVar("T")


class DistributedError(MudscError, RuntimeError):
    """Another rank of the process group failed (its message is quoted)."""


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    """More than one process shares the calibration."""
    return world()[1] > 1


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's batches: every ``world``-th, from its rank (all of them in one process)."""
    rank, size = world()
    return list(batches)[rank::size]


def together(step: Callable[[], T]) -> T:
    """``step()`` on every rank; if it raised anywhere, raise on every rank (the local exception
    where there is one, else a :class:`DistributedError` quoting the first failing rank)."""
    if not active():
        return step()
    error: BaseException | None = None
    result: Any = None
    try:
        result = step()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    messages: list[Any] = [None] * world()[1]
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise DistributedError(f"rank {rank} of the process group failed: {message}")
    return result


def all_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (through the device the backend needs: the CPU for
    gloo, this rank's GPU for NCCL)."""
    if not active():
        return
    backend = dist.get_backend()
    for t in tensors:
        wire = _wire_device(backend, t.device)
        if wire == t.device:
            dist.all_reduce(t)
        else:
            tmp = t.to(wire)
            dist.all_reduce(tmp)
            t.copy_(tmp)


def _wire_device(backend: str, device: torch.device) -> torch.device:
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo" and device.type != "cpu":
        return torch.device("cpu")
    return device


def reduce_moments(accumulators: Sequence[Any]) -> None:
    """Combine every rank's :class:`~mudsc_graph.merging.statistics.StackedMoments` into the moments of
    all samples (Chan et al.'s parallel update across ranks: each rank's scatter is shifted by
    ``count * delta delta^T`` to the global mean before the sum), in place, on every rank."""
    if not active() or not accumulators:
        return
    dev = accumulators[0].mean.device
    counts = torch.tensor([float(a.count) for a in accumulators], dtype=torch.float64, device=dev)
    sums = [a.mean * a.count for a in accumulators]
    all_sum_([counts, *sums])
    for a, total, s in zip(accumulators, counts.tolist(), sums):
        if total:
            a.recentre(s / total, int(total))
    all_sum_([t for a in accumulators for t in a.tensors()])


def reduce_batchnorm(model: torch.nn.Module, n_batches: int) -> None:
    """Average the BatchNorm running statistics of ``model`` over the ranks, each rank weighted by
    the ``n_batches`` it ran: the cumulative average of all the batches, as one process computes it."""
    if not active():
        return
    from torch.nn.modules.batchnorm import _BatchNorm

    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return
    dev = bns[0].running_mean.device
    total = torch.tensor([float(n_batches)], dtype=torch.float64, device=dev)
    all_sum_([total])
    if total.item() == 0:
        return
    stats = [t.mul_(n_batches) for m in bns for t in (m.running_mean, m.running_var)]
    all_sum_(stats)
    for t in stats:
        t.div_(total.item())
    for m in bns:
        m.num_batches_tracked.fill_(int(total.item()))


def init_from_env(device: str) -> str:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1),
    unless one is initialised already: NCCL for a CUDA ``device`` (this rank's GPU,
    ``cuda:{LOCAL_RANK}``), gloo otherwise. Returns the device this rank computes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def is_writer() -> bool:
    """Whether this process writes the outputs (rank 0, or the only process)."""
    return world()[0] == 0


def writer_turn() -> bool:
    """Wait until every rank got here (so no rank still checks an output path rank 0 is about to
    write), then tell whether this one writes."""
    if active():
        dist.barrier()
    return is_writer()
