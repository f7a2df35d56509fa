"""``analyze``: model -> MergeSpec, the passes in order (trace, build IR, propagate, group)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import torch

from ..errors import AnalysisError, MudscError, UnsupportedOpError
from ..inputs import as_inputs, bind
from ..plugin.registry import Registry, get_registry
from ..spec.axes import Expr
from ..spec.merge_spec import MergeSpec
from .grouping import build_spec
from .ir import build_graph
from .probe import Samples
from .propagate import Propagator
from .trace import trace


@dataclass
class Analysis:
    """Everything the passes produced: the GraphModule, the IR, the propagator and the spec."""

    graph: nx.DiGraph
    propagator: Propagator
    spec: MergeSpec
    value_axes: dict[str, list[Expr | None] | None] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    caught: list = field(default_factory=list)

    @property
    def tracer(self) -> str:
        """``"fx"`` or ``"export"``: which tracer made the graph."""
        return self.graph_module.meta.get("mudsc_tracer", "fx")

    @property
    def graph_module(self):
        return self.graph.graph["module"]

    def tensors_read_by(self, nodes: set[str]) -> set[str]:
        """The state-dict names the graph ``nodes`` read (a get_attr's tensor, a module's own)."""
        used: set[str] = set()
        modules = dict(self.graph_module.named_modules())
        for name in nodes:
            node = self.graph.nodes[name]["fx"]
            if node.op == "get_attr":
                used.add(str(node.target))
            elif node.op == "call_module":
                prefix = f"{node.target}."
                used.update(prefix + p for p, _ in modules[node.target].named_parameters())
                used.update(prefix + b for b, _ in modules[node.target].named_buffers())
        return used

    def read_only_by_batchnorm(self) -> set[str]:
        """Module paths (of an fx-traced model) whose every output is read only by BatchNorms."""
        from torch.nn.modules.batchnorm import _BatchNorm

        if self.tracer != "fx":
            return set()
        gm = self.graph_module
        modules = dict(gm.named_modules())
        calls: dict[str, list[bool]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                only_bn = bool(node.users) and all(u.op == "call_module" and isinstance(modules.get(u.target), _BatchNorm) for u in node.users)
                calls.setdefault(str(node.target), []).append(only_bn)
        return {path for path, flags in calls.items() if all(flags)}


def _run(name: str, fn: Callable[[], Any], timings: dict[str, float]) -> Any:
    t0 = time.perf_counter()
    try:
        return fn()
    except MudscError:
        raise
    except Exception as exc:  # a bug in a pass: say which pass
        raise AnalysisError(f"pass {name!r} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def analyze_full(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    strict: bool = False,
    registry: Registry | None = None,
    concrete_args: dict[str, Any] | None = None,
    tracer: str = "auto",
    probe: bool = True,
) -> Analysis:
    """Like :func:`analyze`, returning the intermediate products too."""
    registry = registry or get_registry()
    inputs = as_inputs(example_inputs)
    timings: dict[str, float] = {}
    leaves = registry.leaf_module_types()
    gm = _run("trace", lambda: trace(model, inputs, leaf_types=leaves, concrete_args=concrete_args, tracer=tracer), timings)
    analysis = _analyse(model, gm, registry, strict and not (tracer == "auto" and gm.meta["mudsc_tracer"] == "fx"), timings, probe)
    if tracer == "auto" and gm.meta["mudsc_tracer"] == "fx" and analysis.propagator.opaque_modules:
        # fx kept a module it cannot see into (nn.TransformerEncoderLayer, ...): torch.export may see
        # through it; keep whichever analysis merges more
        try:
            gm2 = _run("trace", lambda: trace(model, inputs, tracer="export"), timings)
            other = _analyse(model, gm2, registry, False, timings, probe)
        except MudscError:
            other = None
        if other is not None and other.spec.permutable_units > analysis.spec.permutable_units:
            analysis = other
    if strict and analysis.propagator.warnings:
        raise UnsupportedOpError(f"{analysis.propagator.warnings[0]}. Register a LayerHandler for it (hook mudsc_layer_handlers)")
    for w in analysis.caught:  # the chosen analysis's warnings reach the caller
        warnings.warn(w.message, stacklevel=2)
    analysis.timings = timings
    return analysis


def _analyse(model: torch.nn.Module, gm: Any, registry: Registry, strict: bool, timings: dict[str, float], probe: bool) -> Analysis:
    graph = _run("build_graph", lambda: build_graph(gm), timings)
    prop = Propagator(graph, registry, strict=strict, model=model, samples=_samples(gm, graph, registry) if probe else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run("propagate", prop.run, timings)
        spec, value_axes = _run("groups", lambda: build_spec(prop.result()), timings)
    analysis = Analysis(graph, prop, spec, value_axes, timings)
    analysis.caught = caught
    return analysis


def _samples(gm: Any, graph: nx.DiGraph, registry: Registry) -> Samples | None:
    """Example values for the equivariance probe, captured for the nodes no handler describes."""
    example = gm.meta.get("mudsc_example")
    if example is None:
        return None
    wanted = {name for name, a in graph.nodes(data=True)
              if a["op"] in ("call_function", "call_method", "call_module") and registry.handler_for(a["op"], a["target"]) is None}
    return Samples(gm, bind(gm, example), wanted)


def analyze(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    strict: bool = False,
    registry: Registry | None = None,
    concrete_args: dict[str, Any] | None = None,
    tracer: str = "auto",
    probe: bool = True,
) -> MergeSpec:
    """Infer the merge groups of ``model``.

    ``example_inputs`` are the inputs of one forward call, as the model's users give them: a tuple
    of positional tensors (a bare tensor is ``(x,)``) or a dict of keyword tensors
    (``{"input_ids": ids, "attention_mask": mask}``). ``tracer``: ``"fx"`` (torch.fx symbolic
    tracing), ``"export"`` (torch.export, ATen-level) or ``"auto"``: fx, and torch.export when fx
    cannot trace the model or leaves one of its modules unsupported. With ``strict=True`` an op
    that no layer handler understands raises :class:`~mudsc_graph.errors.UnsupportedOpError`
    instead of fixing the spaces it touches with a warning. An op that no handler describes is
    measured on the example inputs (the equivariance probe, :mod:`.probe`): which output axes
    carry the units of which input axes; ``probe=False`` fixes what it touches instead.
    """
    return analyze_full(model, example_inputs, strict=strict, registry=registry, concrete_args=concrete_args, tracer=tracer,
                        probe=probe).spec
