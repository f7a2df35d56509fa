"""BatchNorm statistics reset: recompute running statistics on calibration data.

Merging averages weights, so the running statistics of a merged BatchNorm no longer describe its
inputs. ``reset_bn_stats`` re-estimates them as a cumulative average over the data (train mode,
no gradient), as ZipIt! and MuDSC do for the base models before matching and for the merged model.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..inputs import batch_size, call
from .calibration import Calibration, CalibrationError


class BatchNormResetError(CalibrationError):
    """A calibration batch that the model cannot run in training mode."""


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: torch.nn.Module, data: Iterable | Calibration) -> None:
    """Recompute every BatchNorm's running mean and variance over ``data`` (batches, or a
    :class:`~.calibration.Calibration`) as a cumulative average."""
    calib = Calibration.of(data)
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
        for k, inputs in calib.inputs():
            small = "; BatchNorm in training mode needs at least 2 samples per batch" if batch_size(inputs) == 1 else ""
            with calib.batch(k, inputs, "resetting BatchNorm statistics", error=BatchNormResetError, hint=small):
                call(model, inputs)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
