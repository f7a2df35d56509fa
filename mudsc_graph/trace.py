"""Tracing: any ``torch.fx``-traceable model to a GraphModule with the shape of every value.

Module classes that have a registered ``call_module`` layer handler are traced as leaves (so a
handler sees ``nn.MultiheadAttention`` whole); everything else follows torch.fx's defaults.
Shapes are recorded by running the graph once on the example inputs, under
``node.meta["mudsc_shape"]``: a tuple of ints for a tensor, a list of such for a tuple or list of
tensors, ``None`` for anything else.
"""

from __future__ import annotations

import linecache
import os
import traceback
from typing import Any

import torch
import torch.fx as fx

from .errors import TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)


class MergeTracer(fx.Tracer):
    """An fx tracer whose leaves are torch.nn's plus every module type with a layer handler."""

    def __init__(self, leaf_types: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        # buffers become get_attr nodes like parameters, so `self.buf.T` stays tied to the buffer
        # instead of being folded into an anonymous constant that merging would not see
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(
    model: torch.nn.Module,
    example_inputs: tuple,
    *,
    leaf_types: tuple[type, ...] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` and record shapes; raise :class:`TraceError` with the offending code."""
    tracer = MergeTracer(leaf_types)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        raise TraceError(_explain(model, exc)) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    record_shapes(gm, example_inputs)
    return gm


def record_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run ``gm`` once and store every node's output shape under ``node.meta['mudsc_shape']``."""

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            n.meta["mudsc_shape"] = _shape_of(out)
            return out

    try:
        with torch.no_grad():
            _Recorder(gm).run(*example_inputs)
    except Exception as exc:
        raise TraceError(
            f"running the traced {type(gm).__name__} on the example inputs failed: {type(exc).__name__}: {exc}; "
            "check that example_inputs match the model's forward signature"
        ) from exc


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and any(isinstance(v, torch.Tensor) for v in value):
        return [_shape_of(v) for v in value]
    return None


def _explain(model: torch.nn.Module, exc: Exception) -> str:
    """One line: what fx said, where in the user's code, and what to do."""
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.startswith(_TORCH_DIR) or frame.filename.startswith("<"):
            continue
        code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        where = f" at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}(): `{code}`"
        break
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"torch.fx cannot trace {type(model).__name__}: {msg}{where}. "
        "Register a LayerHandler for the module that contains this code so it is traced as a leaf, "
        "or pass concrete_args to fix the value the branch depends on"
    )
