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
:func:`together` runs a step on every rank and, when any rank failed, raises on all of them. A rank
that never comes (not started, stopped, killed) is waited for at most ``MUDSC_DIST_TIMEOUT`` seconds
(default 600), at joining and at every collective; then every waiting rank ends with one line.

    torchrun --nproc-per-node 2 -m mudsc_cli merge a.pt b.pt --arch resnet20 --data data.pt -o m.pt
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import MudscError, first_line

T = TypeVar("T")


class DistributedError(MudscError, RuntimeError):
    """Another rank of the process group failed (its message is quoted). ``abandon_process``: a
    collective timed out, so the process group cannot be torn down (gloo aborts in its destructors);
    the command line exits at once after its one line."""

    abandon_process = False


#: How long a rank waits for the others (joining, or in a collective), in seconds.
DEFAULT_TIMEOUT = 600.0


def timeout_seconds() -> float:
    raw = os.environ.get("MUDSC_DIST_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise DistributedError(f"MUDSC_DIST_TIMEOUT={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise DistributedError(f"MUDSC_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def _collective(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A collective call; a timeout or a lost peer becomes one :class:`DistributedError`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:  # gloo/NCCL: timeouts, a closed connection (DistBackendError is one)
        rank, size = world()
        error = DistributedError(
            f"rank {rank} of {size}: {what} failed ({first_line(exc)[:200]}): another rank stopped, died or is more than "
            f"{timeout_seconds():g} s behind (MUDSC_DIST_TIMEOUT)"
        )
        error.abandon_process = True
        raise error from None


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
    _collective("exchanging each rank's outcome", dist.all_gather_object, messages, None if error is None else f"{type(error).__name__}: {error}")
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
            _collective("summing statistics over the ranks", dist.all_reduce, t)
        else:
            tmp = t.to(wire)
            _collective("summing statistics over the ranks", dist.all_reduce, tmp)
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
        seconds = timeout_seconds()
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        try:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(seconds=seconds))
        except Exception as exc:  # DistNetworkError (port taken), DistStoreError (no peer in time), ValueError (bad env)
            raise DistributedError(
                f"cannot join the process group (WORLD_SIZE={os.environ.get('WORLD_SIZE')}, RANK={os.environ.get('RANK')}, {where}): "
                f"{first_line(exc)[:200]}; start every rank with torchrun, or unset WORLD_SIZE to run in one process"
            ) from None
    return device


def same_on_every_rank(what: str, value: Any) -> None:
    """Refuse (on every rank) a run whose ranks were given different ``value`` (their command-line
    arguments): each rank would compute on its own data and rank 0 record only its own."""
    if not active():
        return
    values: list[Any] = [None] * world()[1]
    _collective("comparing the ranks' arguments", dist.all_gather_object, values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise DistributedError(f"rank {differ[0]} was given another {what} than rank 0 ({values[differ[0]]!r}, not {values[0]!r}); "
                               "give every rank the same arguments")


def is_writer() -> bool:
    """Whether this process writes the outputs (rank 0, or the only process)."""
    return world()[0] == 0


def writer_turn() -> bool:
    """Wait until every rank got here (so no rank still checks an output path rank 0 is about to
    write), then tell whether this one writes."""
    if active():
        _collective("waiting for every rank before writing", dist.barrier)
    return is_writer()
