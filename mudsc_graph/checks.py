"""Checks on tensors that reading, merging and writing share (so that ``merging`` needs nothing
from ``io``)."""

from __future__ import annotations

from typing import Mapping

import torch


def first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first key (in order) of a floating or complex tensor with NaN or inf values, or None."""
    for key, value in state.items():
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            return key
    return None
