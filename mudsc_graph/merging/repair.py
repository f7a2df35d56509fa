"""REPAIR (Jordan et al., ICLR 2023): give every merged unit the statistics its parents had.

Averaging matched weights shrinks activations: two units that are only partly correlated average
to a unit of lower variance, and the loss compounds with depth ("variance collapse"). REPAIR
measures, for each repair point (the output channels of a layer), the mean and standard
deviation of every unit in each parent model, interpolates them with the merge (the matched
units' statistics averaged exactly as their biases are: ``mu* = sum_i M_i mu_i``,
``sigma* = sum_i M_i sigma_i``), and folds a per-channel affine correction into the merged layer:

    y' = (y - mu_m) * sigma* / sigma_m + mu*

where ``mu_m``, ``sigma_m`` are the merged model's own statistics on the same data.

Repair points: ``nn.Linear`` and ``nn.Conv{1,2,3}d`` (the weight's rows and the bias; without a
bias only the scale is repaired), and the affine of ``GroupNorm``, ``LayerNorm`` (one normalised
dimension) and, when BatchNorm statistics are not reset, ``BatchNorm`` - each where its output
channels carry a merged group. With ``reset_bn`` a BatchNorm renormalises its channels on the
same data, which is REPAIR for it (Jordan et al. make the same point), so BatchNorms are left to
the reset.

How the merged model's statistics are read. A correction changes the inputs of every layer after
it, so a layer must be measured with the layers before it already repaired. The first pass does
that in one go: each batch's output of a point is corrected as it flows on, from the merged
model's statistics on that batch to its parents' on the same batch (interpolated as above), so
later points see repaired inputs; afterwards each point's correction is folded from the whole
pass's statistics. A model whose statistics already are the targets is left exactly as it is (a
model merged with permuted copies of itself comes back), and with one batch the first pass is
exact. Further passes (at most ``PASSES`` in all) measure the folded model and fold again until no
correction moves a scale by more than ``TOL`` (or a mean by more than ``TOL`` target standard
deviations). With per-task data the parents' batches are not the merged model's, so the first
pass corrects each batch to the whole-data targets instead, as a BatchNorm in training mode does.

Per-task repair: the parents' statistics can each be read on the model's own data (a model
trained on task k, on task k's inputs), the merged model's on all of it (``repair_data``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..inputs import call
from ..spec.axes import Expr, has_group, ungroup
from ..spec.merge_spec import MergeSpec
from .distributed import all_sum_, together
from .assignment import Assignment
from .calibration import Calibration, CalibrationError
from .weights import apply_along

#: the variance floor of a unit, as BatchNorm's eps: a dead unit (constant output) keeps its scale
EPS = 1e-5
#: at most this many passes over the data, fewer once no correction moves by more than TOL
PASSES = 4
TOL = 1e-3


class RepairError(CalibrationError):
    """REPAIR could not read the statistics it needs (a model failed on a batch, non-finite values)."""


@dataclass(frozen=True)
class Point:
    """A layer whose output channels REPAIR corrects: its module path, the state keys of the
    weight and bias it folds into, where the channels are in its output, and the expression of
    the weight's axis 0 (which merged units the channels are)."""

    path: str
    weight: str
    bias: str | None
    channel_dim: int
    expr: Expr
    width: int


def _channel_dim(module: nn.Module, reset_bn: bool) -> int | None:
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return 1
    if isinstance(module, nn.GroupNorm) and module.affine:
        return 1
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine and len(module.normalized_shape) == 1:
        return -1
    if isinstance(module, _BatchNorm) and module.affine and not reset_bn:
        return 1
    return None


def assignments(matchings: Mapping[int, Any], n_models: int) -> set[int]:
    """The groups whose matching assigns every model unit to one merged unit (every built-in
    matcher's). A soft map (CCA's signed projections) mixes units, so a merged unit's statistics
    are not an interpolation of its parents' units' and REPAIR leaves its channels alone."""
    out = set()
    for gid, m in matchings.items():
        maps = [m.merge_map(i) for i in range(n_models)]
        if all(isinstance(a, Assignment) or Assignment.of(a) is not None for a in maps):
            out.add(gid)
    return out


def repair_points(model: nn.Module, spec: MergeSpec, matchings: Mapping[int, Any], *, reset_bn: bool,
                  within: set[str] | None = None, n_models: int = 2) -> list[Point]:
    """The repair points of ``model``: channels that carry a merged group, every merged group of
    them an assignment (:func:`assignments`); ``within``: only modules at these paths (a partial
    zip's trunk)."""
    live = set(matchings)
    sound = assignments(matchings, n_models)
    out = []
    for path, module in model.named_modules():
        dim = _channel_dim(module, reset_bn)
        if dim is None or (within is not None and path not in within):
            continue
        prefix = f"{path}." if path else ""
        exprs = spec.axes.get(prefix + "weight")
        if exprs is None or getattr(module, "weight", None) is None:
            continue
        expr = ungroup(exprs)[0][0]
        if not has_group(expr, lambda g: g in live) or has_group(expr, lambda g: g in live and g not in sound):
            continue
        bias = prefix + "bias" if getattr(module, "bias", None) is not None else None
        out.append(Point(path, prefix + "weight", bias, dim, expr, module.weight.shape[0]))
    return out


Moments = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # path -> (count, sum, sum of squares), float64


def _moments_of(y: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = y.detach().movedim(dim, -1).reshape(-1, y.shape[dim]).double()
    return torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), x.sum(0), (x * x).sum(0)


def _stats(m: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per channel; the variance is floored by ``EPS`` as in BatchNorm."""
    count, total, sq = m
    mean = total / count
    return mean, ((sq / count - mean * mean).clamp_min(0) + EPS).sqrt()


def _total(per_batch: Sequence[Moments]) -> Moments:
    out: dict[str, list[torch.Tensor]] = {}
    for moments in per_batch:
        for path, m in moments.items():
            if path in out:
                for acc, t in zip(out[path], m):
                    acc += t
            else:
                out[path] = [t.clone() for t in m]
    return {path: tuple(m) for path, m in out.items()}


def _pass(model: nn.Module, points: Sequence[Point], calib: Calibration, who: str,
          correct: Callable[[int, Point], tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[Moments]:
    """Each point's moments on each batch (a point whose module never ran has none). With
    ``correct`` (batch index, point) -> (target mean, target std), each output is also corrected
    from its statistics on the batch to that target as it flows on (scaled only, for a point
    without a bias, as its fold will be)."""
    modules = dict(model.named_modules())
    per_batch: list[Moments] = []

    def hook(point: Point) -> Callable:
        def fn(module: nn.Module, args: Any, y: Any) -> Any:
            if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[point.channel_dim] != point.width:
                return None
            m = _moments_of(y, point.channel_dim)
            per_batch[-1][point.path] = m if point.path not in per_batch[-1] else tuple(a + b for a, b in zip(per_batch[-1][point.path], m))
            if correct is None:
                return None
            mean, std = _stats(m)
            t_mean, t_std = correct(len(per_batch) - 1, point)
            shape = [1] * y.dim()
            shape[point.channel_dim] = -1
            scale = (t_std / std).to(y.dtype).reshape(shape)
            if point.bias is None:
                return y * scale
            return (y - mean.to(y.dtype).reshape(shape)) * scale + t_mean.to(y.dtype).reshape(shape)
        return fn

    handles = [modules[p.path].register_forward_hook(hook(p)) for p in points]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for k, inputs in calib.inputs():
                per_batch.append({})
                with calib.batch(k, inputs, "REPAIR", who, error=RepairError):
                    call(model, inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return per_batch


def _summed(points: Sequence[Point], per_batch: Sequence[Moments], who: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{path: (mean, std)}`` from this rank's moments, summed over the ranks of an initialised
    process group; a point that never ran (on any rank) is left out."""
    total = _total(per_batch)
    ran = torch.tensor([float(p.path in total) for p in points], dtype=torch.float64)
    all_sum_([ran])  # every rank then keeps the same points, and sums the same tensors
    kept = [p.path for p, r in zip(points, ran.tolist()) if r > 0]
    for p in points:
        if p.path in kept and p.path not in total:  # ran elsewhere, not on this rank's batches (or it has none)
            zero = torch.zeros(p.width, dtype=torch.float64)
            total[p.path] = (torch.zeros((), dtype=torch.float64), zero, zero.clone())
    all_sum_([t for path in kept for t in total[path]])
    stats = {path: _stats(total[path]) for path in kept}
    bad = [path for path, (mean, std) in stats.items() if not (torch.isfinite(mean).all() and torch.isfinite(std).all())]
    if bad:
        raise RepairError(f"REPAIR: {who} has non-finite outputs at {', '.join(bad[:3])}; check the models and the calibration data")
    return stats


@dataclass
class Parent:
    """One parent's statistics at the repair points: per batch (this rank's) and in all."""

    per_batch: list[Moments]
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]]


def measure(model: nn.Module, points: Sequence[Point], calib: Calibration, who: str) -> Parent:
    """A model's statistics at ``points`` over this rank's batches (summed over the ranks). A
    point whose module the forward never calls as a module (``nn.MultiheadAttention`` reads its
    ``out_proj`` weights directly) is left out of ``stats``."""
    per_batch = together(lambda: _pass(model, points, calib, who))
    return Parent(per_batch, _summed(points, per_batch, who))


def _merge_stats(p: Point, stats: Sequence[tuple[torch.Tensor, torch.Tensor]], matchings: Mapping[int, Any],
                 sizes: Mapping[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The parents' (mean, std) of one point merged as its bias is: ``sum_i M_i s_i`` (units of
    unmatched groups averaged)."""
    n = len(stats)
    out = []
    for which in (0, 1):
        total = None
        for i, s in enumerate(stats):
            def merge_of(gid: int, i: int = i) -> Any:
                m = matchings.get(gid)
                return None if m is None else m.merge_map(i)

            part = apply_along(s[which], 0, p.expr, merge_of, sizes, 1.0 / n)
            total = part if total is None else total + part
        out.append(total)
    return out[0], out[1]


def targets(points: Sequence[Point], parents: Sequence[Parent], matchings: Mapping[int, Any],
            sizes: Mapping[int, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each point's target (mean, std): its parents' interpolated with the merge."""
    return {p.path: _merge_stats(p, [q.stats[p.path] for q in parents], matchings, sizes) for p in points}


@torch.no_grad()
def fold(model: nn.Module, points: Sequence[Point], measured: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
         wanted: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Fold ``y' = (y - mean) * t_std / std + t_mean`` into each point's weight and bias (a point
    without a bias gets the scale only)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for p in points:
        mean, std = measured[p.path]
        t_mean, t_std = wanted[p.path]
        scale = t_std / std
        w = params[p.weight]
        w.mul_(scale.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1))))
        if p.bias is not None:
            b = params[p.bias]
            b.copy_(((b.double() - mean) * scale + t_mean).to(b.dtype))


def repair(merged: nn.Module, points: Sequence[Point], parents: Sequence[Parent], matchings: Mapping[int, Any],
           sizes: Mapping[int, int], calib: Calibration, *, same_batches: bool = True, passes: int | None = None, tol: float | None = None) -> float:
    """REPAIR ``merged`` in place (see the module docstring); ``parents``: each parent's
    :func:`measure` at ``points``, on ``calib``'s batches themselves when ``same_batches``. Returns the
    mean ratio, over points and channels, of the merged model's standard deviation to its target
    in the first pass (how much of its parents' variance the merge had lost)."""
    passes = PASSES if passes is None else passes
    tol = TOL if tol is None else tol
    wanted = targets(points, parents, matchings, sizes)

    def on_batch(k: int, p: Point) -> tuple[torch.Tensor, torch.Tensor]:
        if not same_batches:
            return wanted[p.path]
        return _merge_stats(p, [_stats(q.per_batch[k][p.path]) for q in parents], matchings, sizes)

    first = None
    for k in range(passes):
        correct = on_batch if k == 0 else None
        per_batch = together(lambda correct=correct: _pass(merged, points, calib, "the merged model", correct))
        measured = _summed(points, per_batch, "the merged model")
        if first is None:
            first = [float((measured[p.path][1] / wanted[p.path][1]).mean()) for p in points]
        fold(merged, points, measured, wanted)
        if k > 0 and all(_settled(measured[p.path], wanted[p.path], p.bias is not None, tol) for p in points):
            break
    return sum(first) / len(first) if first else 1.0


def _settled(measured: tuple[torch.Tensor, torch.Tensor], wanted: tuple[torch.Tensor, torch.Tensor], shifts: bool, tol: float) -> bool:
    (mean, std), (t_mean, t_std) = measured, wanted
    if float((t_std / std - 1).abs().max()) > tol:
        return False
    return not shifts or float(((mean - t_mean) / t_std).abs().max()) <= tol
