"""BatchNorm statistics reset: recompute running statistics on calibration data.

Merging averages weights, so the running statistics of a merged BatchNorm no longer describe its
inputs. ``reset_bn_stats`` re-estimates them as a cumulative average over the data (train mode,
no gradient), as ZipIt! and MuDSC do for the base models before matching and for the merged model.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import MudscError, first_line
from ..inputs import as_inputs, batch_size, call, describe, to_device


class BatchNormResetError(MudscError, ValueError):
    """A calibration batch that the model cannot run in training mode."""


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: torch.nn.Module, batches: Iterable, inputs_from_batch: Callable, device: torch.device | str | None = None) -> None:
    """Recompute every BatchNorm's running mean and variance over ``batches`` (cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        for k, batch in enumerate(batches):
            inputs = to_device(as_inputs(inputs_from_batch(batch)), device)
            try:
                call(model, inputs)
            except Exception as exc:  # the model refuses a batch: say which, and why
                small = " (BatchNorm in training mode needs at least 2 samples per batch)" if batch_size(inputs) == 1 else ""
                raise BatchNormResetError(
                    f"resetting BatchNorm statistics: the model failed on calibration batch {k} ({describe(inputs)}){small}: "
                    f"{type(exc).__name__}: {first_line(exc)}"
                ) from exc
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
