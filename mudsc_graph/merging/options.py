"""How to merge: one frozen, validated record shared by :func:`~mudsc_graph.merge`,
:class:`~mudsc_graph.PreparedMerge` and ``mudsc merge`` (mergekit's ``MergeOptions`` pattern).

Every default is defined here and nowhere else; the command line reads its defaults from
``MergeOptions()``. ``MergeOptions.of(options, **changes)`` is how callers build one: keyword
overrides on top of a base record, every unknown name and bad value one :class:`MergeError`.

    >>> opts = MergeOptions(method="mudsc", mode="align", alpha=0.3)
    >>> merge([a, b], data=batches, options=opts)
    >>> merge([a, b], data=batches, mode="align", alpha=0.3)      # the same
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch

from ..analysis.trace import TRACERS
from ..errors import MergeError
from .statistics import PROBES
from .widths import check_width



#: Fields fixed when a merge is prepared (:class:`~mudsc_graph.PreparedMerge`): the checks, the
#: BatchNorm reset of the bases, the analysis and the statistics depend on them.
PREPARATION = ("device", "reset_bn", "probe", "tracer", "shard_data", "depth_alignment")


@dataclass(frozen=True)
class MergeOptions:
    """What one merge does. Matching: ``method``, ``mode``, ``alpha``, ``stop_at``, ``seed``,
    ``max_iter``, ``patience``, ``matcher_options``; ``repair``, ``refit``, ``refit_ridge``, ``width``; preparation (see :data:`PREPARATION`):
    ``device``, ``reset_bn``, ``probe``, ``tracer``, ``shard_data``.

    ``method``: a registered merge method (``average``, ``weight_matching``, ``weight_zip``,
    ``activation_matching``, ``zipit``, ``mudsc`` or a plugin's); ``mode``: the matcher of
    ``mudsc`` (``align``, ``zip`` or a plugin's). ``alpha`` weighs the weight space in
    ``S = alpha * S_weight + (1 - alpha) * S_act``. ``stop_at``: partial zip, a module path or node
    name. ``seed``: the group order of the iterative scheme, which runs at most ``max_iter`` sweeps
    and stops after ``patience`` sweeps without improvement. ``matcher_options``: values of the
    matcher's declared parameters (:class:`~mudsc_graph.MatcherParameter`; zip's ``a``, the similarity
    decay, and ``b``, the within-model budget; ``zip_a`` and ``zip_b`` are their old, deprecated
    names). ``repair``: REPAIR after merging (Jordan et al. 2023;
    :mod:`~mudsc_graph.merging.repair`): every merged layer's output channels get the
    interpolation of their parents' mean and standard deviation on the calibration data. ``refit``:
    each merged Linear/Conv2d refit by least squares to reproduce its parents' outputs, front to back
    (:mod:`~mudsc_graph.merging.refit`), with the ridge ``refit_ridge`` toward the merged weights
    (in units of the inputs' mean squared norm: it weighs like ``refit_ridge * features / samples``). ``width``: a width
    budget (:mod:`~mudsc_graph.merging.widths`), up to N (every unit of every model kept); below 1
    zip narrows (plain groups): a number for every matched group, or ``{group id or parameter/module name:
    width}`` for some (the others: 1); the merged model is built with the new widths.
    ``depth_alignment``: for models of different depths (:mod:`~mudsc_graph.merging.depth`), the
    blocks a deeper model keeps, ``{model index: {chain path: [block indices]}}``, instead of the
    alignment found on the data. ``device``: ``None`` (the first model's), ``"auto"``,
    ``"cpu"``, ``"cuda"``, ...; ``reset_bn``: recompute BatchNorm statistics of the bases and of the
    merged model on the data; ``probe``: which consumer of a group its features are read at
    (``last``, ``first``, ``all``); ``tracer``: ``auto``, ``fx`` or ``export``; ``shard_data``:
    under an initialised ``torch.distributed`` process group, each rank takes every
    world-size-th calibration batch (``False``: each rank's ``data`` is already its own shard, as a
    ``DistributedSampler`` gives it); the statistics are summed over the ranks either way
    (:mod:`~mudsc_graph.merging.distributed`).
    """

    method: str = "mudsc"
    mode: str = "zip"
    alpha: float = 0.5
    stop_at: str | None = None
    seed: int = 0
    max_iter: int = 100
    patience: int = 5
    matcher_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    zip_a: float | None = None  # deprecated: matcher_options={"a": ...}
    zip_b: float | None = None  # deprecated: matcher_options={"b": ...}
    device: Any = None
    reset_bn: bool = True
    probe: str = "last"
    tracer: str = "auto"
    shard_data: bool = True
    repair: bool = False
    refit: bool = False
    refit_ridge: float = 0.1
    width: Any = field(default=1.0, hash=False)
    depth_alignment: Any = field(default=None, hash=False)

    def __post_init__(self) -> None:  # method and mode need the registry: resolve_method checks them
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha != self.alpha:
            raise MergeError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.stop_at is not None and (not isinstance(self.stop_at, str) or not self.stop_at.strip()):
            raise MergeError(f"stop_at must be a module path or node name (a non-empty str), got {self.stop_at!r}")
        for name, least in (("max_iter", 0), ("patience", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise MergeError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.seed >= 2**63:
            raise MergeError(f"seed must be below 2**63, got {self.seed}")
        if not isinstance(self.matcher_options, Mapping) or not all(isinstance(k, str) for k in self.matcher_options):
            raise MergeError(f"matcher_options must be a dict of parameter names to values, got {self.matcher_options!r}")
        legacy = self.legacy_zip_options()
        if legacy:  # the old names of zip's parameters a and b (they apply when the matcher is zip, as before)
            warnings.warn(f"the merge options zip_a/zip_b are now matcher_options={legacy!r} (zip's parameters a and b)",
                          DeprecationWarning, stacklevel=4)
        object.__setattr__(self, "matcher_options", dict(self.matcher_options))
        if isinstance(self.refit_ridge, bool) or not isinstance(self.refit_ridge, (int, float)) or not 0 <= self.refit_ridge < float("inf"):
            raise MergeError(f"refit_ridge must be a number >= 0, got {self.refit_ridge!r}")
        check_width(self.width)
        if isinstance(self.width, Mapping):
            object.__setattr__(self, "width", dict(self.width))
        if self.depth_alignment is not None and not (isinstance(self.depth_alignment, Mapping) and all(
                isinstance(i, int) and isinstance(v, Mapping) for i, v in self.depth_alignment.items())):
            raise MergeError(f"depth_alignment must be {{model index: {{chain path: [kept block indices]}}}}, got {self.depth_alignment!r}")
        for name in ("reset_bn", "shard_data", "repair", "refit"):
            if not isinstance(getattr(self, name), bool):
                raise MergeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.probe not in PROBES:
            raise MergeError(f"probe must be one of {', '.join(PROBES)}, got {self.probe!r}")
        if self.tracer not in TRACERS:
            raise MergeError(f"tracer must be one of {', '.join(TRACERS)}, got {self.tracer!r}")

    def legacy_zip_options(self) -> dict[str, Any]:
        """``zip_a`` / ``zip_b`` given (deprecated) as zip's ``a`` / ``b``."""
        return {key: getattr(self, name) for name, key in (("zip_a", "a"), ("zip_b", "b")) if getattr(self, name) is not None}

    @classmethod
    def of(cls, options: "MergeOptions | None" = None, **changes: Any) -> "MergeOptions":
        """``options`` (default: all defaults) with ``changes``; ``tol`` is the old name of ``patience``."""
        if options is not None and not isinstance(options, MergeOptions):
            raise MergeError(f"options= must be a MergeOptions, got {type(options).__name__}")
        if "tol" in changes:
            warnings.warn("the merge option 'tol' is now called 'patience'", DeprecationWarning, stacklevel=3)
            changes["patience"] = changes.pop("tol")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise MergeError(f"unknown merge option {', '.join(map(repr, unknown))}; the options are {', '.join(sorted(names))}")
        return dataclasses.replace(options or cls(), **changes)

    def preparation(self) -> dict[str, Any]:
        """The fields a :class:`~mudsc_graph.PreparedMerge` fixes."""
        return {name: getattr(self, name) for name in PREPARATION}


#: Every default, for the command line's option defaults.
DEFAULTS = MergeOptions()


def resolve_device(device: Any, model: Any = None) -> torch.device:
    """The device a merge runs on: ``"auto"`` is CUDA when there is one, ``None`` where ``model``'s
    parameters are (the CPU without a model), anything else must be a device torch knows and has."""
    if device in (None, "auto"):
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        p = next(model.parameters(), None) if model is not None else None
        return p.device if p is not None else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MergeError(f"device {device!r} is not a device torch knows; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"device {device!r} was asked for but no CUDA device is available; use 'cpu' or 'auto'")
    return dev
