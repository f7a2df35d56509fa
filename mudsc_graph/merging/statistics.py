"""Activation statistics: streaming Pearson correlations of every group's units across N models.

For each non-fixed group the features of its probe point(s) are laid out as ``units x samples``
(batch, tokens and spatial positions are all samples; see :func:`group_features`), the N models'
features are stacked in model order into ``(N*units) x samples`` and folded into a
:class:`StackedMoments` (the mean and only the scatter blocks the matcher reads), group by group as
the N models run in step (:mod:`.lockstep`). Memory is O(sum over groups of (N*units)^2), never
O(samples). :class:`CorrelationAccumulator` is the same statistic for one stream of features (what
a plugin may use on its own data).

    >>> corr = activation_correlations(gms, spec, Calibration(loader, device="cuda"))
    >>> corr = activation_correlations(gm, spec, loader, states=[sd_a, sd_b])   # one graph, N weights
    >>> corr[gid].shape   # (N * spec.groups[gid].size,) * 2
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.fx as fx

from ..inputs import bind, call_graph
from ..spec.axes import Expr, Units, size, take, to_json
from .calibration import Calibration, CalibrationError
from .distributed import all_sum_, reduce_moments, together
from .lockstep import Stepper


#: Where a group's features are read: its last consumer, its first, or all of them.
PROBES = ("last", "first", "all")


class StatisticsError(CalibrationError):
    """No calibration data, a model failing on a batch, or features that are not finite (names the
    group and the node)."""


@runtime_checkable
class ActivationStatistics(Protocol):
    """What a matcher reads of the activation statistics (:class:`Correlations` is one): each
    group's ``(N*units) x (N*units)`` correlation, whether a read builds a new tensor (the reader
    may then change it in place), and the covariance where the units' scales are known."""

    def __getitem__(self, gid: int) -> torch.Tensor: ...

    def __contains__(self, gid: object) -> bool: ...

    def fresh(self, gid: int) -> bool: ...

    def covariance(self, gid: int) -> torch.Tensor | None: ...


class Correlations(Mapping):
    """``{group id: (N*units) x (N*units) Pearson correlation}``, as :func:`activation_correlations`
    returns it, with each group's per-unit standard deviations in ``stds`` (``{group id: (N*units,)}``,
    the square roots of the covariance's diagonal). ``corr[g] * outer(stds[g], stds[g])`` is the
    covariance (up to float rounding; 0 on rows and columns of dead units), which matchers that ask
    for covariances (``MatchingStrategy(needs_covariances=True)``) receive.

    Values are dense tensors or :class:`StackedMoments` (what :func:`activation_correlations`
    stores: only the model blocks it computed, the lower ones mirrored on access); ``corr[g]`` is
    always the dense matrix, built on access. ``within_model`` is ``False`` when only the blocks
    between model 0 and the others were computed (the within-model blocks read 0).
    """

    def __init__(self, data: Mapping[int, Any] | None = None, *, stds: Mapping[int, torch.Tensor] | None = None,
                 within_model: bool = True, samples: Mapping[int, int] | None = None) -> None:
        self._data: dict[int, Any] = dict(data or {})
        self.stds: dict[int, torch.Tensor] = dict(stds or {})
        self.within_model = within_model
        self.samples: dict[int, int] = dict(samples or {})  # feature columns each group's statistics saw

    def __getitem__(self, gid: int) -> torch.Tensor:
        v = self._data[gid]
        return v if isinstance(v, torch.Tensor) else v.dense()

    def __iter__(self) -> Iterator[int]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, gid: object) -> bool:  # without building the matrix
        return gid in self._data

    def fresh(self, gid: int) -> bool:
        """Whether ``self[gid]`` builds a new tensor on every access (the caller may change it in place)."""
        return not isinstance(self._data[gid], torch.Tensor)

    def covariance(self, gid: int) -> torch.Tensor | None:
        """Group ``gid``'s covariance, or ``None`` without its statistics."""
        if gid not in self or gid not in self.stds:
            return None
        s = self.stds[gid]
        return self[gid] * torch.outer(s, s)


class StackedMoments:
    """Streaming means and centred cross products of N models' features of one group, block by block.

    The ``(N*O) x (N*O)`` scatter matrix of the stacked features is symmetric and a permutation
    matcher reads only its blocks between model 0 and model j; so only the blocks ``(i, j)``,
    ``i <= j`` (``within_model=True``), or ``(0, j)`` and the per-unit variances
    (``within_model=False``) are accumulated, and a diagonal block wider than ``tile`` only on and
    above its diagonal, stored as row strips (strip ``a``: rows ``a:a+tile``, columns ``a:``): for
    two ViT-B/16 MLP groups 55 % (zip) or 25 % (align) of the full product's multiply-adds and
    memory. Each batch is centred on its own mean and merged with Chan et al.'s parallel update,
    as :class:`CorrelationAccumulator`. :meth:`finish` turns the stored entries into Pearson
    correlations in place (same conventions as :meth:`CorrelationAccumulator.correlation`);
    :meth:`dense` mirrors them into the full matrix.
    """

    def __init__(self, n_models: int, units: int, device: Any = None, *, within_model: bool = True, tile: int = 1024) -> None:
        self.n, self.units, self.within_model, self.tile = n_models, units, within_model, tile
        self.count = 0
        self.mean = torch.zeros(n_models * units, dtype=torch.float32, device=device)
        self.sq = torch.zeros(n_models * units if not within_model else 0, dtype=torch.float32, device=device)
        pairs = [(i, j) for i in range(n_models) for j in range(i, n_models)] if within_model else [(0, j) for j in range(1, n_models)]
        self.pieces: dict[tuple[int, int], list[tuple[slice, slice, torch.Tensor]]] = {}
        for i, j in pairs:  # (rows, columns within the block, stored tensor)
            spans = [(slice(a, min(a + tile, units)), slice(a, units)) for a in range(0, units, tile)] if i == j and units > tile \
                else [(slice(0, units), slice(0, units))]
            self.pieces[(i, j)] = [(r, c, torch.zeros(r.stop - r.start, c.stop - c.start, dtype=torch.float32, device=device)) for r, c in spans]
        self.finished = False

    def rows(self, i: int) -> slice:
        """Model ``i``'s rows of the stacked units."""
        return slice(i * self.units, (i + 1) * self.units)

    def tensors(self) -> list[torch.Tensor]:
        """Every stored tensor of the scatter (what the ranks sum)."""
        return [t for ps in self.pieces.values() for _, _, t in ps] + ([self.sq] if self.sq.numel() else [])

    def _outer_(self, delta: torch.Tensor, alpha: float) -> None:
        """``scatter += alpha * delta delta^T`` on the stored entries."""
        for (i, j), ps in self.pieces.items():
            di, dj = delta[self.rows(i)], delta[self.rows(j)]
            for r, c, t in ps:
                t.addr_(di[r], dj[c], alpha=alpha)

    def recentre(self, mean: torch.Tensor, count: int) -> None:
        """Shift the scatter to ``mean`` (``count * delta delta^T``, Chan et al.) and take ``mean``
        as this accumulator's: what each rank does before the ranks' scatters are summed
        (:func:`~mudsc_graph.merging.distributed.reduce_moments`)."""
        delta = self.mean - mean
        self._outer_(delta, float(self.count))
        if self.sq.numel():
            self.sq.addcmul_(delta, delta, value=float(self.count))
        self.mean.copy_(mean)
        self.count = count

    def update(self, feats: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
        """Add the columns of ``feats`` (``(N*units) x samples``, models stacked) as samples; returns
        whether every feature was finite (a 0-d bool tensor: a NaN or inf makes its row's mean one).
        ``in_place=True`` centres ``feats`` itself (a buffer of the caller's that it no longer needs)."""
        nb = feats.shape[1]
        if nb == 0:
            return torch.ones((), dtype=torch.bool, device=self.mean.device)
        x = feats.to(device=self.mean.device, dtype=torch.float32)
        mb = x.mean(dim=1)
        xc = x.sub_(mb[:, None]) if in_place and x is feats else x - mb[:, None]
        na, n = self.count, self.count + nb
        delta = mb - self.mean
        for (i, j), ps in self.pieces.items():
            xi, xj = xc[self.rows(i)], xc[self.rows(j)]
            for r, c, t in ps:
                t.addmm_(xi[r], xj[c].T)
        if na:
            self._outer_(delta, na * nb / n)
        if not self.within_model:  # no diagonal blocks to read the variances from
            for r in range(0, xc.shape[0], 64):  # by rows: small temporaries, the same sums
                self.sq[r:r + 64].add_((xc[r:r + 64] * xc[r:r + 64]).sum(dim=1))
            if na:
                self.sq.addcmul_(delta, delta, value=na * nb / n)
        self.mean.add_(delta, alpha=nb / n)
        self.count = n
        return torch.isfinite(mb).all()

    def _variances(self) -> torch.Tensor:
        """Centred sums of squares of every stacked unit."""
        if not self.within_model:
            return self.sq
        return torch.cat([t[:, : r.stop - r.start].diagonal() for i in range(self.n) for r, _, t in self.pieces[(i, i)]])

    def std(self) -> torch.Tensor:
        """Per-unit standard deviation (the square root of the covariance's diagonal)."""
        return (self._variances() / max(self.count - 1, 1)).clamp(min=0).sqrt()

    def finish(self, eps: float | None = None) -> "StackedMoments":
        """Stored entries -> Pearson correlations, in place; the same arithmetic as
        :meth:`CorrelationAccumulator.correlation` on each entry."""
        if self.count == 0:
            raise ValueError("StackedMoments: no samples")
        sigma = self.std()
        dead = sigma <= 1e-6 * self.mean.abs()
        for (i, j), ps in self.pieces.items():
            si, sj, di, dj = sigma[self.rows(i)], sigma[self.rows(j)], dead[self.rows(i)], dead[self.rows(j)]
            for r, c, t in ps:
                t.div_(max(self.count - 1, 1))
                _pearson_(t, si[r], sj[c], di[r], dj[c], eps)
        self.sigma, self.dead, self.finished = sigma, dead, True
        return self

    def dense(self) -> torch.Tensor:
        """The ``(N*units)^2`` correlation (blocks not computed read 0)."""
        if not self.finished:
            raise ValueError("StackedMoments.dense() before finish()")
        out = self.mean.new_zeros(self.n * self.units, self.n * self.units)
        for (i, j), ps in self.pieces.items():
            block, mirror = out[self.rows(i), self.rows(j)], out[self.rows(j), self.rows(i)]
            for r, c, t in ps:
                if i != j or len(ps) == 1:  # an off-diagonal block, or a diagonal one computed whole
                    block.copy_(t)
                    if i != j:
                        mirror.copy_(t.T)
                    continue
                w = r.stop - r.start  # a strip of a diagonal block: its first w columns are the diagonal tile
                block[r, r] = t[:, :w].triu() + t[:, :w].triu(1).T
                block[r, r.stop:] = t[:, w:]
                block[r.stop:, r] = t[:, w:].T
        equal_constants(out, self.dead, self.mean)
        out.fill_diagonal_(1.0)
        return out


class CorrelationAccumulator:
    """Streaming mean and scatter of a ``(units, samples)`` feature stream, in float32.

    Each batch is centred on its own mean and merged with Chan et al.'s parallel update, so large
    feature means (post-ReLU activations) cost no precision. State: ``mean`` (units), ``m2``
    (units x units, the centred sum of outer products) and ``count``; independent of samples.
    """

    def __init__(self, units: int, device: torch.device | str | None = None) -> None:
        self.units = units
        self.count = 0
        self.mean = torch.zeros(units, dtype=torch.float32, device=device)
        self.m2 = torch.zeros(units, units, dtype=torch.float32, device=device)

    def update(self, feats: torch.Tensor) -> None:
        """Add the columns of ``feats`` (``units x samples``, any dtype) as samples."""
        if feats.dim() != 2 or feats.shape[0] != self.units:
            raise ValueError(f"expected features of shape ({self.units}, samples), got {tuple(feats.shape)}")
        nb = feats.shape[1]
        if nb == 0:
            return
        x = feats.to(device=self.mean.device, dtype=torch.float32)
        mb = x.mean(dim=1)
        xc = x - mb[:, None]
        na, n = self.count, self.count + nb
        delta = mb - self.mean
        self.m2.addmm_(xc, xc.T)
        if na:
            self.m2.addr_(delta, delta, alpha=na * nb / n)
        self.mean.add_(delta, alpha=nb / n)
        self.count = n

    def state_numel(self) -> int:
        """Number of stored elements (for memory checks): units + units^2."""
        return self.mean.numel() + self.m2.numel()

    def covariance(self) -> torch.Tensor:
        """Sample covariance (divided by ``count - 1``, as :func:`torch.cov`)."""
        if self.count == 0:
            raise ValueError("CorrelationAccumulator: no samples")
        return self.m2 / max(self.count - 1, 1)

    def std(self) -> torch.Tensor:
        """Per-unit standard deviation (the square root of the covariance's diagonal)."""
        if self.count == 0:
            raise ValueError("CorrelationAccumulator: no samples")
        return (self.m2.diagonal() / max(self.count - 1, 1)).clamp(min=0).sqrt()

    def correlation(self, eps: float | None = None) -> torch.Tensor:
        """Pearson correlation, in [-1, 1], never NaN.

        A dead unit (zero variance, up to float32 rounding of its mean) correlates 0 with every
        live unit and 1 with every dead unit of the same constant value (itself included): two units
        that are constant and equal on the data are interchangeable, and matching a dead unit to
        a live one would feed its consumers features they never saw. ``eps=None`` (default) is exact Pearson for every other unit,
        so it does not depend on the features' scale; ``eps=1e-7`` reproduces the official
        ZipIt!/MuDSC ``cov / clamp(sigma sigma^T, eps)``, which shrinks the correlations of
        low-variance units (std below ~3e-4), so that even a permuted copy's partner is missed.
        """
        cov = self.covariance()
        sigma = cov.diagonal().clamp(min=0).sqrt()
        dead = sigma <= 1e-6 * self.mean.abs()
        corr = _pearson_(cov, sigma, sigma, dead, dead, eps)
        equal_constants(corr, dead, self.mean)
        corr.fill_diagonal_(1.0)
        return corr


def _pearson_(cov: torch.Tensor, sigma_rows: torch.Tensor, sigma_cols: torch.Tensor, dead_rows: torch.Tensor, dead_cols: torch.Tensor,
              eps: float | None) -> torch.Tensor:
    """A covariance block -> its Pearson correlations, in place: divided by the deviations' product
    (clamped at ``eps``, see :meth:`CorrelationAccumulator.correlation`), clipped to [-1, 1], rows
    and columns of dead units 0."""
    cov.div_(torch.outer(sigma_rows, sigma_cols).clamp(min=1e-30 if eps is None else eps))
    cov.clamp_(-1.0, 1.0)
    cov[dead_rows, :] = 0.0
    cov[:, dead_cols] = 0.0
    return cov


def equal_constants(corr: torch.Tensor, dead: torch.Tensor, mean: torch.Tensor) -> None:
    """Set the similarity of constant units with equal values to 1 (in place)."""
    if not bool(dead.any()):
        return
    idx = dead.nonzero().squeeze(1)
    m = mean[idx]
    scale = 1.0 + torch.maximum(m.abs()[:, None], m.abs()[None, :])
    corr[idx[:, None], idx[None, :]] = ((m[:, None] - m[None, :]).abs() <= 1e-6 * scale).to(corr.dtype)


# -- features of one group from one value ------------------------------------------------------------
def group_features(value: torch.Tensor, axis: int, expr: Expr, gid: int, sizes: dict[int, int]) -> torch.Tensor:
    """Group ``gid``'s units of ``value`` along ``axis`` (whose expression is ``expr``) as ``(units, samples)``.

    Every other axis (batch, tokens, spatial) becomes samples; fixed factors of a ``kron`` become
    samples too; several occurrences in a ``sum`` (fused qkv: Q and K rows) are concatenated as
    more samples. Raises :class:`ValueError` if the group does not occur in ``expr``.
    """
    n = value.shape[axis]
    if size(expr, sizes) != n:
        raise ValueError(f"axis {axis} has {n} positions but expression {to_json(expr)} spans {size(expr, sizes)}")
    x = value.movedim(axis, 0).reshape(n, -1)
    parts = [p.reshape(p.shape[0], -1) for p in take(x, expr, gid, sizes)]
    if not parts:
        raise ValueError(f"group {gid} does not occur in axis expression {to_json(expr)}")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# -- running the models --------------------------------------------------------------------------------
def probe_extractor(gm: fx.GraphModule, nodes: list[str], internal: dict[str, tuple[str, str, Callable]] | None = None) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s submodules and parameters that returns ``{node: value}``.

    ``internal`` adds features computed from a node's module and arguments (units inside a leaf,
    such as the query projection of ``nn.MultiheadAttention``): ``{output key: (node, key, fn)}``
    where ``fn(module, args, kwargs, key)`` is the layer handler's ``features``.
    Nothing after the last requested node is computed (dead code is eliminated).
    """
    internal = internal or {}
    wanted = set(nodes) | {node for node, _, _ in internal.values()}
    env: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph()
    by_name: dict[str, fx.Node] = {}
    # placeholders first (all of them, so the call signature is unchanged), then up to the last probe
    ordered = [n for n in gm.graph.nodes if n.op == "placeholder"] + [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    for node in ordered:
        if len(by_name) == len(wanted) and node.op != "placeholder":
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.name in wanted:
            by_name[node.name] = env[node]
    missing = wanted - set(by_name)
    if missing:
        raise ValueError(f"probe nodes not in the graph: {sorted(missing)[:5]}")
    outputs = {name: by_name[name] for name in nodes}
    for out_key, (name, key, fn) in internal.items():
        node = by_name[name]
        module = graph.get_attr(node.target) if node.op == "call_module" else None
        outputs[out_key] = graph.call_function(fn, (module, node.args, node.kwargs, key))
    graph.output(outputs)
    ext = fx.GraphModule(gm, graph, f"{type(gm).__name__}Probes")
    ext.graph.eliminate_dead_code()  # needs the owning module to judge call_module purity
    ext.recompile()
    ext.training = gm.training  # the submodules are shared; their own modes are left untouched
    return ext


def select_probes(group: Any, probe: str = "last") -> list[Any]:
    """The probes ``activation_correlations`` reads for ``group`` (see there)."""
    if probe not in PROBES:
        raise ValueError(f"probe must be 'last', 'first' or 'all', got {probe!r}")
    consumers = [p for p in group.probes if p.consumer]
    if not consumers:
        return group.probes[:1]
    if probe == "last":
        return consumers[-1:]
    if probe == "first":
        return consumers[:1]
    seen: set[tuple[str, int]] = set()
    return [p for p in consumers if (p.node, p.axis) not in seen and not seen.add((p.node, p.axis))]


@torch.no_grad()
def activation_correlations(
    gms: list[fx.GraphModule] | fx.GraphModule,
    spec: Any,
    data: Iterable | Calibration,
    *,
    states: list[Mapping[str, torch.Tensor]] | None = None,
    probe: str = "last",
    reporter: Any = None,
    eps: float | None = None,
    registry: Any = None,
    within_model: bool = True,
) -> "Correlations":
    """Pearson correlation ``(N*units) x (N*units)`` of every non-fixed group with probes.

    ``gms`` are the N models' GraphModules (same graph, own weights, already on ``device`` and in
    the wanted mode); or one GraphModule and ``states``, the N models' state dicts, which are
    swapped into it in turn (``torch.func.functional_call``), so one graph serves every model.
    Rows/columns are the models' units stacked in model order. ``probe``: ``"last"`` (the last
    consumer probe in graph order, as the official MuDSC code), ``"first"`` or ``"all"`` (every
    consumer probe, stacked as more samples); a group without consumer probes uses its first
    producer probe. One pass over ``data`` (batches, or a :class:`~.calibration.Calibration` that
    says how a batch gives the models' inputs and on which device they run: by default the models');
    ``reporter.advance()`` per batch. ``eps``: see :meth:`CorrelationAccumulator.correlation`
    (``1e-7``: the official formula).
    ``within_model=False`` computes only the blocks between model 0 and the others (what a
    permutation matcher reads): the within-model blocks read 0, and the pass costs a fraction of
    the full one (:class:`StackedMoments`).

    The result is a mapping (:class:`Correlations`) that also holds each group's per-unit standard
    deviations (``.stds``), so covariances can be recovered (``.covariance(gid)``). Under an
    initialised ``torch.distributed`` process group every rank passes its own batches and gets
    the statistics of all of them (:mod:`.distributed`).
    """
    if isinstance(gms, fx.GraphModule):
        gms = [gms]
    if not gms:
        raise ValueError("activation_correlations needs at least one model")
    if states is not None and len(gms) != 1:
        raise ValueError("with states=, pass a single GraphModule")
    calib = Calibration.of(data)
    if calib.device is None:
        p = next(iter(gms[0].parameters()), None)
        calib = dataclasses.replace(calib, device=p.device if p is not None else torch.device("cpu"))
    device = calib.device
    sizes = {g.id: g.size for g in spec.groups}
    plan = {g.id: select_probes(g, probe) for g in spec.groups if not g.fixed and g.probes}
    runs = _runs(gms, states, plan, registry)
    if not runs:
        return Correlations()
    accs = {gid: StackedMoments(len(runs), sizes[gid], device, within_model=within_model) for gid in plan}
    pass_ = _Pass(runs, plan, sizes, accs, calib, reporter)
    n_batches = together(pass_.over)
    counts = torch.tensor([float(n_batches)], dtype=torch.float64)
    all_sum_([counts])
    if counts.item() == 0:
        raise StatisticsError("no calibration batches: the data iterable was empty; pass at least one batch")
    reduce_moments(list(accs.values()))
    return Correlations(
        {gid: acc.finish(eps) for gid, acc in accs.items()}, stds={gid: acc.sigma for gid, acc in accs.items()},
        within_model=within_model, samples={gid: acc.count for gid, acc in accs.items()},
    )


def _runs(gms: list[fx.GraphModule], states: Any, plan: dict[int, list[Any]], registry: Any) -> list[tuple[fx.GraphModule, Any]]:
    """One ``(probe extractor, state dict or None)`` per model; empty without any probe."""
    nodes = list(dict.fromkeys(p.node for ps in plan.values() for p in ps if p.key is None))
    internal = {_out_key(p): (p.node, p.key, _features_fn(p, registry)) for ps in plan.values() for p in ps if p.key is not None}
    if not nodes and not internal:
        return []
    if states is None:
        return [(probe_extractor(gm, nodes, internal), None) for gm in gms]
    ext = probe_extractor(gms[0], nodes, internal)
    own = {n for n, _ in ext.named_parameters()} | {n for n, _ in ext.named_buffers()}  # one name per tied tensor
    return [(ext, {k: v for k, v in st.items() if k in own}) for st in states]


class _Pass:
    """One pass of the N models over the calibration batches, folding every group's features.

    The models run in step (:class:`~.lockstep.Stepper`): each group is folded as soon as its probes
    are computed in every model, and its values are then freed, so a batch never holds every probe
    value of every model at once."""

    def __init__(self, runs: list, plan: dict, sizes: dict, accs: dict, calib: Calibration, reporter: Any) -> None:
        self.runs, self.plan, self.sizes, self.accs = runs, plan, sizes, accs
        self.calib, self.device, self.reporter = calib, calib.device, reporter
        self.steppers = [Stepper(ext, state) for ext, state in runs]
        keys = {gid: [_out_key(p) for p in probes] for gid, probes in plan.items()}
        self.order = sorted(plan, key=lambda gid: self.steppers[0].ready(keys[gid]))  # stable: plan order on ties
        self.keys = keys
        last = {k: gid for gid in self.order for k in keys[gid]}  # the last group to read each probe
        self.done = {gid: [k for k in keys[gid] if last[k] == gid] for gid in self.order}  # values freed after folding gid
        self._scratch: torch.Tensor | None = None  # see stacked()

    def over(self) -> int:
        n_batches = 0
        for k, inputs in self.calib.inputs():
            self.fold(k, inputs)
            n_batches += 1
            if self.reporter is not None:
                self.reporter.advance(1)
        return n_batches

    def fold(self, k: int, inputs: Any) -> None:
        finite = []
        try:
            for s in self.steppers:
                s.start(inputs)
            for gid in self.order:
                for i, s in enumerate(self.steppers):
                    with self.running(k, inputs, f"model {i}"):
                        s.advance(s.ready(self.keys[gid]))
                with self.running(k, inputs, f"group {gid}'s features"):  # a probe value of another size than the spec's
                    features = self.stacked(gid, [s.values for s in self.steppers])
                finite.append(self.accs[gid].update(features, in_place=True))
                for key in self.done[gid]:
                    for s in self.steppers:
                        s.values.pop(key, None)
        finally:
            for s in self.steppers:
                s.finish()
        if finite and not bool(torch.stack(finite).all()):  # one device sync per batch
            outs = []
            for i, (ext, state) in enumerate(self.runs):  # again, whole, to say where
                with self.running(k, inputs, f"model {i}"):
                    outs.append(_run(ext, state, inputs))
            _check_finite([(self.features(out, gid, [p]), gid, p.node, i) for gid, probes in self.plan.items()
                           for p in probes for i, out in enumerate(outs)])
            raise StatisticsError("features too large for float32 statistics (their sums overflow); scale the inputs down")

    def running(self, k: int, inputs: Any, who: str) -> Any:
        """``who`` (a model, a group's features) is computed on batch ``k`` inside (the calibration's error path)."""
        return self.calib.batch(k, inputs, "activation statistics", who, error=StatisticsError, hint=(
            "; calibration batches must have the example inputs' shapes apart from the batch size (pad text to one length)"))

    def features(self, out: dict, gid: int, probes: list[Any]) -> torch.Tensor:
        """One model's ``(units, samples)`` features of group ``gid`` (its probes as more samples)."""
        per_probe = [group_features(p.read(out[_out_key(p)]), p.axis, p.expr, gid, self.sizes) for p in probes]
        return per_probe[0] if len(per_probe) == 1 else torch.cat(per_probe, dim=1)

    def stacked(self, gid: int, outs: list[dict]) -> torch.Tensor:
        """The N models' features of ``gid`` stacked, ``(N*units) x samples`` float32, in a buffer
        reused across groups and batches (fresh memory for every group costs page faults). A
        group that is a whole axis of one probe is copied there straight from the probe's value."""
        probes, units = self.plan[gid], self.sizes[gid]
        (p, *more) = probes
        whole = not more and isinstance(p.expr, Units) and p.expr.gid == gid and p.read(outs[0][_out_key(p)]).shape[p.axis] == units
        parts = [p.read(out[_out_key(p)]).movedim(p.axis, 0) if whole else self.features(out, gid, probes) for out in outs]
        buf = self._buffer(len(parts) * parts[0].numel()).view(len(parts) * units, parts[0].numel() // units)
        for i, part in enumerate(parts):
            buf[i * units:(i + 1) * units].view(part.shape).copy_(part)
        return buf

    def _buffer(self, numel: int) -> torch.Tensor:
        if self._scratch is None or self._scratch.numel() < numel:
            self._scratch = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._scratch[:numel]


def _run(ext: fx.GraphModule, state: Mapping[str, torch.Tensor] | None, inputs: Any) -> dict:
    """The probe values of one model on one batch."""
    if state is None:
        return call_graph(ext, inputs)
    return torch.func.functional_call(ext, state, tuple(bind(ext, inputs)))


def _check_finite(checks: list[tuple[torch.Tensor, int, str, int]]) -> None:
    """One device sync per batch: raise naming the first group and node with NaN/inf features."""
    if not checks:
        return
    ok = torch.stack([torch.isfinite(f).all() for f, *_ in checks])
    if bool(ok.all()):
        return
    _, gid, node, k = checks[int((~ok).nonzero()[0])]
    raise StatisticsError(
        f"non-finite features (NaN/inf) for group {gid} at node {node!r} of model {k}; check the model's weights and the calibration data"
    )


def _out_key(p: Any) -> str:
    return p.node if p.key is None else f"{p.node}:{p.key}"


def _features_fn(p: Any, registry: Any) -> Callable:
    """The ``features`` function of the layer handler that declared an internal probe."""
    from ..plugin.registry import get_registry

    registry = registry or get_registry()
    for h in registry.handlers.values():
        if h.name == p.handler and h.features is not None:
            return h.features
    raise StatisticsError(f"probe {p.node}:{p.key} needs the features of layer handler {p.handler!r}, which is not registered")
