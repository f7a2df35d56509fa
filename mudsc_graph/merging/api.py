"""``merge``: N models of one architecture -> one merged model, without training.

``prepare`` does the shared stages once for many merges (an alpha sweep); ``merge`` is one of each.

The stages, in order (each timed in ``MergeResult.timings``): check the models, reset the base
models' BatchNorm statistics, analyse the graph (merge groups), gather activation correlations,
match (the iterative dual-space scheme), form the merged weights, build the merged module (partial
zip when ``stop_at`` is given) and reset its BatchNorm statistics.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..analysis.pipeline import analyze_full
from ..analysis.trace import trace
from ..errors import SpecCheckError
from ..inputs import as_inputs, take_rows, to_device
from ..checks import first_non_finite
from ..plugin.registry import Registry, get_registry
from ..spec.axes import group_ids
from ..spec.merge_spec import MergeSpec
from ..spec.permute import set_mode
from .batchnorm import has_batchnorm, reset_bn_stats
from .matching import identity_matching
from .methods import ResolvedMethod, resolve_method
from .options import MergeError, MergeOptions, resolve_device
from .partial_zip import build_partial, stop_index
from .progress import NullReporter, Reporter
from .refit import Fit, refit, refit_points
from .repair import assignments, measure, repair, repair_points
from .solver import DualSpaceSolver, MatchOutcome
from .calibration import Calibration
from .distributed import reduce_batchnorm, together
from .statistics import Correlations, activation_correlations
from .weights import merge_state_dicts
from .depth import align_depths
from .hetero import Padding, pad, sizes_differ
from .widths import adopt_config, describe, expressible, target_units, widened, widened_config, width_of


@dataclass
class MergeResult:
    """What ``merge`` produced.

    ``model``: the merged module (with ``stop_at``: a module returning one output per model);
    ``spec``: the merge groups; ``matchings``: ``{group id: Matching}``; ``history``: the score
    of every sweep of the iterative scheme; ``timings``: seconds per stage; ``matcher_options``: the
    matcher's parameters as used (defaults included); ``repair_std_ratio``:
    with ``repair=True``, the merged model's standard deviation over its target before REPAIR's
    correction, averaged over the repaired channels (how much variance the merge had lost);
    ``refit``: with ``refit=True``, what the least-squares refit did (:class:`~.refit.Fit`: per
    layer, the residual against the parents' mapped outputs before and after, relative to their
    energy); ``widths``: with a width budget, ``{group id: merged units}`` of every group merged
    wider than one model (the merged model is built with these sizes); ``own_heads``: where each
    model's own layers start when their output layers differ (other label spaces; the merged model
    then returns one output per model), else ``None``; ``depth_alignment``: for models of different
    depths, the blocks each deeper model kept, ``{model: {chain: [block indices]}}``.
    """

    model: nn.Module
    spec: MergeSpec
    matchings: dict[int, Any]
    history: list[float]
    timings: dict[str, float] = field(default_factory=dict)
    method: str = "mudsc"
    mode: str = "zip"
    alpha: float = 0.5
    sweeps: int = 0
    repair_std_ratio: float | None = None
    weight_macs: float = 0.0
    matcher_options: dict[str, Any] = field(default_factory=dict)
    refit: Fit | None = None
    widths: dict[int, int] = field(default_factory=dict)
    own_heads: str | None = None
    depth_alignment: dict[int, dict[str, list[int]]] = field(default_factory=dict)


def chains_differ(models: list[nn.Module]) -> bool:
    """Whether the models' state dicts have other names (another depth: :mod:`.depth`)."""
    keys = set(models[0].state_dict())
    return any(set(m.state_dict()) != keys for m in models[1:])


def check_list(models: Any) -> None:
    """A list of at least two modules with values; else one clear error."""
    if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)):
        raise MergeError(f"pass the models as a list (merge([model_a, model_b], ...)), got {type(models).__name__}")
    if len(models) < 2:
        raise MergeError(f"merging needs at least 2 models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise MergeError(f"model {i} is a {type(m).__name__}, not a torch.nn.Module")
        meta = next((k for k, t in m.state_dict().items() if t.device.type == "meta"), None)
        if meta is not None:
            raise MergeError(f"model {i} has no values in {meta} (a tensor on the meta device); load its weights "
                             "(load_state_dict(..., assign=True) or to_empty() and a checkpoint) before merging")


def check_models(models: list[nn.Module]) -> None:
    """Same architecture (keys, and shapes up to sizes: :mod:`.hetero` merges models of different
    widths), finite weights: else one clear error."""
    check_list(models)
    ref = models[0].state_dict()
    for i, m in enumerate(models[1:], start=1):
        # exported GraphModules (ep.module()) get a class of their own each: same keys and shapes decide
        graph_modules = isinstance(m, torch.fx.GraphModule) and isinstance(models[0], torch.fx.GraphModule)
        if type(m) is not type(models[0]) and not graph_modules:
            raise MergeError(f"model {i} is a {type(m).__name__} but model 0 is a {type(models[0]).__name__}: models must share one architecture")
        sd = m.state_dict()
        missing, extra = [k for k in ref if k not in sd], [k for k in sd if k not in ref]
        if missing or extra:
            raise MergeError(
                f"model {i} does not have model 0's architecture: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for k, t in ref.items():
            if sd[k].dim() != t.dim():
                raise MergeError(f"model {i} has {k} of shape {tuple(sd[k].shape)} but model 0 has {tuple(t.shape)}")
        resized = any(tuple(sd[k].shape) != tuple(t.shape) for k, t in ref.items())
        differ = config_differences(getattr(models[0], "config", None), getattr(m, "config", None))
        if differ and not (resized and only_sizes(differ)):  # a size may differ with the tensors' shapes
            key, a, b = differ[0]
            raise MergeError(f"model {i}'s config differs from model 0's: {key} is {b!r}, not {a!r}; models computed differently "
                             "cannot be merged as one architecture")
    for i, m in enumerate(models):
        for k, t in m.state_dict().items():
            if torch.is_floating_point(t) and not torch.isfinite(t).all():
                raise MergeError(f"model {i} has non-finite values (NaN or inf) in {k}; fix the checkpoint before merging")


class Stages:
    """Named, timed stages of a merge: ``with stage("matching"): ...`` adds the block's seconds to
    ``seconds["matching"]`` (a stage run twice adds up), whatever the block raised."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def _self_check(spec: MergeSpec, model: nn.Module, example_inputs: Any) -> None:
    """One random valid permutation of every group must leave model 0's output unchanged, or
    nothing is merged: a merge never returns (and the CLI never writes) what the analysis's own
    self-check rejects (a plugin's handler that links too little, an op understood wrongly)."""
    low = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
    try:
        spec.check(model, example_inputs, trials=1, rtol=2e-2 if low else 1e-4)
    except SpecCheckError as exc:
        raise MergeError(f"the merge groups failed their self-check, so nothing was merged: {exc}") from None


#: Config fields that do not change what a model computes (names, versions, label names, output
#: switches, kernels chosen at run time).
_CONFIG_IGNORED = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype", "id2label", "label2id",
    "use_cache", "return_dict", "output_attentions", "output_hidden_states", "torchscript", "_commit_hash",
    "_attn_implementation", "_attn_implementation_internal", "_attn_implementation_autoset", "_experts_implementation",
    "_experts_implementation_internal", "tokenizer_class", "problem_type",
})


def config_differences(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """``(field, value in a, value in b)`` for every field of two Hugging Face configs (anything
    with ``to_dict()``) that changes what the model computes; empty when either has no config."""
    if not (hasattr(a, "to_dict") and hasattr(b, "to_dict")):
        return []
    da, db = a.to_dict(), b.to_dict()
    keys = sorted((set(da) | set(db)) - _CONFIG_IGNORED, key=str)
    return [(k, da.get(k), db.get(k)) for k in keys if da.get(k) != db.get(k)]


def only_sizes(differ: list[tuple[str, Any, Any]]) -> bool:
    """Whether every difference of :func:`config_differences` is between two integers (sizes, layer
    counts: models of other widths and depths, which :mod:`.hetero` and :mod:`.depth` merge)."""
    return all(isinstance(v, int) and not isinstance(v, bool) for _, *values in differ for v in values)


def _check_tuple_batch(model: nn.Module, batch: Any) -> None:
    """A tuple batch is read as ``(inputs, labels, ...)``: refuse it, saying how to pass several
    inputs, when the model's forward needs more than one positional input."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or isinstance(batch[0], Mapping):
        return  # (a dict of inputs, labels): every input is named
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.default is inspect.Parameter.empty and p.kind in positional]
    if len(names) > 1:
        keys = ", ".join(f"'{n}': ..." for n in names)
        raise MergeError(
            f"{type(model).__name__}.forward needs {len(names)} inputs ({', '.join(names)}) but a tuple batch is read as "
            f"(inputs, labels), so only its first element would be passed; give each batch as a dict keyed by forward's "
            f"parameter names ({{{keys}}}) or pass inputs_from_batch= (e.g. lambda batch: tuple(batch[:{len(names)}]))"
        )


def _working_copy(model: nn.Module, device: torch.device, reset_bn: bool) -> nn.Module:
    """The model a merge reads: a copy on ``device`` (the input is never modified), or the model
    itself when nothing would modify it (already on ``device``, in eval mode, no BatchNorm to
    reset), which saves one copy of every weight (0.35 GB per ViT-B/16)."""
    on_device = all(t.device == device for t in (*model.parameters(), *model.buffers()))
    if on_device and not any(m.training for m in model.modules()) and not (reset_bn and has_batchnorm(model)):
        return model
    return copy.deepcopy(model).to(device)


class PreparedMerge:
    """What every merge of the same models and data shares, done once: the checks, the BatchNorm
    reset of the base models, the graph analysis and (on first need) the activation correlations.

    ``prepare(...)`` builds one; each ``.merge(method=..., mode=..., alpha=...)`` then runs only the
    matching, forms the merged weights and resets the merged model's BatchNorm statistics, which is
    what an alpha sweep or a comparison of methods needs. ``timings`` holds the shared stages'
    seconds. The input models are not modified, and no merge modifies what is shared; a model
    already on the device and in eval mode (without BatchNorm to reset) is read, not copied, so
    changing its weights between ``.merge()`` calls changes what later merges see. ``options``
    and ``settings`` as in :func:`merge`; ``options`` is the default of every ``.merge()``, whose
    preparation fields (device, reset_bn, probe, tracer) cannot change afterwards.
    """

    def __init__(
        self,
        models: list[nn.Module],
        *,
        data: Iterable | None,
        example_inputs: Any = None,
        options: MergeOptions | None = None,
        registry: Registry | None = None,
        reporter: Reporter | None = None,
        inputs_from_batch: Callable[[Any], Any] | None = None,
        repair_data: Sequence[Iterable] | None = None,
        **settings: Any,
    ) -> None:
        self.options = opts = MergeOptions.of(options, **settings)
        self.timings: dict[str, float] = {}
        self.reporter = reporter or NullReporter()
        self.registry = registry or get_registry()
        reset_bn = opts.reset_bn
        stage = Stages(self.timings)

        with stage("check"):
            example_inputs = self._check(models, data, example_inputs, inputs_from_batch, repair_data)
        with stage("bn_reset_bases"):
            if reset_bn and self.calib is not None:
                for m in self.models:  # leaves each model in eval mode, as it was
                    self._reset_bn(m)
        with stage("analysis"):  # with its self-check
            self._analyse(example_inputs)
        self._act: Correlations | None = None

    def _check(self, models: list[nn.Module], data: Iterable | None, example_inputs: Any, inputs_from_batch: Any,
               repair_data: Sequence[Iterable] | None) -> Any:
        """The models and data checked, working copies on the device, the calibration (this rank's
        batches: under torch.distributed each rank passes its share and the sums are all-reduced);
        the example inputs."""
        opts, reset_bn = self.options, self.options.reset_bn
        check_list(models)
        self.device = dev = resolve_device(opts.device, models[0])
        whole = Calibration.read(data, inputs_from_batch, dev)
        self.depth_alignment: dict[int, dict[str, list[int]]] = {}
        if chains_differ(models):  # models of different depths: the deeper ones cut to the shallowest's (depth.py)
            work = [copy.deepcopy(m).to(dev).eval() for m in models]
            batches = [x for _, x in whole.inputs()] if whole is not None else None
            models, self.depth_alignment = align_depths(work, batches, opts.depth_alignment)
            said = "; ".join(f"model {i} keeps {path} blocks {kept}" for i, chains_ in self.depth_alignment.items()
                             for path, kept in chains_.items())
            warnings.warn(f"models of different depths: {said} (depth_alignment=, --depth-alignment, sets them)", stacklevel=4)
        elif opts.depth_alignment:
            raise MergeError("depth_alignment= was given, but the models have the same depth")
        check_models(models)
        if whole is not None and not len(whole):
            raise MergeError("the calibration data is empty: give at least one batch")
        if whole is None and reset_bn and has_batchnorm(models[0]):
            raise MergeError("resetting BatchNorm statistics (reset_bn=True) needs calibration data: pass data=")
        self.calib = whole.shard() if whole is not None and opts.shard_data else whole
        self.task_calibs = self._repair_data(repair_data, len(models), inputs_from_batch, opts.shard_data)
        self._parents: dict[tuple[str, ...], list] = {}
        self.models = [_working_copy(m, dev, reset_bn) for m in models]
        for m in self.models:
            set_mode(m, False)
        if example_inputs is None:
            if whole is None:
                raise MergeError("pass example_inputs= (or data=) so the model can be traced")
            if inputs_from_batch is None:
                _check_tuple_batch(models[0], whole.batches[0])
            example_inputs = take_rows(next(whole.inputs())[1], 2)  # tracing needs only shapes
        self.example_inputs = to_device(as_inputs(example_inputs), dev)
        self._expressible: dict[tuple, tuple[dict[int, int], dict[int, str]]] = {}
        self.padding: Padding | None = None
        if sizes_differ(self.models):  # models of different widths: each padded to the widest (hetero.py)
            self.padding = pad(self.models, lambda m: analyze_full(m, self.example_inputs, registry=self.registry,
                                                                   tracer=opts.tracer).spec)
            self.models = self.padding.models
        return self.example_inputs

    def _analyse(self, example_inputs: Any) -> None:
        """Model 0 analysed (the merge groups), self-checked; the groups the models agree on already."""
        self.reporter.start("tracing", total=1)
        self.analysis = analyze_full(self.models[0], example_inputs, registry=self.registry, tracer=self.options.tracer)
        self.spec: MergeSpec = self.analysis.spec
        self.sizes = {g.id: g.size for g in self.spec.groups}
        self.reporter.advance(1)
        self.reporter.end()
        self.order = [(n, self.analysis.graph.nodes[n]["path"]) for n in self.analysis.graph.graph["order"]]
        self.anchored = _anchored_groups(self.spec, self.models)
        self.states = [dict(m.state_dict()) for m in self.models]
        _self_check(self.spec, self.models[0], example_inputs)

    def _repair_data(self, data: Sequence[Iterable] | None, n: int, inputs_from_batch: Any, shard_data: bool) -> list[Calibration] | None:
        """Per-task repair data: one calibration per model, read into memory (this rank's share)."""
        if data is None:
            return None
        if isinstance(data, (str, bytes)) or not hasattr(data, "__len__") or len(data) != n:
            raise MergeError(f"repair_data= must hold one calibration set per model ({n}), got {type(data).__name__}")
        sets = [Calibration.read(d, inputs_from_batch, self.device) for d in data]
        empty = [i for i, c in enumerate(sets) if not len(c)]
        if empty:
            raise MergeError(f"repair_data[{empty[0]}] is empty: give each model at least one batch")
        return [c.shard() if shard_data else c for c in sets]

    def _reset_bn(self, model: nn.Module) -> None:
        """Recompute ``model``'s BatchNorm statistics on this rank's batches, averaged over the ranks."""
        together(lambda: reset_bn_stats(model, self.calib))
        reduce_batchnorm(model, len(self.calib))

    def activations(self, within_model: bool = True) -> Correlations:
        """``{group id: (N*units) x (N*units) activation correlation}``, gathered on first call;
        ``within_model=False`` is enough for a permutation matcher (see
        :func:`~mudsc_graph.merging.statistics.activation_correlations`); a later call that needs the
        within-model blocks gathers them again."""
        if self._act is None or (within_model and not self._act.within_model):
            if self.calib is None:
                raise MergeError("activation similarities need calibration data: pass data=")
            self._act = None  # free the cross-only statistics before gathering the full ones
            self.timings.pop("statistics", None)
            with Stages(self.timings)("statistics"):
                self.reporter.start("statistics", total=len(self.calib))
                self._act = activation_correlations(
                    self.analysis.graph_module, self.spec, self.calib, states=self.states, probe=self.options.probe,
                    reporter=self.reporter, registry=self.registry, within_model=within_model,
                )
                self.reporter.end()
        return self._act

    def merge(self, options: MergeOptions | None = None, **changes: Any) -> MergeResult:
        """One merged model: ``options`` (default: the prepared ones) with ``changes``, as in
        :func:`merge`; ``timings`` covers this call's stages."""
        opts = MergeOptions.of(options or self.options, **changes)
        prepared = self.options.preparation()  # str(): device "cpu" and torch.device("cpu") are one device
        moved = [k for k, v in opts.preparation().items() if str(v) != str(prepared[k])]
        if moved:
            raise MergeError(f"{', '.join(moved)} cannot change after prepare(): prepare the merge again with the new value")
        resolved = resolve_method(self.registry, opts)
        if resolved.needs_activations and self.calib is None:
            raise MergeError(f"method {resolved.method.name!r} needs calibration data: pass data=")
        for flag in ("repair", "refit"):
            if getattr(opts, flag) and self.calib is None:
                raise MergeError(f"{flag}=True reads the models' outputs on calibration data: pass data=")
        timings: dict[str, float] = {}
        stage = Stages(timings)
        trunk = None
        if opts.stop_at is not None:
            k = stop_index(self.order, opts.stop_at)
            trunk = {name for name, _ in self.order[: k + 1]}
        given = trunk
        trunk = self._before_heads(trunk)
        own_heads = self._heads_start() if trunk is not given else None
        gids = self._groups(resolved, trunk)
        within = resolved.matcher.uses_within_model
        with stage("widths"):
            units = self._widths(resolved, opts, gids)
        act = self._activations_for(gids, timings, within) if resolved.needs_activations and gids else None

        with stage("matching"):
            outcome = self._match(resolved, opts, gids, act, units)
        matchings = outcome.matchings
        widths = {g: m.merged_units for g, m in matchings.items() if m.merged_units != self.sizes[g]}
        with stage("merge"):
            merged = self._merged_weights(matchings, widths)
        reset = opts.reset_bn and self.calib is not None and has_batchnorm(merged)
        fit = None
        with stage("refit"):
            if opts.refit:
                fit = self._refit(merged, matchings, trunk, reset, opts.refit_ridge, widths)
        std_ratio = None
        with stage("repair"):
            if opts.repair:
                std_ratio = self._repair(merged, matchings, trunk, reset)
        with stage("merge"):
            if trunk is not None:
                merged = self._partial(merged, matchings, trunk, widths)
            set_mode(merged, False)
        with stage("bn_reset_merged"):
            if reset:
                self._reset_bn(merged)
        bad = first_non_finite(merged.state_dict())
        if bad is not None:  # e.g. finite data so large that BatchNorm's statistics overflow
            raise MergeError(f"the merged model has non-finite values in {bad}; check the models and the calibration data")
        return MergeResult(merged, self.spec, matchings, outcome.history, timings, resolved.method.name, resolved.mode, resolved.alpha,
                           outcome.sweeps, std_ratio, outcome.weight_macs, dict(resolved.matcher_options), fit, widths, own_heads,
                           copy.deepcopy(self.depth_alignment))

    def _head_tensors(self) -> set[str]:
        """The tensors of the models' own output layers (other label spaces), which are not merged."""
        if self.padding is None or not self.padding.heads:
            return set()
        return {name for gid in self.padding.heads for name, _ in self.spec.groups[gid].members}

    def _before_heads(self, trunk: set[str] | None) -> set[str] | None:
        """With output layers of other label spaces, the trunk ends before the first node that reads
        one (each model keeps its own from there, with a warning); ``trunk`` (a stop point) must too."""
        if not self._head_tensors():
            return trunk
        first = self._heads_index()
        before = {name for name, _ in self.order[:first]}
        if trunk is not None and not trunk <= before:
            raise MergeError(f"stop_at: the models' output layers differ ({self._heads_text()}), so the merge must stop before "
                             f"{self._heads_start()}; choose an earlier stop point")
        if trunk is None:
            warnings.warn(f"the models' output layers differ ({self._heads_text()}): each keeps its own from "
                          f"{self._heads_start()} on (partial zip: one output per model)", stacklevel=4)
        return trunk if trunk is not None else before

    def _heads_index(self) -> int:
        """The first node (in execution order) that reads an output layer of another label space."""
        heads = self._head_tensors()
        return next(k for k, (name, _) in enumerate(self.order) if self.analysis.tensors_read_by({name}) & heads)

    def _heads_start(self) -> str:
        name, path = self.order[self._heads_index()]
        return path or name

    def _heads_text(self) -> str:
        gid, sizes = next(iter(self.padding.heads.items()))
        return f"{self.spec.groups[gid].members[0][0]} has {' and '.join(map(str, sizes))} units"

    def _widths(self, resolved: ResolvedMethod, opts: MergeOptions, gids: list[int]) -> dict[int, int]:
        """``{group id: merged units}`` of the width budget: the groups ``opts.width`` widens that the
        model's code can run with (the others stay at one model's width, with a warning)."""
        n = len(self.models)
        units = target_units(self.spec, gids, opts.width, n)
        if self.padding is not None:  # zip narrows to model 0's own width (times the width asked), align keeps the widest
            for gid in set(gids) & set(self.padding.copies):
                own = self.padding.units(gid)
                want = max(1, min(math.floor(width_of(self.spec, gid, opts.width) * own[0] + 0.5), sum(own)))
                units[gid] = want if resolved.matcher.unequal_widths else max(want, self.spec.groups[gid].size)
            units = {g: u for g, u in units.items() if u != self.spec.groups[g].size}
        if not units:
            return {}
        if not resolved.matcher.supports_width:
            raise MergeError(f"width={opts.width!r}: matcher {resolved.matcher.name!r} cannot merge wider than one model "
                             "(it takes no merged widths); use mode 'zip' or 'align', or width=1")
        if not resolved.matcher.unequal_widths and any(u < self.spec.groups[g].size for g, u in units.items()):
            raise MergeError(f"width={opts.width!r}: matcher {resolved.matcher.name!r} cannot merge narrower than one model "
                             "(a permutation keeps every unit); use mode 'zip' (zipit, mudsc), or a width of at least 1")
        key = tuple(sorted(units.items()))
        if key not in self._expressible:
            self._expressible[key] = expressible(self.models[0], self.spec, units, self.example_inputs)
        ok, refused = self._expressible[key]
        if refused:
            first = next(iter(refused.items()))
            warnings.warn(f"width: {len(refused)} groups stay at one model's width because the model cannot take them wider "
                          f"(group {first[0]}: {first[1]})", stacklevel=4)
        return ok

    def _merged_weights(self, matchings: dict[int, Any], widths: dict[int, int]) -> nn.Module:
        """A copy of model 0 holding the merged weights (rebuilt with the merged ``widths``)."""
        merged = copy.deepcopy(self.models[0])
        if widths:
            widened(merged, self.spec, widths)
            if hasattr(getattr(merged, "config", None), "to_dict"):
                config = widened_config(self.models[0], {k: tuple(v.shape) for k, v in merged.state_dict().items()})
                if config is None:
                    raise MergeError(f"width: the merged model's sizes ({describe(self.spec, widths)}) cannot be written in its "
                                     f"{type(merged.config).__name__} (one size per kind of layer); use one width for all "
                                     "groups, or width=1")
                adopt_config(merged, config)
        own = {**dict(merged.named_parameters(remove_duplicate=False)), **dict(merged.named_buffers(remove_duplicate=False))}
        keep = self._head_tensors()  # other label spaces: each model's own (the tails), model 0's left in place
        states = [{k: v for k, v in st.items() if k not in keep} for st in self.states] if keep else self.states
        if own.keys() >= self.states[0].keys():  # the model's own tensors, written in place one by one
            merge_state_dicts(self.spec, states, matchings, out=own)
        else:  # a state dict under other names than the tensors' (state-dict hooks): loaded as a whole
            merged.load_state_dict(merge_state_dicts(self.spec, states, matchings), strict=not keep)
        return merged

    def _groups(self, resolved: ResolvedMethod, trunk: set[str] | None) -> list[int]:
        """The groups this merge matches: free, not anchored, in the trunk; block groups only for a
        matcher that matches blocks (the others' are averaged in place, with a warning)."""
        spec = self.spec
        used = self.analysis.tensors_read_by(trunk) if trunk is not None else None  # partial zip: the trunk's groups only
        gids = [g.id for g in spec.free_groups() if g.id not in self.anchored
                and (used is None or any(name in used for name, _ in g.members))]
        blocked = [g for g in gids if spec.groups[g].blocks > 1]
        if blocked and not resolved.matcher.supports_blocks:
            warnings.warn(
                f"matcher {resolved.matcher.name!r} cannot match blocks: {len(blocked)} block groups (attention heads, GroupNorm "
                f"groups, grouped convolutions) are averaged in place, not matched",
                stacklevel=3,
            )
            gids = [g for g in gids if g not in blocked]
        return gids

    def _activations_for(self, gids: list[int], timings: dict[str, float], within_model: bool) -> Correlations:
        """The activation correlations (gathered on first need, then timed in ``timings``)."""
        before = self._act
        act = self.activations(within_model)
        if act is not before:
            timings["statistics"] = self.timings["statistics"]
        missing = [g for g in gids if g not in act]
        if missing:
            warnings.warn(
                f"groups {missing[:5]} have no activation probe (units inside a leaf module whose handler "
                "gives no features): they are matched by weights alone",
                stacklevel=4,
            )
        return act

    def _match(self, resolved: ResolvedMethod, opts: MergeOptions, gids: list[int], act: Any, units: dict[int, int]) -> MatchOutcome:
        """``{group id: Matching}``, the score of every sweep, the number of sweeps and their work."""
        spec, n, dev = self.spec, len(self.models), self.device
        matcher, alpha = resolved.matcher, resolved.alpha

        def identity(g: int) -> Any:
            return identity_matching(spec.groups[g].size, n, device=dev)

        if matcher.name == "identity":
            return MatchOutcome({g: identity(g) for g in gids})
        solver = DualSpaceSolver(
            spec, self.states, gids, matcher, act=act, alpha=alpha, options=resolved.matcher_options, reporter=self.reporter,
            threads=torch.get_num_threads() if matcher.thread_safe else 1, widths=units,
            copies=self.padding.copies if self.padding is not None and matcher.unequal_widths else None,
            own=frozenset(self._head_tensors()),
        )
        return solver.run(identity, max_iter=opts.max_iter, patience=opts.patience, seed=opts.seed)

    def _trunk_modules(self, merged: nn.Module, trunk: set[str] | None) -> set[str] | None:
        """The module paths of a partial zip's trunk (None: the whole model is merged)."""
        if trunk is None:
            return None
        paths = {path for name, path in self.order if name in trunk and path}
        return {p for p, _ in merged.named_modules() if any(p == t or p.startswith(t + ".") for t in paths)}

    def _refit(self, merged: nn.Module, matchings: dict[int, Any], trunk: set[str] | None, reset: bool, ridge: float,
               widths: dict[int, int]) -> Fit:
        """Refit ``merged``'s layers by least squares (:mod:`.refit`); with ``trunk``, its merged part
        only; ``reset``: its BatchNorm statistics are reset afterwards, so the walk normalises by
        batch, as the reset does."""
        gm = self.analysis.graph_module
        points = refit_points(gm, merged, self.spec, self.analysis.value_axes, within=self._trunk_modules(merged, trunk))
        if not points:
            warnings.warn("refit=True: no Linear or Conv2d layer the forward calls once as a module; the merge is unchanged",
                          stacklevel=3)
        return refit(merged, self.models, gm, points, matchings, self.sizes, self.calib, ridge=ridge, batch_norms=reset,
                     merged_gm=self._merged_graph(merged, widths))

    def _merged_graph(self, merged: nn.Module, widths: dict[int, int]) -> torch.fx.GraphModule:
        """The graph the merged model runs as: its parents' (model 0's), or with a width budget the
        merged model traced again (a graph may hold sizes as constants: heads in a reshape, GroupNorm's
        groups), node for node the same."""
        gm = self.analysis.graph_module
        if not widths:
            return gm
        again = trace(merged, self.example_inputs, leaf_types=self.registry.leaf_module_types(), tracer=gm.meta["mudsc_tracer"])
        if [n.name for n in again.graph.nodes] != [n.name for n in gm.graph.nodes]:
            raise MergeError("width: the merged model traces to another graph than its parents' (its code branches on its "
                             "sizes), so refit and partial zip cannot follow it; use width=1 with refit=True or stop_at")
        return again

    def _repair(self, merged: nn.Module, matchings: dict[int, Any], trunk: set[str] | None, reset: bool) -> float | None:
        """REPAIR ``merged`` in place (:mod:`.repair`); with ``trunk``, its merged part only; ``reset``:
        its BatchNorms are reset first. Returns the merged model's standard deviation over its target
        before the correction (None: nothing to repair)."""
        within = self._trunk_modules(merged, trunk)
        points = repair_points(merged, self.spec, matchings, reset_bn=reset, within=within, n_models=len(self.models))
        if reset:  # a layer whose outputs only a BatchNorm reads is renormalised by the reset: nothing to repair
            renormalised = self.analysis.read_only_by_batchnorm()
            points = [p for p in points if p.path not in renormalised]
        soft = set(matchings) - assignments(matchings, len(self.models))
        if soft:
            warnings.warn(f"repair=True: {len(soft)} groups have soft (not one-to-one) matchings, whose merged units mix "
                          "their parents' units; their channels are not repaired", stacklevel=3)
        if not points:
            warnings.warn("repair=True: no merged layer has channels to repair (no Linear, Conv or norm output carries "
                          "a merged group with a one-to-one matching, or the BatchNorm reset renormalises them all); "
                          "the merge is unchanged", stacklevel=3)
            return None
        if reset:  # REPAIR reads the merged model's outputs, behind BatchNorms that must be right first
            self._reset_bn(merged)
        key = tuple(p.path for p in points)
        if key not in self._parents:
            calibs = self.task_calibs or [self.calib] * len(self.models)
            self._parents[key] = [measure(m, points, c, f"model {i}") for i, (m, c) in enumerate(zip(self.models, calibs))]
        parents = self._parents[key]
        points = [p for p in points if all(p.path in q.stats for q in parents)]  # modules the forward calls
        return repair(merged, points, parents, matchings, self.sizes, self.calib, same_batches=self.task_calibs is None)

    def _partial(self, merged: nn.Module, matchings: dict[int, Any], trunk: set[str], widths: dict[int, int]) -> nn.Module:
        """The partial-zip module: ``merged``'s trunk, each model's own tail."""

        def unmerge_of(i: int, gid: int):
            m = matchings.get(gid)
            return None if m is None else m.unmerge_block(i)

        gm = self.analysis.graph_module
        trunk_gm = self._merged_graph(merged, widths)
        if self.analysis.tracer == "export":  # the graph reads the exported module's attributes: give it the weights
            trunk_module = trunk_gm if widths else with_state(gm, merged.state_dict())  # traced again: holds them
            tails = [with_state(gm, st) for st in self.states]
        else:
            trunk_module, tails = merged, self.models
        return build_partial(
            trunk_module, tails, gm.graph, trunk, lambda name: self.analysis.value_axes.get(name), unmerge_of, {**self.sizes, **widths},
            trunk_graph=trunk_gm.graph,
        ).to(self.device)


def with_state(gm: torch.fx.GraphModule, state: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """A copy of ``gm`` holding ``state``'s tensors under the names it has (tied names once)."""
    new = copy.deepcopy(gm)
    own = new.state_dict()
    new.load_state_dict({k: state[k] if k in state else v for k, v in own.items()})
    return new


def prepare(models: list[nn.Module], *, data: Iterable | None, **arguments: Any) -> PreparedMerge:
    """Do once what every merge of ``models`` on ``data`` shares; see :class:`PreparedMerge`.

        >>> prepared = prepare([a, b], data=batches)
        >>> results = {alpha: prepared.merge(method="mudsc", mode="zip", alpha=alpha) for alpha in (0.1, 0.5, 0.9)}

    ``arguments``: ``example_inputs``, ``options``, ``registry``, ``reporter``, ``inputs_from_batch``,
    ``repair_data`` and any :class:`MergeOptions` field (as in :func:`merge`).
    """
    return PreparedMerge(models, data=data, **arguments)


def merge(
    models: list[nn.Module],
    *,
    data: Iterable | None,
    example_inputs: Any = None,
    options: MergeOptions | None = None,
    registry: Registry | None = None,
    reporter: Reporter | None = None,
    inputs_from_batch: Callable[[Any], Any] | None = None,
    repair_data: Sequence[Iterable] | None = None,
    **settings: Any,
) -> MergeResult:
    """Merge ``models`` (same architecture, any number >= 2) into one, without training.

    How to merge is a :class:`~mudsc_graph.MergeOptions` (``options``) with ``settings`` (its
    fields as keywords: ``method``, ``mode``, ``alpha``, ``stop_at``, ``seed``, ``max_iter``,
    ``patience``, ``matcher_options``, ``repair``, ``device``, ``reset_bn``, ``probe``, ``tracer``) on top:
    ``merge(models, data=d, method="mudsc", mode="align", alpha=0.3)``. ``data``: an iterable of
    calibration batches (read into memory once), needed for activation similarities and BatchNorm
    resets. With ``stop_at`` each model keeps its own tail after that module (the result returns
    one output per model). The input models are not modified; the merged model is a copy of the
    first, of its class (a Hugging Face model stays one).

    Inputs are given as users give them: ``example_inputs`` and each batch's model inputs (through
    ``inputs_from_batch``, by default the first element of a ``(x, y)`` batch or a dict batch of
    keyword tensors such as ``{"input_ids": ..., "attention_mask": ...}``) are a tuple of positional
    tensors or a dict of keyword tensors. ``registry``: the plugins (default: the installed ones);
    ``reporter``: progress (:mod:`.progress`). ``repair_data``: with ``repair=True``, one calibration
    set per model, on which that model's statistics are read (per-task repair: each parent on its
    own task's data); the merged model's are read on ``data``.

    Several merges of the same models and data (an alpha sweep, a comparison of methods) share
    most of the work through :func:`prepare`.
    """
    opts = MergeOptions.of(options, **settings)
    registry = registry or get_registry()
    if data is None and resolve_method(registry, opts).needs_activations:
        raise MergeError(f"method {opts.method!r} needs calibration data: pass data=")
    prepared = PreparedMerge(
        models, data=data, example_inputs=example_inputs, options=opts, registry=registry, reporter=reporter,
        inputs_from_batch=inputs_from_batch, repair_data=repair_data,
    )
    result = prepared.merge()
    result.timings = {**prepared.timings, "statistics": 0.0, **result.timings}
    return result


def _anchored_groups(spec: MergeSpec, models: list[nn.Module]) -> set[int]:
    """Groups tied to a buffer that every model shares, value for value (a fixed class-embedding
    head): the models already agree on those units, so they are averaged in place, not matched.

    BatchNorm statistics and constant buffers are not anchors (fresh models share them by chance).
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    stats = {f"{name}.{b}" if name else b for name, m in models[0].named_modules() if isinstance(m, _BatchNorm) for b, _ in m.named_buffers(recurse=False)}
    buffers = [dict(m.named_buffers()) for m in models]
    out: set[int] = set()
    for name in spec.buffers:
        if name in stats or name not in buffers[0]:
            continue
        t = buffers[0][name]
        if t.dim() == 0 or not t.is_floating_point() or t.numel() < 2 or bool((t == t.flatten()[0]).all()):
            continue
        if all(torch.equal(t, b[name]) for b in buffers[1:]):
            for e in spec.axes.get(name, []):
                out.update(group_ids(e))
    for gid in list(out):  # a coupling moves as one: its other groups stay in place too
        out.update(spec.groups[gid].coupled)
    return out
