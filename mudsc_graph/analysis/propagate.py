"""The propagation pass: one walk over the IR that links tensor axes into unit spaces.

For every node, the layer handler registered for its ``(opcode, target)`` receives an
:class:`OpContext` and states how the axes of the node's inputs, parameters and output relate
(``ctx.link``, ``ctx.set_output``). Nodes with no handler fall back to :meth:`OpContext.unsupported`:
every space they touch becomes fixed, with a warning naming the node (an error in strict mode).
Placeholders get fixed spaces (model inputs); the output node fixes what it returns.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import networkx as nx
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import AnalysisError, UnsupportedOpError
from ..plugin.registry import Registry
from .ir import nodes_in_order
from .probe import Operand, Prober, Samples, out_layouts
from .spaces import Dep, Layout, SizeMismatch, SpaceTable, remap


@dataclass
class Value:
    """A tensor value during propagation: its shape and one :data:`Layout` per axis."""

    shape: tuple[int, ...]
    layout: list[Layout]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def axis(self, i: int) -> Layout:
        return self.layout[i]

    def dim(self, i: int) -> int:
        """Normalise a possibly negative axis index."""
        return i % self.ndim if self.ndim else 0


class OpContext:
    """What a layer handler sees of one node, and the verbs it uses to describe the op.

    Reading: ``node``, ``module`` (call_module), ``path``, ``input(i)``, ``arg(i, name)``,
    ``out_shape``, ``param(name, axis)``. Describing: ``link(a, b)``, ``new(size)``,
    ``fixed(size)``, ``set_output(layouts)``, ``broadcast(values)``, ``blocks(layout, n)``,
    ``split_axis``/``merge_axes`` for reshapes, and ``unsupported()`` as a last resort.
    """

    def __init__(self, prop: "Propagator", node: fx.Node) -> None:
        self._prop = prop
        self.node = node
        self.spaces: SpaceTable = prop.spaces
        attrs = prop.graph.nodes[node.name]
        self.path: str = attrs["path"]
        self.module: torch.nn.Module | None = prop.modules.get(node.target) if node.op == "call_module" else None
        self.out_shape: Any = attrs["shape"]
        self._output: Any = None
        self._set = False
        self.handler: Any = None

    # -- reading ---------------------------------------------------------------------------
    def arg(self, i: int | None, name: str | None = None, default: Any = None) -> Any:
        """The raw argument at position ``i`` (or keyword ``name``), fx Nodes left as is.

        For an ATen operator ``name`` is looked up in its schema first, so one rule reads the
        arguments of ``F.embedding(input, weight)`` and ``aten.embedding(weight, indices)`` alike.
        """
        if name is not None and isinstance(self.node.target, torch._ops.OpOverload):
            i = _schema_positions(self.node.target).get(name, i)
        if i is not None and i < len(self.node.args):
            return self.node.args[i]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def value(self, a: Any) -> Any:
        """The propagated value of an argument: a :class:`Value`, a list of them, or ``None``."""
        if isinstance(a, fx.Node):
            return self._prop.values.get(a.name)
        if isinstance(a, (list, tuple)):
            return [self.value(x) for x in a]
        return None

    def input(self, i: int = 0, name: str | None = None) -> Any:
        return self.value(self.arg(i, name))

    def tensor_inputs(self) -> list[Value]:
        """Every tensor value among the node's arguments, flattened."""
        out: list[Value] = []

        def visit(v: Any) -> None:
            if isinstance(v, Value):
                out.append(v)
            elif isinstance(v, list):
                for x in v:
                    visit(x)

        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: visit(self.value(n)) or n)
        return out

    def param(self, name: str, axis: int) -> int:
        """The space of axis ``axis`` of this module's parameter or buffer ``name``."""
        full = f"{self.path}.{name}" if self.path else name
        return self._prop.attr_space(full, axis)

    def attr(self, full_name: str, axis: int) -> int:
        """The space of axis ``axis`` of the model's parameter or buffer ``full_name``."""
        return self._prop.attr_space(full_name, axis)

    def param_inner(self, name: str, axis: int, space: Layout, groups: int, *, full: bool = False, reads: bool = True) -> None:
        """Axis ``axis`` of parameter ``name`` indexes the inside of a block of ``space``.

        For a grouped convolution the weight is ``(out, in / groups, ...)``: the row block ``j``
        (along axis 0) reads the units of block ``j`` of the input space ``space``. ``name`` is
        relative to this node's module, or the model's full name with ``full=True``. ``reads``:
        the axis is summed over (a conv's input channels); experts' own hidden units stored as
        ``(experts, hidden, ...)`` are produced there instead (``reads=False``).
        """
        full = name if full or not self.path else f"{self.path}.{name}"
        full = self._prop.canonical.get(full, full)
        self.spaces.fix(self._prop.attr_space(full, axis), "")
        self.spaces.note(self._prop.attr_space(full, axis), "inside a block (a grouped convolution's input channels)")
        key = (full, axis % len(self._prop.attr_shapes[full]))
        self._prop.inner_params[key] = (self.spaces.collapse(space), groups)
        if reads:
            self._prop.consumed.add(key)

    def has_inner(self, full_name: str) -> bool:
        """Whether an axis of the model's tensor ``full_name`` is already the inside of another's blocks."""
        full = self._prop.canonical.get(full_name, full_name)
        return any(name == full for name, _ in self._prop.inner_params)

    def internal_probe(self, layout: Layout, key: str) -> None:
        """Units of ``layout`` live inside this op: read them with the handler's ``features(..., key)``."""
        if self.handler is None or self.handler.features is None:
            raise AnalysisError(f"layer handler at node {self.node.name} declares an internal probe but has no features function")
        self._prop.internal_probes.append((self.node.name, key, self.handler.name, self.spaces.collapse(layout)))

    def is_constant(self, arg: Any) -> bool:
        """Whether an argument is computed from parameters alone (``self.w``, ``self.w.T``, ...)."""
        return isinstance(arg, fx.Node) and arg.name in self._prop.constant

    def has_param(self, name: str) -> bool:
        return self.module is not None and getattr(self.module, name, None) is not None

    # -- describing --------------------------------------------------------------------------
    def new(self, size: int) -> int:
        """A fresh permutable space."""
        return self.spaces.new(size)

    def new_fixed(self, size: int, note: str = "positions (a spatial, token or other axis that is not a unit axis)") -> int:
        """A fresh fixed space (kernel taps, spatial positions after a convolution, ...); ``note`` says what it indexes."""
        return self.spaces.new(size, "", note)

    def link(self, a: Layout, b: Layout) -> None:
        """``a`` and ``b`` index the same units (layouts in the same axis coordinates)."""
        self.spaces.link(a, b)

    def contract(self, activation: Layout, weight: Layout) -> None:
        """``weight``'s axis is summed against ``activation``'s: it *reads* those units.

        Only ``weight`` is recorded: an activation's layout may name the parameter that produced it.

        Like :meth:`link`, and it records the parameter axis as a consuming one (weight columns),
        where merging applies the unmerge matrices instead of the merge matrices.
        """
        self.link(activation, weight)
        self.reads(weight)

    def reads(self, layout: Layout) -> None:
        """``layout`` is an axis of a parameter (not an activation) that is summed over: record it."""
        self._prop.mark_consumed(layout)

    def fix(self, *layouts: Layout, reason: str | None = None, note: str | None = None) -> None:
        """Fix every space of ``layouts``; ``reason`` (default: this op is not understood) is the
        warning the analysis shows, ``""`` fixes them silently (kernel taps, time steps), with
        ``note`` saying what they index."""
        for L in layouts:
            self.spaces.fix_layout(L, reason if reason is not None else self._reason())
            for s in self.spaces.leaves(L) if note else ():
                self.spaces.note(s, note)

    def fix_units(self, layout: Layout, why: str) -> None:
        """Fix ``layout`` because this op reads its units in a way no permutation survives
        (``why``: "pooling over a unit axis"); silent when its spaces are fixed already."""
        self.fix(layout, reason="" if self.spaces.settled(layout) else f"{self._reason()} ({why})")

    def set_output(self, layouts: Any) -> None:
        """The output's layouts: a list (one per axis) for a tensor, a list of lists for a tuple."""
        self._output = layouts
        self._set = True

    def like(self, v: Value) -> list[Layout]:
        return list(v.layout)

    def fresh_output(self, reason: str = "") -> Any:
        """Fixed fresh spaces for every output axis."""
        return _map_shape(self.out_shape, lambda n: self.spaces.new(n, reason))

    def blocks(self, layout: Layout, n: int) -> tuple[int, Layout]:
        """Give a channel space ``n`` blocks (groups, heads): returns (block space, inner layout).

        The inner layout is a :class:`Dep` on the block axis (ref 0), one part per block.
        """
        s = self.spaces.collapse(layout)
        size = self.spaces.size[self.spaces.find(s)]
        if size % n:
            raise AnalysisError(f"cannot split {size} units into {n} blocks")
        if size == n:  # blocks of one unit: the space itself moves block-wise (depthwise conv)
            return s, self.new_fixed(1)
        r, inner = self.spaces.split(s, (n, size // n))
        return r, inner

    def broadcast(self, values: Sequence[Value | None], out_shape: tuple[int, ...] | None = None) -> list[Layout]:
        """Link the inputs of a broadcasting elementwise op; return the output layout."""
        out_shape = tuple(out_shape if out_shape is not None else self.out_shape)
        n = len(out_shape)
        out: list[Layout | None] = [None] * n
        for v in values:
            if v is None:
                continue
            off = n - v.ndim
            mapping = {i: i + off for i in range(v.ndim)}
            for i in range(v.ndim):
                size = v.shape[i]
                if size == 1 and out_shape[i + off] != 1:
                    continue
                L = remap(v.layout[i], mapping)
                if L is None:
                    L = self.spaces.collapse(v.layout[i])
                if size == 1:
                    continue
                if out[i + off] is None:
                    out[i + off] = L
                else:
                    self.link(out[i + off], L)
        return [L if L is not None else self.new_fixed(out_shape[i]) for i, L in enumerate(out)]

    def unsupported(self, why: str = "") -> None:
        """Fallback: fix every space the node touches and give its output fixed spaces."""
        self._prop.unsupported(self, why)

    def _reason(self) -> str:
        if self.module is not None:
            what = f"module {type(self.module).__name__}"
        else:
            what = f"op {_tname(self.node.target)}"
        where = f" ({self.path})" if self.path else ""
        return f"unsupported {what} at node {self.node.name}{where}"


_POSITIONS: dict[Any, dict[str, int]] = {}


_VIEW_METHODS = frozenset({"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "narrow", "select", "unsqueeze",
                           "squeeze", "expand", "expand_as", "t", "flatten", "unflatten", "split", "chunk", "unbind", "swapaxes",
                           "movedim", "diagonal", "as_strided", "unfold", "__getitem__", "detach", "contiguous"})


def _is_view(node: fx.Node) -> bool:
    """Whether the node's output may share memory with its first input (a view, or possibly one)."""
    t = node.target
    if node.op == "call_method":
        return t in _VIEW_METHODS
    if node.op != "call_function":
        return False
    if t is operator.getitem:
        return True
    schema = getattr(t, "_schema", None)
    if schema is not None:
        return any(r.alias_info is not None for r in schema.returns) and _written(node) is None
    return getattr(t, "__name__", "") in _VIEW_METHODS


def _stale(written: list[fx.Node]) -> frozenset[str]:
    """The nodes whose values change after they are computed: every view of the tensor that an
    in-place op writes (from its base down), and the in-place ops' own outputs."""
    out: set[str] = set()
    for dst in written:
        base = dst
        while _is_view(base) and base.args and isinstance(base.args[0], fx.Node):
            base = base.args[0]
        todo = [base]
        while todo:
            n = todo.pop()
            if n.name not in out:
                out.add(n.name)
                todo += [u for u in n.users if _is_view(u) or _written(u) is n]
    return frozenset(out)


def _written(node: fx.Node) -> fx.Node | None:
    """The argument an in-place op writes (``x.add_(y)``, ``aten.copy_(dst, src)``: the first), or None."""
    t = node.target
    if node.op == "call_method":
        writes = isinstance(t, str) and t.endswith("_") and not t.endswith("__")
    elif node.op == "call_function":
        args = getattr(getattr(t, "_schema", None), "arguments", None)
        writes = bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
    else:
        writes = False
    first = node.args[0] if node.args else None
    return first if writes and isinstance(first, fx.Node) else None


def _schema_positions(op: Any) -> dict[str, int]:
    """``{argument name: position}`` of an ATen operator's schema."""
    pos = _POSITIONS.get(op)
    if pos is None:
        pos = _POSITIONS[op] = {a.name: k for k, a in enumerate(op._schema.arguments)}
    return pos


def op_name(target: Any) -> str:
    """``"max_pool2d"`` for ``aten.max_pool2d.default``, ``F.max_pool2d`` or the method name."""
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", None) or str(target)


def _map_shape(shape: Any, fn) -> Any:
    if shape is None:
        return None
    if isinstance(shape, tuple):
        return [fn(n) for n in shape]
    return [_map_shape(s, fn) for s in shape]


@dataclass(frozen=True)
class Propagation:
    """What the propagation pass hands to grouping (:func:`~mudsc_graph.analysis.grouping.build_spec`).

    ``spaces``: the space table (grouping closes it and may fix spaces in it); ``attr_spaces``:
    ``(parameter or buffer, axis) -> space``; ``attr_shapes``: their shapes (canonical names);
    ``inner_params``: grouped-convolution weight axes ``(name, axis) -> (space, groups)``;
    ``internal_probes``: ``(node, key, handler, layout)`` of units inside ops; ``consumed``: the
    ``(name, axis)`` that are summed over; ``aliases`` / ``canonical``: tied names; ``frozen``:
    tensors not in the state_dict; ``buffer_names``: every name of a buffer; ``modules``: the
    graph's modules by path; ``warnings``: what the pass fixed and why; ``stale``: nodes whose value
    is written in place after it is computed (directly or through a view), which no probe may read.
    """

    graph: nx.DiGraph
    spaces: SpaceTable
    attr_spaces: Mapping[tuple[str, int], int]
    attr_shapes: Mapping[str, tuple[int, ...]]
    inner_params: Mapping[tuple[str, int], tuple[int, int]]
    internal_probes: tuple[tuple[str, str, str, Layout], ...]
    consumed: frozenset[tuple[str, int]]
    aliases: Mapping[str, str]
    canonical: Mapping[str, str]
    frozen: frozenset[str]
    buffer_names: frozenset[str]
    modules: Mapping[str, Any]
    warnings: tuple[str, ...]
    stale: frozenset[str] = frozenset()


class Propagator:
    """Runs the layer handlers over the IR and owns the :class:`SpaceTable`."""

    def __init__(
        self,
        graph: nx.DiGraph,
        registry: Registry,
        *,
        strict: bool = False,
        model: torch.nn.Module | None = None,
        samples: Samples | None = None,
    ) -> None:
        self.graph = graph
        self.samples = samples  # example values for the equivariance probe (None: no probe)
        self.probed: list[str] = []  # nodes the probe explained
        self.gm: fx.GraphModule = graph.graph["module"]
        self.registry = registry
        self.strict = strict
        self.spaces = SpaceTable()
        self.prober = Prober(self.spaces.find, lambda s: not self.spaces.settled(s), lambda s: self.spaces.size[self.spaces.find(s)])
        self.values: dict[str, Any] = {}
        self.attr_spaces: dict[tuple[str, int], int] = {}
        self.attr_shapes: dict[str, tuple[int, ...]] = {}
        self.inner_params: dict[tuple[str, int], tuple[int, int]] = {}
        self.internal_probes: list[tuple[str, str, str, Layout]] = []
        self.constant: set[str] = set()  # nodes computed from parameters alone (W, W.T, W * 2 ...)
        self.attr_of_space: dict[int, tuple[str, int]] = {}
        self.consumed: set[tuple[str, int]] = set()
        self.warnings: list[str] = []
        self.written: list[fx.Node] = []  # tensors written in place (the first argument of add_, copy_ ...)
        self.opaque_modules: list[str] = []  # leaf modules no handler describes (unsupported or probed)
        self.modules = dict(self.gm.named_modules())
        # one canonical name per tensor: a tied weight (GPT-2's lm_head = wte) is one tensor whose
        # axes join every space it is used in
        self.canonical: dict[str, str] = {}
        first: dict[int, str] = {}
        self.integral: set[str] = set()  # integer and boolean tensors: never in a free group
        for name, t in list(self.gm.named_parameters(remove_duplicate=False)) + list(self.gm.named_buffers(remove_duplicate=False)):
            if not (t.is_floating_point() or t.is_complex()):
                self.integral.add(name)
            canon = first.setdefault(id(t), name)
            self.canonical[name] = canon
            if canon == name:
                self.attr_shapes[name] = tuple(t.shape)
        # with the user's model: its other names of a tensor the graph names once (a GraphModule from
        # torch.export keeps one name of a tied weight) become aliases, and attributes outside its
        # state_dict (non-persistent buffers such as RoPE's inv_freq, lifted constants) are frozen:
        # no permutation can move them
        self.aliases: dict[str, str] = {}
        self.frozen: set[str] = set()
        if model is not None:
            state = set(model.state_dict().keys())
            names: dict[int, list[str]] = {}
            for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
                names.setdefault(id(t), []).append(name)
            for tied in names.values():
                canon = next((self.canonical[n] for n in tied if n in self.canonical), None)
                for n in tied if canon is not None else ():
                    self.canonical.setdefault(n, canon)
                    if n != canon and n in state:
                        self.aliases[n] = canon
            named = set(self.aliases.values())  # a canonical name some state_dict alias stands for
            self.frozen = {n for n in self.attr_shapes if n not in state and n not in named}
            # tensors the graph does not hold at all (fx copies only what the trace reads): never read
            for name, t in model.state_dict(keep_vars=True).items():
                if name not in self.canonical and isinstance(t, torch.Tensor):
                    self.canonical[name] = name
                    self.attr_shapes[name] = tuple(t.shape)
        for n, canon in self.canonical.items():  # the graph's own duplicate names (fx shares the modules)
            if n != canon and (model is None or n in state):
                self.aliases.setdefault(n, canon)

    def attr_space(self, full_name: str, axis: int) -> int:
        full_name = self.canonical.get(full_name, full_name)
        shape = self.attr_shapes.get(full_name)
        if shape is None:
            raise AnalysisError(f"the model has no parameter or buffer named {full_name!r}")
        axis %= len(shape)
        key = (full_name, axis)
        sid = self.attr_spaces.get(key)
        if sid is None:
            if full_name in self.frozen:
                reason = f"{full_name} is not in the state_dict (a non-persistent buffer or constant), so it cannot be permuted"
            elif full_name in self.integral:
                reason = f"{full_name} holds integers (indices or a mask): its entries cannot be averaged across models"
            else:
                reason = None
            sid = self.spaces.new(shape[axis], reason)
            self.attr_spaces[key] = sid
            self.attr_of_space[sid] = key
        return sid

    def mark_consumed(self, layout: Layout) -> None:
        """Record the parameter axis behind ``layout`` (if any) as one that reads its units."""
        key = self.attr_of_space.get(layout) if isinstance(layout, int) else None
        if key is not None:
            self.consumed.add(key)

    def unread(self) -> list[str]:
        """State-dict tensors the traced forward never reads: no permutation of them can be checked
        on this graph (a call with other inputs, a mask given, may read them), so they stay fixed."""
        read = {name for name, _ in self.attr_spaces}
        return [name for name, shape in self.attr_shapes.items()
                if name not in read and name not in self.frozen and any(n > 1 for n in shape)]

    def result(self) -> Propagation:
        """The finished pass's products, for grouping (call after :meth:`run`)."""
        buffers = {name for name, _ in self.gm.named_buffers(remove_duplicate=False)}
        buffers |= {alias for alias, canon in self.aliases.items() if canon in buffers}
        notes = list(self.warnings)
        unread = self.unread()
        if unread:
            names = ", ".join(unread[:8]) + (f" and {len(unread) - 8} more" if len(unread) > 8 else "")
            notes.append(f"the traced forward never reads {names}: kept as they are; a call with other inputs may read them "
                         f"(give example inputs that use them, e.g. an optional mask, to merge them with the units they meet)")
            warnings.warn(notes[-1], stacklevel=2)
        return Propagation(
            self.graph, self.spaces, dict(self.attr_spaces), dict(self.attr_shapes), dict(self.inner_params),
            tuple(self.internal_probes), frozenset(self.consumed), dict(self.aliases), dict(self.canonical),
            frozenset(self.frozen), frozenset(buffers), self.modules, tuple(notes), _stale(self.written),
        )

    def run(self) -> None:
        for name, attrs in nodes_in_order(self.graph):
            node: fx.Node = attrs["fx"]
            try:
                self._visit(node, attrs)
            except UnsupportedOpError:
                raise
            except Exception as exc:  # a handler that cannot describe this node: fall back, never crash
                why = (
                    f"handler {attrs.get('handler')!r} linked mismatched sizes ({exc})"
                    if isinstance(exc, SizeMismatch)
                    else f"handler {attrs.get('handler')!r} failed ({type(exc).__name__}: {exc})"
                )
                if self.strict and not isinstance(exc, SizeMismatch):
                    raise AnalysisError(
                        f"propagation failed at node {name} ({attrs['op']} {_tname(attrs['target'])}"
                        f"{', module ' + attrs['path'] if attrs['path'] else ''}) in handler {attrs.get('handler')!r}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                ctx = OpContext(self, node)
                self.unsupported(ctx, why)
                if name in self.probed:  # a broken plugin must still hear of it
                    msg = f"{ctx._reason()}: {why}; its axes were measured instead (equivariance probe)"
                    self.warnings.append(msg)
                    warnings.warn(msg, stacklevel=2)
                self.values[name] = _as_values(ctx._output, attrs["shape"])
            attrs["value"] = self.values.get(name)

    def _visit(self, node: fx.Node, attrs: dict) -> None:
        shape = attrs["shape"]
        inputs = node.all_input_nodes
        if node.op == "get_attr" or (node.op.startswith("call_") and inputs and all(n.name in self.constant for n in inputs)):
            self.constant.add(node.name)
        if node.op == "placeholder":
            attrs["handler"] = "input"
            self.values[node.name] = _as_values(
                _map_shape(shape, lambda n: self.spaces.new(n, f"model input {node.name}")), shape
            )
            return
        if node.op == "output":
            attrs["handler"] = "output"
            ctx = OpContext(self, node)
            for v in ctx.tensor_inputs():
                for L in v.layout:
                    self.spaces.fix_layout(L, "model output")
            return
        if node.op == "get_attr":
            attrs["handler"] = "get_attr"
            if not node.users:  # exported but never read: it must not become a free group (see unread())
                self.values[node.name] = None
                return
            target = self.canonical.get(str(node.target), str(node.target))
            if isinstance(shape, tuple) and (target.startswith(("_tensor_constant", "lifted_tensor", "c_lifted_tensor"))):
                # a tensor built inside forward (torch.tensor(...)) or lifted by torch.export: not in
                # the state_dict, so its values cannot move with a permutation; what it touches keeps its order
                self.values[node.name] = Value(shape, [self.spaces.new(n, f"constant tensor built in forward ({node.name})") for n in shape])
            elif isinstance(shape, tuple) and target in self.attr_shapes:
                self.values[node.name] = Value(shape, [self.attr_space(target, i) for i in range(len(shape))])
            else:
                self.values[node.name] = _as_values(_map_shape(shape, lambda n: self.spaces.new(n, "")), shape)
            return
        handler = self.registry.handler_for(node.op, attrs["target"])
        ctx = OpContext(self, node)
        if handler is None:
            attrs["handler"] = "unsupported"
            self.unsupported(ctx, "no layer handler is registered for it")
        else:
            attrs["handler"] = handler.name
            ctx.handler = handler
            handler.propagate(ctx)
            if not ctx._set:
                raise AnalysisError(f"layer handler {handler.name!r} did not call ctx.set_output() at node {node.name}")
        self.values[node.name] = _as_values(ctx._output, shape)
        written = _written(node)
        if written is not None:
            self.written.append(written)
            self._write(ctx, self.values.get(written.name), self.values[node.name])

    def _write(self, ctx: OpContext, dst: Any, out: Any) -> None:
        """An in-place op: ``dst`` (a view of some tensor: a slice of ``new_empty(...)`` that
        ``copy_`` fills) holds the op's output from now on, so whoever reads that tensor later reads
        these units: link them (a slice's spaces are pieces of its base's, so the base is linked too)."""
        if not isinstance(dst, Value):
            return
        if isinstance(out, Value) and out.shape == dst.shape:
            for a, b in zip(dst.layout, out.layout):
                self.spaces.link(a, b)
            return
        for L in dst.layout:
            self.spaces.fix_layout(L, "" if self.spaces.settled(L) else f"{ctx._reason()} (written in place, output of another shape)")

    def unsupported(self, ctx: OpContext, why: str) -> None:
        if self._probe(ctx, why):
            return
        reason = ctx._reason()
        touched = [L for v in ctx.tensor_inputs() for L in v.layout]
        if ctx.module is not None:
            prefix = f"{ctx.path}." if ctx.path else ""
            for pname, p in ctx.module.named_parameters():
                touched += [self.attr_space(prefix + pname, i) for i in range(p.dim())]
            for bname, b in ctx.module.named_buffers():
                touched += [self.attr_space(prefix + bname, i) for i in range(b.dim())]
        free = not all(self.spaces.settled(L) for L in touched)
        if free:
            msg = f"{reason}: {why}; the spaces it touches are kept as they are (not merged)"
            if self.strict:
                raise UnsupportedOpError(f"{msg}. Register a LayerHandler for it (hook mudsc_layer_handlers)")
            self.warnings.append(msg)
            if ctx.module is not None:
                self.opaque_modules.append(ctx.path)
            warnings.warn(msg, stacklevel=3)
        for L in touched:
            self.spaces.fix_layout(L, reason)
        ctx.set_output(ctx.fresh_output(reason if free else ""))

    def _probe(self, ctx: OpContext, why: str) -> bool:
        """Describe the node by measuring it (:mod:`.probe`); False when it cannot be measured (the
        caller then fixes what it touches: the fallback never fails because the probe did)."""
        try:
            return self._measure(ctx, why)
        except Exception:  # noqa: BLE001  a node the probe cannot run or describe is fixed instead
            return False

    def _measure(self, ctx: OpContext, why: str) -> bool:
        node = ctx.node
        if self.samples is None or node.op not in ("call_function", "call_method", "call_module"):
            return False
        out_shapes = _flat_shapes(ctx.out_shape)
        if not out_shapes or None in out_shapes:
            return False
        values = self.samples.inputs_of(node)
        if values is None:
            return False
        leaves, tree = pytree.tree_flatten((node.args, node.kwargs))
        concrete: list[Any] = []
        operands: list[Operand] = []
        for j, leaf in enumerate(leaves):
            if not isinstance(leaf, fx.Node):
                concrete.append(leaf)
                continue
            v, x = self.values.get(leaf.name), values.get(leaf.name)
            if isinstance(x, torch.Tensor) and isinstance(v, Value) and tuple(x.shape) == v.shape:
                operands.append(Operand(j, x, list(v.layout), leaf.name in self.constant))
            elif pytree.tree_any(lambda t: isinstance(t, torch.Tensor), x):
                return False  # tensors the probe cannot permute (a tuple passed whole)
            concrete.append(x)
        module, prefix = ctx.module, (f"{ctx.path}." if ctx.path else "")
        for pname, t in list(module.named_parameters()) + list(module.named_buffers()) if module is not None else ():
            operands.append(Operand(pname, t.detach(), [self.attr_space(prefix + pname, i) for i in range(t.dim())], True))

        def fn(xs: list[torch.Tensor]) -> list[torch.Tensor]:
            flat, state = list(concrete), {}
            for o, x in zip(operands, xs):
                if isinstance(o.leaf, int):
                    flat[o.leaf] = x
                else:
                    state[o.leaf] = x
            args, kwargs = pytree.tree_unflatten(flat, tree)
            if node.op == "call_function":
                out = node.target(*args, **kwargs)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = torch.func.functional_call(module, state, tuple(args), dict(kwargs), strict=False)
            return [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]

        target = type(module) if module is not None else node.target
        key = (node.op, target, str(tree), tuple(None if isinstance(c, torch.Tensor) else _hashable(c) for c in concrete))
        finding = self.prober.measure(fn, operands, out_shapes, key)
        if finding is None:
            return False
        self._apply(ctx, operands, finding, why)
        return True

    def _apply(self, ctx: OpContext, operands: list[Operand], finding: Any, why: str) -> None:
        """Link and fix what the probe measured (a warning names what it fixed); set the node's output."""
        reason = f"{ctx._reason()} ({why}; measured: its output depends on the order of these units)"
        fixing = [operands[i].layout[a] for i, a in finding.fixed if not self.spaces.settled(operands[i].layout[a])]
        if fixing:
            msg = f"{reason}: the spaces of {len(fixing)} input axes are kept as they are (not merged)"
            if self.strict:
                raise UnsupportedOpError(f"{msg}. Register a LayerHandler for it (hook mudsc_layer_handlers)")
            self.warnings.append(msg)
            warnings.warn(msg, stacklevel=4)
        for i, a in finding.fixed:
            L = operands[i].layout[a]
            ctx.fix(L, reason="" if self.spaces.settled(L) else reason)
        for group in finding.links:
            first = operands[group[0][0]].layout[group[0][1]]
            for i, a in group[1:]:
                self._join(first, operands[i].layout[a], finding.keep_blocks)
        for i, a in finding.reduced:  # a parameter axis summed over reads its units
            if operands[i].constant:
                ctx.reads(operands[i].layout[a])
        layouts = out_layouts(operands, finding.sources, finding.keep_blocks)
        out_shapes = _flat_shapes(ctx.out_shape)
        outs = []
        for o, (row, srcs) in enumerate(zip(layouts, finding.sources)):
            shape = out_shapes[o]
            out: list[Layout] = []
            for k, (L, ss) in enumerate(zip(row, srcs)):
                if L is None:  # new units: fixed, unless the output only repeats itself along them
                    out.append(ctx.new(shape[k]) if (o, k) in finding.copies else ctx.new_fixed(shape[k]))
                    continue
                if isinstance(L, Dep) and not finding.keep_blocks:
                    L = self.spaces.collapse(L)
                for i, a in ss[1:]:
                    self._join(L, operands[i].layout[a], finding.keep_blocks)
                out.append(L)
            outs.append(out)
        self.probed.append(ctx.node.name)
        if ctx.module is not None:  # measured from outside: torch.export may see through it (pipeline)
            self.opaque_modules.append(ctx.path)
        ctx.set_output(_nest(iter(outs), ctx.out_shape))


    def _join(self, a: Layout, b: Layout, blocks: bool) -> None:
        """Two measured layouts index the same units: block by block where the probe verified it, else whole."""
        if blocks and isinstance(a, Dep) and isinstance(b, Dep):
            self.spaces.link(Dep(0, a.parts), Dep(0, b.parts))
        else:
            self.spaces.link(self.spaces.collapse(a), self.spaces.collapse(b))


def _flat_shapes(shape: Any) -> list:
    """The tensor shapes of a (possibly nested) output shape, in order; ``None`` for a non-tensor."""
    if isinstance(shape, tuple) or shape is None:
        return [shape]
    return [s for x in shape for s in _flat_shapes(x)]


def _nest(layouts: Any, shape: Any) -> Any:
    """Flat per-tensor layouts back in the nesting of ``shape``."""
    if isinstance(shape, tuple):
        return next(layouts)
    return [_nest(layouts, x) for x in shape]


def _hashable(v: Any) -> Any:
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def _tname(t: Any) -> str:
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)
    return getattr(t, "__name__", None) or str(t)


def _as_values(layouts: Any, shape: Any) -> Any:
    if layouts is None or shape is None:
        return None
    if isinstance(shape, tuple):
        if isinstance(layouts, Value):
            return layouts
        if len(layouts) != len(shape):
            raise AnalysisError(f"output layout has {len(layouts)} axes but the output has shape {shape}")
        return Value(shape, list(layouts))
    return [_as_values(L, s) for L, s in zip(layouts, shape)]
