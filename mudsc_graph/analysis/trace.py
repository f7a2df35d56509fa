"""Tracing: a model to an fx GraphModule with the shape of every value, by torch.fx or torch.export.

Two tracers feed one IR:

- ``"fx"``: ``torch.fx`` symbolic tracing. Module classes that have a registered ``call_module``
  layer handler are traced as leaves (so a handler sees ``nn.MultiheadAttention`` whole); every
  other module is traced through, torch.nn's own modules are leaves (fx's default). Nodes target
  torch functions, methods and modules.
- ``"export"``: ``torch.export.export`` (non-strict), for models that symbolic tracing cannot
  capture (Hugging Face transformers v5, code that reads shapes and dtypes). The graph is ATen-level
  (``aten.linear.default``, ``aten.view.default`` ...), with the batch axis of every input dynamic so
  that calibration batches of any size run. Parameters and buffers keep the user's ``state_dict``
  names (``get_attr`` targets such as ``encoder.layer.0.attention.self.query.weight``).
- ``"auto"`` (default): fx, and torch.export when fx cannot trace the model.

Either way the result is a plain ``fx.GraphModule`` whose placeholders are the model's inputs, by
position or by keyword name (see :mod:`mudsc_graph.inputs`); ``gm.meta["mudsc_tracer"]`` says which
tracer made it. Shapes are recorded by running the graph once on the example inputs, under
``node.meta["mudsc_shape"]``: a tuple of ints for a tensor, a list of such for a tuple or list of
tensors, ``None`` for anything else.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import logging
import os
import traceback
import warnings
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.nn.utils import parametrize

from ..errors import TraceError, first_line
from ..inputs import Inputs, as_inputs, batch_size, bind, call, describe, map_tensors
from ..plugin.registry import runs_forward_of
from .experts import dense_experts

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIRS = (os.path.dirname(os.path.abspath(__file__)),)
TRACERS = ("auto", "fx", "export")


class MergeTracer(fx.Tracer):
    """An fx tracer whose leaves are torch.nn's plus every module type with a layer handler."""

    def __init__(self, leaf_types: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.leaf_types = frozenset(leaf_types)
        # buffers become get_attr nodes like parameters, so `self.buf.T` stays tied to the buffer
        # instead of being folded into an anonymous constant that merging would not see
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if parametrize.is_parametrized(m):  # its weight is computed (weight_norm ...): trace through it
            return False
        # the nearest registered class decides, as in Registry.handler_for: a subclass that
        # overrides forward is traced through (unless fx's own rule makes it a leaf)
        for cls in type(m).__mro__ if self.leaf_types else ():
            if cls in self.leaf_types:
                if runs_forward_of(type(m), cls):
                    return True
                break
        return super().is_leaf_module(m, module_qualified_name)


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    leaf_types: tuple[type, ...] = (),
    concrete_args: dict[str, Any] | None = None,
    tracer: str = "auto",
) -> fx.GraphModule:
    """Trace ``model`` and record shapes; raise :class:`TraceError` with the offending code.

    ``example_inputs``: a tuple of positional tensors or a dict of keyword tensors (one forward
    call). ``tracer``: ``"auto"``, ``"fx"`` or ``"export"`` (see the module docstring).
    """
    if tracer not in TRACERS:
        raise TraceError(f"unknown tracer {tracer!r}; choose one of {', '.join(TRACERS)}")
    inputs = as_inputs(example_inputs)
    fx_error: TraceError | None = None
    with dense_experts(model):  # transformers' experts as per-expert contractions (analysis/experts.py)
        try:
            if tracer in ("auto", "fx"):
                try:
                    return trace_fx(model, inputs, leaf_types=leaf_types, concrete_args=concrete_args)
                except TraceError as exc:
                    if tracer == "fx":
                        raise
                    fx_error = exc
            return trace_export(model, inputs, fx_error=fx_error)
        except TraceError:
            _runs_on(model, inputs)  # inputs the model itself refuses are the error to report
            raise


def _runs_on(model: torch.nn.Module, inputs: Inputs) -> None:
    """The model itself must accept the example inputs, or no tracer will."""
    try:
        with torch.no_grad():
            call(model, inputs)
    except Exception as exc:
        raise TraceError(
            f"running {type(model).__name__} on the example inputs ({describe(inputs)}) failed: {type(exc).__name__}: "
            f"{first_line(exc)}; check that the example inputs match the model's forward signature"
        ) from exc


def trace_fx(
    model: torch.nn.Module, inputs: Inputs, *, leaf_types: tuple[type, ...] = (), concrete_args: dict[str, Any] | None = None
) -> fx.GraphModule:
    """Symbolic tracing with :class:`MergeTracer`, then shapes."""
    tracer = MergeTracer(leaf_types)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        raise TraceError(_explain("torch.fx", model, exc)) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["mudsc_tracer"] = "fx"
    record_shapes(gm, inputs)
    gm.meta["mudsc_example"] = inputs  # what the shapes are of (the equivariance probe runs on it)
    return gm


def trace_export(model: torch.nn.Module, inputs: Inputs, *, fx_error: BaseException | None = None) -> fx.GraphModule:
    """``torch.export.export`` with a dynamic batch axis, as a plain GraphModule, then shapes.

    The model is exported in eval mode (its mode is restored after); a Hugging Face model's
    ``config.use_cache`` is off meanwhile, so the key/value cache is not an output.
    """
    from torch.export import Dim, export

    n = batch_size(inputs)
    # a batch of one would be specialised to a constant: export (and record shapes) with two rows
    export_inputs = map_tensors(inputs, lambda t: t.repeat(2, *([1] * (t.dim() - 1))) if t.dim() else t) if n == 1 else inputs
    dyn = lambda v: {0: Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() else None  # noqa: E731
    if isinstance(export_inputs, dict):
        args, kwargs, dynamic = (), export_inputs, {k: dyn(v) for k, v in export_inputs.items()}
    else:
        args, kwargs, dynamic = export_inputs, {}, tuple(dyn(v) for v in export_inputs)
    try:
        with _exportable(model), _quiet_torch_logs():
            ep = export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # export raises many types; all mean "cannot capture"
        cause = fx_error.__cause__ if fx_error is not None and fx_error.__cause__ is not None else fx_error
        raise TraceError(_explain("torch.export", model, exc, cause)) from exc
    gm = plain_graph_module(ep.module(), type(model).__name__)
    gm.meta["mudsc_tracer"] = "export"
    if not _shapes_from_export(gm):  # the shapes of the inputs export ran on (two rows for a batch of one)
        record_shapes(gm, export_inputs)
    gm.meta["mudsc_example"] = export_inputs
    return gm


def _shapes_from_export(gm: fx.GraphModule) -> bool:
    """Concrete shapes from the values torch.export recorded (``node.meta["val"]``, symbolic sizes
    with the example's value as their hint): no second run of the model. False if one is missing."""
    def concrete(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return tuple(int(d) if isinstance(d, int) else int(d.node.hint) for d in v.shape)
        if isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v):
            return [concrete(x) for x in v]
        return None

    shapes: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            result = node.args[0]
            out = fx.node.map_arg(result, lambda n: shapes[n])
            shapes[node] = list(out) if isinstance(result, (tuple, list)) else out
        elif node.op == "get_attr":
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            shapes[node] = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        elif "val" in node.meta:
            try:
                shapes[node] = concrete(node.meta["val"])
            except (AttributeError, TypeError, ValueError):  # a size without a hint
                return False
        elif node.op == "call_function" and not node.users:  # assertions
            shapes[node] = None
        else:
            return False
    for node, shape in shapes.items():
        node.meta["mudsc_shape"] = shape
    return True


def plain_graph_module(exported: fx.GraphModule, name: str) -> fx.GraphModule:
    """``ep.module()`` as an ordinary GraphModule: placeholders are the flat inputs (by position or
    name), no input guards, and ``train()``/``eval()`` work (the graph is fixed in eval mode)."""
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            graph.erase_node(node)
    info = getattr(graph._codegen, "pytree_info", None)
    out_spec = getattr(info, "out_spec", None)
    output = next(n for n in graph.nodes if n.op == "output")
    if out_spec is not None and out_spec.is_leaf() and isinstance(output.args[0], (tuple, list)) and len(output.args[0]) == 1:
        output.args = (output.args[0][0],)  # the model returns one tensor: so does the graph
    graph._codegen = fx.graph.CodeGen()  # flat placeholders instead of the exported pytree signature
    gm = fx.GraphModule(exported, graph, name)
    gm.recompile()
    return gm


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torch.export logs its failed guesses (and whole graphs) as warnings: keep them off the user's terminal."""
    names = ("torch", "torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's own notes about the model's attributes
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _exportable(model: torch.nn.Module) -> Iterator[None]:
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    was_training = model.training
    try:
        if use_cache:
            config.use_cache = False
        model.eval()
        yield
    finally:
        model.train(was_training)
        if use_cache:
            config.use_cache = use_cache


def record_shapes(gm: fx.GraphModule, example_inputs: Any) -> None:
    """Run ``gm`` once and store every node's output shape under ``node.meta['mudsc_shape']``."""

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            n.meta["mudsc_shape"] = _shape_of(out)
            return out

    inputs = as_inputs(example_inputs)
    try:
        values = bind(gm, inputs)
        with torch.no_grad():
            _Recorder(gm).run(*values)
    except Exception as exc:
        raise TraceError(
            f"running the traced {type(gm).__name__} on the example inputs ({describe(inputs)}) failed: "
            f"{type(exc).__name__}: {first_line(exc)}; check that the example inputs match the model's forward signature"
        ) from exc


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and any(isinstance(v, torch.Tensor) for v in value):
        return [_shape_of(v) for v in value]
    return None


def _user_frame(exc: BaseException) -> tuple[str, Any]:
    """`` at file:line in fn(): `code` `` for the innermost frame outside torch and mudsc, and the
    ``self`` of that frame when it is a module."""
    for frame, lineno in reversed(list(traceback.walk_tb(exc.__traceback__))):
        filename = frame.f_code.co_filename
        if filename.startswith(_TORCH_DIR) or filename.startswith("<") or filename.startswith(_OWN_DIRS):
            continue
        code = linecache.getline(filename, lineno).strip()
        owner = frame.f_locals.get("self")
        return f" at {os.path.basename(filename)}:{lineno} in {frame.f_code.co_name}(): `{code}`", owner
    cause = exc.__cause__ or exc.__context__
    return _user_frame(cause) if cause is not None and cause is not exc else ("", None)


def _explain(tool: str, model: torch.nn.Module, exc: BaseException, fx_exc: BaseException | None = None) -> str:
    """One line: what the tracer(s) said, where in the model's code, and what to do."""
    where, owner = _user_frame(exc)
    if not where and fx_exc is not None:
        where, owner = _user_frame(fx_exc)
    path = next((name for name, m in model.named_modules() if m is owner), None) if isinstance(owner, torch.nn.Module) else None
    module = f" (module {path or '<top>'}: {type(owner).__name__})" if path is not None else ""
    culprit = type(owner).__name__ if path is not None else "the module that contains this code"
    said = f"torch.fx: {first_line(fx_exc)}; torch.export: {first_line(exc)}" if fx_exc is not None else first_line(exc)
    if tool == "torch.fx":
        advice = f"register a LayerHandler for {culprit} so that it is traced as a leaf, or use tracer='export'"
    else:
        advice = (
            f"register a LayerHandler for {culprit} (with tracer='fx' it is then traced as a leaf), or write its "
            "Python branches on tensor values with torch.where / torch.cond, which torch.export can capture"
        )
    what = "with torch.fx or torch.export" if fx_exc is not None else f"with {tool}"
    return f"cannot trace {type(model).__name__} {what}: {said}{where}{module}; {advice}"
