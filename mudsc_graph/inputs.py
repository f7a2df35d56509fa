"""Model inputs as users give them: a tuple of positional tensors or a dict of keyword tensors.

Everywhere mudsc calls a model (analysis, self-check, statistics, BatchNorm resets, merging) the
inputs of one forward call are either

- a tuple (or list) of positional arguments: ``(x,)``, ``(x, mask)``, or a bare tensor for ``(x,)``;
- a mapping of keyword arguments: ``{"input_ids": ids, "attention_mask": mask}``,
  ``{"pixel_values": images}`` (a Hugging Face ``BatchEncoding`` is such a mapping).

Values are passed as they are: integer token ids stay integers. :func:`call` runs a module on
either form; :func:`call_graph` runs a traced GraphModule, whose placeholders are the model's
inputs by position or by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Union

import torch
import torch.fx as fx

from .errors import MudscError

Inputs = Union[tuple, dict]


class InputError(MudscError, ValueError):
    """Inputs that are neither positional tensors nor keyword tensors, or do not fit the model."""


def as_inputs(x: Any) -> Inputs:
    """Normalise one forward call's inputs: a tensor -> ``(x,)``, a list -> tuple, a mapping -> dict."""
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)):
        return tuple(x)
    if isinstance(x, Mapping):
        return {str(k): v for k, v in x.items()}
    raise InputError(
        f"model inputs must be a tensor, a tuple of positional tensors or a dict of keyword tensors, got {type(x).__name__}"
    )


def tensors(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors among ``inputs``, in order."""
    values = inputs.values() if isinstance(inputs, dict) else inputs
    return [v for v in values if isinstance(v, torch.Tensor)]


def map_tensors(inputs: Inputs, fn: Callable[[torch.Tensor], Any]) -> Inputs:
    """``inputs`` with ``fn`` applied to every tensor (other values kept)."""
    f = lambda v: fn(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    if isinstance(inputs, dict):
        return {k: f(v) for k, v in inputs.items()}
    return tuple(f(v) for v in inputs)


def to_device(inputs: Inputs, device: Any) -> Inputs:
    return map_tensors(inputs, lambda t: t.to(device)) if device is not None else inputs


def batch_size(inputs: Inputs) -> int:
    """Rows of the first tensor (0 if there is none)."""
    ts = tensors(inputs)
    return int(ts[0].shape[0]) if ts and ts[0].dim() else 0


def take_rows(inputs: Inputs, n: int) -> Inputs:
    """The first ``n`` rows of every tensor with a batch axis (tracing needs only shapes)."""
    return map_tensors(inputs, lambda t: t[:n] if t.dim() else t)


def call(module: Callable, inputs: Inputs) -> Any:
    """``module(*inputs)`` or ``module(**inputs)``."""
    if isinstance(inputs, dict):
        return module(**inputs)
    return module(*inputs)


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def bind(gm: fx.GraphModule, inputs: Inputs) -> list[Any]:
    """The values of ``gm``'s placeholders for ``inputs`` (positional, or keywords by name).

    Keywords the graph does not take are dropped (``labels`` of a batch); a placeholder that is
    neither given nor has a default is an :class:`InputError` naming it.
    """
    phs = placeholders(gm)
    if not isinstance(inputs, dict):
        if len(inputs) > len(phs):
            raise InputError(f"the model takes {len(phs)} inputs ({', '.join(str(p.target) for p in phs)}) but {len(inputs)} were given")
        values = list(inputs)
        for p in phs[len(values):]:
            if not p.args:
                raise InputError(f"the model's input {p.target!r} was not given ({len(values)} positional inputs)")
            values.append(p.args[0])
        return values
    values = []
    for p in phs:
        name = str(p.target).lstrip("*")
        if name in inputs:
            values.append(inputs[name])
        elif p.args:
            values.append(p.args[0])
        else:
            raise InputError(
                f"the model's input {name!r} is missing from the keyword inputs (given: {', '.join(inputs) or 'none'})"
            )
    return values


def call_graph(gm: fx.GraphModule, inputs: Inputs) -> Any:
    """Run a traced GraphModule on inputs given as positional or keyword tensors."""
    return gm(*bind(gm, inputs))


def describe(inputs: Inputs) -> str:
    """``"input_ids (2, 7) int64, attention_mask (2, 7) int64"`` for messages."""
    items = inputs.items() if isinstance(inputs, dict) else ((f"input {k}", v) for k, v in enumerate(inputs))
    parts = []
    for k, v in items:
        what = f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" if isinstance(v, torch.Tensor) else type(v).__name__
        parts.append(f"{k} {what}")
    return ", ".join(parts)
