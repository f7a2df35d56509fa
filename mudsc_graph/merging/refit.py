"""Least-squares refit: each merged layer's weights fitted, in closed form, to reproduce its parents.

Matching and averaging give every merged Linear/Conv weights that are the average of its parents'
matched weights; the merged layer then sees inputs that are neither parent's, and its outputs drift
from what its parents computed (the further from the input, the more). The refit (as PLeaS, Nasery
et al. 2025, and RegMean, Jin et al. 2023, do it without gradient steps) walks the merged model front
to back and, for each layer, solves

    W* = argmin_W  sum over the data ||W x_m - y*||^2 + lambda ||W - W_0||^2

where ``x_m`` is the layer's input in the merged model (with the layers before it already refit),
``y* = sum_i M_i y_i`` its parents' outputs mapped into the merged units as the merge maps their
weights (``M_i``: model i's merge map along the layer's output axis; unmatched outputs averaged), and
``W_0`` the merged weights (the ridge ``lambda = ridge * E||x||^2`` keeps a layer with few samples
for its inputs near them, and fades as the data grow). A bias is fitted as one more input column of
ones; a convolution's inputs are its unfolded patches. A model merged with permuted copies of itself
is left as it is (its merged weights already solve the system exactly).

One walk: the merged model and its N parents run in step over the calibration batches, node by node
(:class:`~.lockstep.Stepper`), each batch held where the walk is; each layer's Gram matrix and cross
moments are summed over the batches (and over the ranks of a process group), solved, and written
into the merged model before the walk goes on. The cost is one forward pass of each model plus
the Gram products (for a 3x3 convolution about nine of its forward passes: samples x (9 C_in)^2
against samples x 9 C_in x C_out); the memory, every batch's live activations at the walk's
position plus one layer's moments.

Refit points: ``nn.Linear`` and ``nn.Conv2d`` (one group, zero padding) that the forward calls once,
as a module (the fx tracer) or as ``aten.linear``/``aten.conv2d`` on the module's own weight (the
export tracer), whose samples are aligned across the models. Other layers keep their merged weights:
fused projections that are not modules (``nn.MultiheadAttention``'s ``in_proj``), grouped
convolutions, layers whose weight is tied to another module's (a language model's head and its
embedding: fitting one would change the other), and token-mixing layers, whose samples are the merged channels in each model's own
order (pairing a merged input with a parent's output there would pair different channels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..spec.axes import Expr, group_ids, ungroup
from ..spec.merge_spec import MergeSpec
from .calibration import Calibration, CalibrationError
from .distributed import all_sum_, together
from .lockstep import Stepper
from .statistics import probe_extractor
from .weights import apply_along

#: ``lambda = RIDGE * E||x||^2``: the default ridge toward the merged weights (see :func:`_solve`)
RIDGE = 0.1
_OPS = {"aten.linear.default": nn.Linear, "aten.conv2d.default": nn.Conv2d}


class RefitError(CalibrationError):
    """The refit could not read what it needs (a model failed on a batch, non-finite values)."""


@dataclass(frozen=True)
class Point:
    """A layer the refit fits: its module path, graph node, the node of its input, the state keys
    of its weight and bias, and the expression of its output axis (which merged units it computes)."""

    path: str
    node: str
    input: str
    weight: str
    bias: str | None
    out: Expr


@dataclass
class Fit:
    """What the refit did: per layer, the residual of the merged weights and of the refit ones,
    each relative to the targets' energy (``||X W^T - Y*||^2 / ||Y*||^2`` on the calibration data)."""

    paths: list[str]
    before: list[float]
    after: list[float]

    def mean(self) -> tuple[float, float]:
        n = max(len(self.paths), 1)
        return sum(self.before) / n, sum(self.after) / n


def _fittable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _layer_of(node: fx.Node, modules: Mapping[str, nn.Module]) -> str | None:
    """The module path of a Linear/Conv2d call: ``call_module`` on it, or its ATen op on its own weight."""
    if node.op == "call_module" and str(node.target) in modules:
        return str(node.target)
    if node.op == "call_function" and str(node.target) in _OPS and len(node.args) > 1:
        w = node.args[1]
        if isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target).endswith(".weight"):
            path = str(w.target)[: -len(".weight")]
            if isinstance(modules.get(path), _OPS[str(node.target)]):
                return path
    return None


def _samples_aligned(exprs: Sequence[Expr | None] | None, features: int, spec: MergeSpec) -> bool:
    """Whether every axis of a value but its ``features`` axis lays its positions out alike in every
    model: no free group on it (a token-mixing layer's samples are the channels, each model's in its
    own order, so its inputs and its parents' outputs would pair different channels)."""
    if exprs is None:
        return False
    features %= len(exprs)
    return all(a == features or (e is not None and not any(not spec.groups[g].fixed for g in group_ids(e)))
               for a, e in enumerate(exprs))


def _norm_by_batch(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """BatchNorm as in training mode (the batch's own statistics), without touching running statistics."""
    return F.batch_norm(x, None, None, weight, bias, training=True, momentum=0.0, eps=eps)


def norms_by_batch(ext: fx.GraphModule) -> fx.GraphModule:
    """``ext`` with every BatchNorm with running statistics (a module call, or ``aten.batch_norm``)
    normalising by each batch's own statistics, as the BatchNorm reset runs the model."""
    graph = ext.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(ext.get_submodule(str(node.target)), _BatchNorm):
            bn = ext.get_submodule(str(node.target))
            if not bn.track_running_stats:
                continue
            with graph.inserting_before(node):
                w = graph.get_attr(f"{node.target}.weight") if bn.affine else None
                b = graph.get_attr(f"{node.target}.bias") if bn.affine else None
                new = graph.call_function(_norm_by_batch, (node.args[0], w, b, bn.eps))
        elif node.op == "call_function" and str(node.target) == "aten.batch_norm.default" and len(node.args) > 7:
            with graph.inserting_before(node):
                new = graph.call_function(_norm_by_batch, (node.args[0], node.args[1], node.args[2], node.args[7]))
        else:
            continue
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    ext.recompile()
    return ext


def refit_points(gm: fx.GraphModule, model: nn.Module, spec: MergeSpec, value_axes: Mapping[str, Any], *,
                 within: set[str] | None = None) -> list[Point]:
    """The layers of ``model`` the refit fits, in graph order (see the module docstring); ``within``:
    only these module paths (a partial zip's trunk). ``value_axes``: each node's axis expressions
    (the analysis's); a layer whose inputs or outputs carry merged units on a sample axis (token
    mixing) keeps its merged weights."""
    names: dict[int, int] = {}  # a tensor's number of names: a weight tied to another module's (an LM head to
    for _, t in model.named_parameters(remove_duplicate=False):  # its embedding) is not the layer's alone to fit
        names[id(t)] = names.get(id(t), 0) + 1
    modules = {p: m for p, m in model.named_modules() if _fittable(m) and (within is None or p in within)
               and all(names.get(id(t), 1) == 1 for t in m.parameters(recurse=False))}
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        path = _layer_of(node, modules)
        if path is not None:
            calls.setdefault(path, []).append(node)
    out = []
    for path, nodes in calls.items():
        prefix = f"{path}." if path else ""
        exprs = spec.axes.get(prefix + "weight")
        x = nodes[0].args[0] if nodes[0].args else None
        if len(nodes) != 1 or exprs is None or not isinstance(x, fx.Node):
            continue  # called twice (shared weights), not in the spec, or an input that is not a tensor node
        channel = 1 if isinstance(modules[path], nn.Conv2d) else -1
        if not (_samples_aligned(value_axes.get(x.name), channel, spec) and _samples_aligned(value_axes.get(nodes[0].name), channel, spec)):
            continue
        bias = prefix + "bias" if getattr(modules[path], "bias", None) is not None else None
        out.append(Point(path, nodes[0].name, x.name, prefix + "weight", bias, ungroup(exprs)[0][0]))
    return out


def _rows(module: nn.Module, x: torch.Tensor, bias: bool) -> torch.Tensor:
    """The layer's inputs as ``(samples, features)`` float32 rows (a column of ones for the bias)."""
    if isinstance(module, nn.Conv2d):
        x = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        x = x.transpose(1, 2)
    x = x.reshape(-1, x.shape[-1]).float()
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if bias else x


def _outputs(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's outputs as ``(samples, channels)``."""
    if isinstance(module, nn.Conv2d):
        y = y.movedim(1, -1)
    return y.reshape(-1, y.shape[-1])


def _target(p: Point, ys: Sequence[torch.Tensor], matchings: Mapping[int, Any], sizes: Mapping[int, int]) -> torch.Tensor:
    """``sum_i M_i y_i``: the parents' outputs (``(samples, channels)``) mapped into the merged units."""
    total = None
    for i, y in enumerate(ys):
        def merge_of(gid: int, i: int = i) -> Any:
            m = matchings.get(gid)
            return None if m is None else m.merge_map(i)

        part = apply_along(y.float(), 1, p.out, merge_of, sizes, 1.0 / len(ys))
        total = part if total is None else total + part
    return total


def _solve(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float, samples: float) -> torch.Tensor:
    """``(G + lambda I)^-1 (C + lambda W_0^T)``, transposed: the refit weights ``(out, features)``;
    ``lambda = ridge * E||x||^2`` (the inputs' mean squared norm over the ``samples`` rows), so the
    ridge weighs like ``ridge * features / samples`` against the data: strong where a layer has few
    samples for its inputs, vanishing as the data grow."""
    lam = ridge * float(gram.diagonal().sum().clamp_min(1e-12)) / max(samples, 1.0)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, cross + lam * w0.T).T


@torch.no_grad()
def refit(merged: nn.Module, parents: Sequence[nn.Module], gm: fx.GraphModule, points: Sequence[Point],
          matchings: Mapping[int, Any], sizes: Mapping[int, int], calib: Calibration, *, ridge: float = RIDGE,
          batch_norms: bool = False, merged_gm: fx.GraphModule | None = None) -> Fit:
    """Refit ``merged`` in place at ``points`` (see the module docstring): ``gm`` is the models'
    traced graph, run with each model's weights; ``calib`` the calibration (this rank's batches).
    ``batch_norms``: the BatchNorm statistics are reset afterwards, so the walk runs every model's
    BatchNorms as the reset does (each batch normalised by its own statistics): a layer is fitted in
    the regime the reset's statistics describe, and a merge of permuted copies still comes back.
    ``merged_gm``: the graph the merged model runs as, when its sizes differ from its parents' (a
    width budget: :func:`~mudsc_graph.merging.widths.widened_graph`)."""
    fit = Fit([], [], [])
    if points:
        _Walk(merged, parents, gm, points, calib, batch_norms, merged_gm).run(lambda walk, p: _fit_point(walk, p, matchings, sizes, ridge, fit))
    return fit


class _Walk:
    """The merged model (read up to each layer's input) and its parents (up to each layer's output)
    run in step over every batch, held where the walk is."""

    def __init__(self, merged: nn.Module, parents: Sequence[nn.Module], gm: fx.GraphModule, points: Sequence[Point],
                 calib: Calibration, batch_norms: bool, merged_gm: fx.GraphModule | None = None) -> None:
        self.points, self.calib = list(points), calib
        self.state = dict(merged.state_dict())  # shares the parameters' storage: written in place, read by the walk
        self.modules = dict(merged.named_modules())
        runs = (_runs(merged_gm if merged_gm is not None else gm, [p.input for p in points], [self.state], batch_norms)
                + _runs(gm, [p.node for p in points], [dict(m.state_dict()) for m in parents], batch_norms))
        self.inputs = list(calib.inputs())
        self.steppers = [[Stepper(ext, st) for ext, st in runs] for _ in self.inputs]

    def run(self, at: Callable[["_Walk", Point], None]) -> None:
        """``at(walk, point)`` for every point in turn (together on every rank), each value freed after its last use."""
        last = {p.input: j for j, p in enumerate(self.points)}
        try:
            for (k, x), steppers in zip(self.inputs, self.steppers):
                for s in steppers:
                    s.start(x)
            for j, p in enumerate(self.points):
                together(lambda p=p: at(self, p))
                for merged, *parents in self.steppers:
                    for s in parents:
                        s.values.pop(p.node, None)
                    if last[p.input] == j:
                        merged.values.pop(p.input, None)
        finally:
            for steppers in self.steppers:
                for s in steppers:
                    s.finish()

    def batches(self, p: Point) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Per batch: the merged model's input of ``p`` and its parents' outputs of ``p``."""
        for (k, x), (merged, *parents) in zip(self.inputs, self.steppers):
            with self.calib.batch(k, x, "refit", "the merged model or a parent", error=RefitError):
                merged.advance(merged.ready([p.input]))
                for s in parents:
                    s.advance(s.ready([p.node]))
            yield merged.values[p.input], [s.values[p.node] for s in parents]


def _runs(gm: fx.GraphModule, nodes: list[str], states: list[dict[str, torch.Tensor]],
          batch_norms: bool) -> list[tuple[fx.GraphModule, dict]]:
    """One extractor of ``nodes`` (BatchNorms by batch with ``batch_norms``) and, per model, its
    state restricted to the extractor's tensors."""
    ext = probe_extractor(gm, list(dict.fromkeys(nodes)))
    if batch_norms:
        ext = norms_by_batch(ext)
    own = {n for n, _ in ext.named_parameters()} | {n for n, _ in ext.named_buffers()}
    return [(ext, {k: v for k, v in st.items() if k in own}) for st in states]


def _fit_point(walk: _Walk, p: Point, matchings: Mapping[int, Any], sizes: Mapping[int, int], ridge: float, fit: Fit) -> None:
    """Sum one layer's moments over the batches (and ranks), solve, write the weights."""
    module, state = walk.modules[p.path], walk.state
    w = state[p.weight]
    w0 = w.reshape(w.shape[0], -1).double()
    if p.bias is not None:
        w0 = torch.cat([w0, state[p.bias].double()[:, None]], dim=1)
    gram = w0.new_zeros(w0.shape[1], w0.shape[1])  # zeros where this rank has no batch: the others' sums
    cross = w0.new_zeros(w0.shape[1], w0.shape[0])
    energy_count = torch.zeros(2, dtype=torch.float64)  # the targets' energy, the samples
    for x, ys in walk.batches(p):
        xs = _rows(module, x, p.bias is not None)
        y = _target(p, [_outputs(module, y) for y in ys], matchings, sizes)
        gram += (xs.T @ xs).double()  # each batch's products in float32 (the cost: samples x features^2), summed in float64
        cross += (xs.T @ y).double()
        energy_count += torch.tensor([float(y.double().square().sum()), float(xs.shape[0])], dtype=torch.float64)
    all_sum_([gram, cross, energy_count])
    if not (torch.isfinite(gram).all() and torch.isfinite(cross).all()):
        raise RefitError(f"refit: non-finite inputs or targets at {p.path}; check the models and the calibration data")
    energy, samples = energy_count.tolist()
    new = _solve(gram, cross, w0, ridge, samples)
    scale = max(energy, 1e-30)
    fit.paths.append(p.path)
    fit.before.append(_residual(gram, cross, energy, w0) / scale)
    fit.after.append(_residual(gram, cross, energy, new) / scale)
    w.copy_(new[:, : w0.shape[1] - (p.bias is not None)].reshape(w.shape).to(w.dtype))
    if p.bias is not None:
        state[p.bias].copy_(new[:, -1].to(state[p.bias].dtype))


def _residual(gram: torch.Tensor, cross: torch.Tensor, energy: float, w: torch.Tensor) -> float:
    """``||X W^T - Y||^2`` from the moments: ``tr(W G W^T) - 2 tr(W C) + ||Y||^2``."""
    return max(float((w @ gram * w).sum() - 2 * (w * cross.T).sum() + energy), 0.0)
