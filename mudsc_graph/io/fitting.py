"""Fitting a state dict into a model: keys, shapes, dtype kinds and finiteness checked first.

    >>> fit_state_dict(model, state, source="a.pt")  # strict, with a readable error on mismatch
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .checkpoints import _not_dense, _one_line
from .paths import CheckpointError


def _fmt_shape(shape: torch.Size) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _fmt_keys(keys: list[str]) -> str:
    return "[" + ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "") + f"] ({len(keys)})"


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "int"


_KIND_WORDS = {"bool": "a boolean", "complex": "a complex", "float": "a floating-point", "int": "an integer"}


def fit_state_dict(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly, after checking keys, shapes, dtypes and finiteness.

    A tensor must be of the same dtype kind as the model's (floating point, integer, boolean,
    complex): another width is cast (a float16 checkpoint into a float32 model, int32 position ids
    into int64 ones), but never an integer, boolean or complex tensor into float weights (a
    safetensors header edited from F32 to I32 would otherwise merge as weights around 1e9), nor
    floats into an integer buffer; a cast must not overflow (float64 values beyond float32's range,
    integers beyond the buffer's).

    Raises:
        CheckpointError: naming up to three missing/unexpected keys (with counts), or the first key
            whose shape differs, whose dtype kind differs (with both dtypes), that is not a dense
            tensor, that has NaN or inf values, or whose values do not fit the model's dtype.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing keys {_fmt_keys(missing)}"] if missing else []) + (
            [f"unexpected keys {_fmt_keys(unexpected)}"] if unexpected else []
        )
        raise CheckpointError(f"{source} does not fit the architecture: {', '.join(parts)}; check --arch / --arch-opt")
    for key, ref in expected.items():
        value = state[key]
        why = _not_dense(value)
        if why:
            raise CheckpointError(f"{source}: {key} is a {why}")
        if value.shape != ref.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {_fmt_shape(value.shape)} but the architecture expects "
                f"{_fmt_shape(ref.shape)}; check --arch-opt (e.g. num_classes)"
            )
        kind, want = _kind(value.dtype), _kind(ref.dtype)
        if kind != want:
            raise CheckpointError(
                f"{source}: {key} is {value.dtype} ({_KIND_WORDS[kind]} tensor) but the architecture has {ref.dtype} there; "
                f"the file is corrupt (an edited header?) or not this model's: save it again with {ref.dtype} values"
            )
        if kind in ("float", "complex"):
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{source}: {key} contains NaN or inf values; use a checkpoint with finite weights")
            if value.dtype != ref.dtype and not bool(torch.isfinite(value.to(ref.dtype)).all()):
                raise CheckpointError(
                    f"{source}: {key} has values too large for {ref.dtype} (finite as {value.dtype}, inf once cast); "
                    "use a checkpoint whose weights fit the model's dtype"
                )
        elif kind == "int" and value.dtype != ref.dtype and value.numel():
            info = torch.iinfo(ref.dtype)
            low, high = int(value.min()), int(value.max())
            if low < info.min or high > info.max:
                raise CheckpointError(
                    f"{source}: {key} has values {low}..{high}, out of the range of {ref.dtype}; "
                    "use a checkpoint whose values fit the model's dtype"
                )
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not fit the architecture: {_one_line(exc)}; check --arch / --arch-opt") from exc
