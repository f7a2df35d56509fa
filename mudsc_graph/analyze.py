"""``analyze``: model -> MergeSpec, the passes in order (trace, build IR, propagate, group)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import torch

from .errors import AnalysisError, MudscError
from .groups import MergeSpec, build_spec
from .ir import build_graph
from .propagate import Propagator
from .registry import Registry, get_registry
from .trace import trace


@dataclass
class Analysis:
    """Everything the passes produced: the GraphModule, the IR, the propagator and the spec."""

    graph: nx.DiGraph
    propagator: Propagator
    spec: MergeSpec
    value_axes: dict[str, list | None] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def graph_module(self):
        return self.graph.graph["module"]


def _run(name: str, fn: Callable[[], Any], timings: dict[str, float]) -> Any:
    t0 = time.perf_counter()
    try:
        return fn()
    except MudscError:
        raise
    except Exception as exc:  # a bug in a pass: say which pass
        raise AnalysisError(f"pass {name!r} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        timings[name] = time.perf_counter() - t0


def analyze_full(
    model: torch.nn.Module,
    example_inputs: tuple | torch.Tensor,
    *,
    strict: bool = False,
    registry: Registry | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> Analysis:
    """Like :func:`analyze`, returning the intermediate products too."""
    registry = registry or get_registry()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    timings: dict[str, float] = {}
    gm = _run("trace", lambda: trace(model, tuple(example_inputs), leaf_types=registry.leaf_module_types(), concrete_args=concrete_args), timings)
    graph = _run("build_graph", lambda: build_graph(gm), timings)
    prop = Propagator(graph, registry, strict=strict)
    _run("propagate", prop.run, timings)
    spec, value_axes = _run("groups", lambda: build_spec(prop), timings)
    return Analysis(graph, prop, spec, value_axes, timings)


def analyze(
    model: torch.nn.Module,
    example_inputs: tuple | torch.Tensor,
    *,
    strict: bool = False,
    registry: Registry | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> MergeSpec:
    """Infer the merge groups of ``model`` (any torch.fx-traceable module).

    ``example_inputs`` is the tuple of tensors one forward call takes. With ``strict=True`` an op
    that no layer handler understands raises :class:`~mudsc_graph.errors.UnsupportedOpError`
    instead of fixing the spaces it touches with a warning.
    """
    return analyze_full(model, example_inputs, strict=strict, registry=registry, concrete_args=concrete_args).spec
