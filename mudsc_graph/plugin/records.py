"""Small frozen records that plugins register through the hooks in :mod:`mudsc_graph.plugin.hookspecs`.

Each record validates itself on creation, so a broken plugin fails where it is written, with a
message naming the record, instead of deep inside an analysis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import PluginError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..analysis.propagate import OpContext

OPCODES = ("call_module", "call_function", "call_method")
_NAME = re.compile(r"^[A-Za-z0-9_.:\-]+$")


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(f"{kind} name {name!r} is invalid: use letters, digits, '_', '.', ':' or '-'")


def _is_tag(t: Any) -> bool:
    import torch

    return isinstance(t, torch.Tag)


@dataclass(frozen=True)
class LayerHandler:
    """Tells the propagation pass how the axes of one kind of op relate.

    ``opcode`` is the torch.fx opcode the handler answers to and ``targets`` what the node
    targets: module classes for ``call_module`` (matched by exact class, then by base class),
    functions for ``call_function`` (``torch.add``, ``operator.add``, ``F.relu`` ...), method
    names for ``call_method`` (``"view"``, ``"transpose"`` ...). Module classes named here are
    traced as leaves, so the handler sees the module call rather than its insides; a subclass
    that overrides ``forward`` is not matched by its base's handler (it is traced through).

    The graphs of the torch.export tracer are ATen-level: their ``call_function`` targets are
    ATen operators. A handler names an overload (``torch.ops.aten.linear.default``), a whole packet
    (``torch.ops.aten.linear``, every overload) or a ``torch.Tag`` (``torch.Tag.pointwise``: any
    operator with that tag that nothing more specific handles). The built-ins list each ATen
    operator beside its torch-level twin, with the same rule: a rule reads arguments with
    ``ctx.arg(i, name)``, which for ATen operators finds ``name`` in the operator's schema.

    ``propagate(ctx)`` receives an :class:`~mudsc_graph.analysis.propagate.OpContext` and must set the
    layout of the node's output (``ctx.set_output``) after linking axes. ``priority`` resolves two
    handlers for one target: the higher wins; equal priorities from two plugins are an error.

    ``features(module, args, kwargs, key)`` is needed only by handlers whose op has units that
    no value of the graph shows (the heads inside ``nn.MultiheadAttention``): ``propagate`` calls
    ``ctx.internal_probe(layout, key)`` and ``features`` computes those units' activations from
    the op's module and arguments, units on the last axis.
    """

    name: str
    opcode: str
    targets: tuple[Any, ...]
    propagate: Callable[["OpContext"], None]
    priority: int = 0
    description: str = ""
    features: Callable[..., "torch.Tensor"] | None = None

    def __post_init__(self) -> None:
        _check_name("LayerHandler", self.name)
        if self.opcode not in OPCODES:
            raise PluginError(f"LayerHandler {self.name!r}: opcode {self.opcode!r} is not one of {', '.join(OPCODES)}")
        if not isinstance(self.targets, tuple) or not self.targets:
            raise PluginError(f"LayerHandler {self.name!r}: targets must be a non-empty tuple")
        for t in self.targets:
            if self.opcode == "call_method" and not isinstance(t, str):
                raise PluginError(f"LayerHandler {self.name!r}: call_method targets are method names (str), got {t!r}")
            if self.opcode == "call_module" and not isinstance(t, type):
                raise PluginError(f"LayerHandler {self.name!r}: call_module targets are module classes, got {t!r}")
            if self.opcode == "call_function" and not (callable(t) or _is_tag(t)):
                raise PluginError(f"LayerHandler {self.name!r}: call_function targets are callables, ATen operators or torch.Tag values, got {t!r}")
        if not callable(self.propagate):
            raise PluginError(f"LayerHandler {self.name!r}: propagate must be callable")


@dataclass(frozen=True)
class Architecture:
    """A model family that ``mudsc`` commands accept by name (``--arch NAME``).

    ``factory(**options)`` builds a freshly initialised model; ``example_inputs(batch_size)``
    returns the tuple of tensors that one forward call takes (used for tracing and the self-check).
    ``aliases`` are other accepted names (``vit_b_16`` for ``vit_b16``).
    """

    name: str
    factory: Callable[..., "torch.nn.Module"]
    example_inputs: Callable[[int], tuple]
    aliases: tuple[str, ...] = ()
    description: str = ""
    defaults: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name("Architecture", self.name)
        for a in self.aliases:
            _check_name("Architecture alias", a)
        if not callable(self.factory) or not callable(self.example_inputs):
            raise PluginError(f"Architecture {self.name!r}: factory and example_inputs must be callable")

    def build(self, **options: Any) -> "torch.nn.Module":
        return self.factory(**{**self.defaults, **options})


@dataclass(frozen=True)
class MatcherParameter:
    """A parameter a :class:`MatchingStrategy` takes, with its default and its checks: given as
    ``merge(..., matcher_options={name: value})`` or ``mudsc merge --matcher-opt name=value``, checked
    by :meth:`parse` (one clear line), passed to ``match(..., name=value)`` and recorded in the
    merged model's metadata. The default's type is the parameter's (``bool``, ``int``, ``float``,
    ``str``); ``minimum`` / ``maximum`` bound a number, ``choices`` a string."""

    name: str
    default: Any
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise PluginError(f"MatcherParameter name {self.name!r} must be a Python identifier")
        if type(self.default) not in (bool, int, float, str):
            raise PluginError(f"MatcherParameter {self.name!r}: the default must be a bool, int, float or str, got {type(self.default).__name__}")
        try:
            self.parse(self.default)
        except ValueError as exc:
            raise PluginError(f"MatcherParameter {self.name!r}: its default is not valid: {exc}") from None

    @property
    def kind(self) -> str:
        return type(self.default).__name__

    def parse(self, value: Any) -> Any:
        """``value`` (a Python value, or text from the command line) as this parameter's type,
        checked; ``ValueError`` with one line saying what is accepted."""
        import math

        kind = type(self.default)
        if isinstance(value, str) and kind is not str:
            text = value.strip().lower()
            try:
                value = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}[text] if kind is bool \
                    else kind(text)
            except (KeyError, ValueError):
                raise ValueError(f"{self.name} must be {self._accepts()}, got {value!r}") from None
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok or (kind is float and not math.isfinite(value)):
            raise ValueError(f"{self.name} must be {self._accepts()}, got {value!r}")
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise ValueError(f"{self.name} must be {self._accepts()}, got {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name} must be {self._accepts()}, got {value!r}")
        return value

    def _accepts(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        what = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "text"}[self.kind]
        bounds = [f">= {self.minimum:g}"] if self.minimum is not None else []
        bounds += [f"<= {self.maximum:g}"] if self.maximum is not None else []
        return what + (" " + " and ".join(bounds) if bounds else "")


@dataclass(frozen=True)
class MatchingStrategy:
    """A way to turn a unit similarity into merge / unmerge matrices (``--mode NAME``).

    ``match(sims, n_models, blocks, **options)`` receives one similarity matrix per group of a
    coupling (usually one; Q/K and V/O of an attention layer are matched together), each
    ``(n_models * units) x (n_models * units)`` with the models' units stacked in order, and returns
    one :class:`~mudsc_graph.merging.matching.Matching` per matrix. ``blocks > 1`` asks for a block
    structured result (heads, GroupNorm groups); a strategy with ``supports_blocks=False`` never
    gets such a call: block groups are then averaged in place (not matched), with a warning.
    A strategy is usable as a method of its own (``merge(method=NAME)``: dual-space similarity with
    the ``alpha`` argument) and as ``merge(method="mudsc", mode=NAME)``.

    ``needs_covariances=True`` asks for the activation *covariances* too (CCA needs each unit's
    scale, not only correlations): ``match`` is then called with ``covariances=[...]``, one
    ``(N*O) x (N*O)`` covariance per similarity, in the same order (the units' correlations times
    their standard deviations; rows and columns of dead units are 0), an entry being ``None`` for
    a group without activation statistics (matched by weights alone).
    """

    name: str
    match: Callable[..., list]
    supports_blocks: bool = True
    description: str = ""
    uses_within_model: bool = True
    """False when ``match`` reads only the blocks between model 0 and the others (align): the
    within-model blocks of the similarity are then not computed (left 0)."""
    needs_covariances: bool = False
    """True when ``match`` takes ``covariances=`` (see the class docstring)."""
    thread_safe: bool = False
    """True when ``match`` may run on several threads at once (no shared mutable state): the solver
    then solves the assignments of independent groups side by side (the built-ins are)."""
    supports_width: bool = False
    """True when ``match`` takes ``merged=[units, ...]`` (one per similarity, each between the units
    of one model and of all N): a width budget, the merged group wider than one model. A merge with
    ``width > 1`` refuses a matcher without it."""
    unequal_widths: bool = False
    """True when ``match`` also takes ``copies=[[src or None per model] per similarity]`` (models of
    different widths padded to one with copies of their own units: ``src[k]`` is the own unit that
    stacked unit k of that model is) and ``merged=`` narrower than the padding; without it, a group
    whose models differ in width is merged at the widest model's width."""
    parameters: tuple[MatcherParameter, ...] = ()
    """What ``match`` takes besides the similarities (:class:`MatcherParameter`): each is passed as a
    keyword, its default when the user gives none."""

    def __post_init__(self) -> None:
        _check_name("MatchingStrategy", self.name)
        if not callable(self.match):
            raise PluginError(f"MatchingStrategy {self.name!r}: match must be callable")
        if not isinstance(self.parameters, tuple) or not all(isinstance(p, MatcherParameter) for p in self.parameters):
            raise PluginError(f"MatchingStrategy {self.name!r}: parameters must be a tuple of MatcherParameter records")
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise PluginError(f"MatchingStrategy {self.name!r}: a parameter is declared twice ({', '.join(names)})")

    def options(self, given: Any) -> dict[str, Any]:
        """Every parameter's value: ``given`` (a mapping of names to values or text) checked, the
        defaults for the rest; ``ValueError`` for an unknown name or a bad value."""
        given = dict(given or {})
        known = {p.name: p for p in self.parameters}
        unknown = sorted(set(given) - set(known), key=str)
        if unknown:
            accepted = ", ".join(known) if known else "none"
            raise ValueError(f"matcher {self.name!r} has no parameter {unknown[0]!r} (its parameters: {accepted})")
        return {name: p.parse(given[name]) if name in given else p.default for name, p in known.items()}


ACTIVATIONS = ("by_alpha", "always", "never")


@dataclass(frozen=True)
class MergeMethod:
    """A merging method: what ``merge(method=NAME)`` and ``mudsc merge --method NAME`` accept.

    ``matcher`` names the :class:`MatchingStrategy` that turns the similarity into merge / unmerge
    maps, or is ``None`` when the ``mode`` argument names it (``mudsc``: ``align``, ``zip`` or any
    registered matcher; ``default_mode`` when none is given). ``alpha`` is the weight-space share the
    method fixes in ``S = alpha * S_weight + (1 - alpha) * S_act``, or ``None`` to take the
    ``alpha`` argument. ``activations`` says when the method needs calibration data for activation
    statistics: ``"by_alpha"`` (when ``alpha < 1``), ``"always"`` or ``"never"``.
    """

    name: str
    matcher: str | None
    alpha: float | None = None
    description: str = ""
    default_mode: str | None = None
    activations: str = "by_alpha"

    def __post_init__(self) -> None:
        _check_name("MergeMethod", self.name)
        if self.matcher is None and self.default_mode is None:
            raise PluginError(f"MergeMethod {self.name!r}: give a matcher, or a default_mode for the mode argument to override")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise PluginError(f"MergeMethod {self.name!r}: alpha must be None or a number in [0, 1], got {self.alpha!r}")
        if self.activations not in ACTIVATIONS:
            raise PluginError(f"MergeMethod {self.name!r}: activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")

    def matcher_for(self, mode: str | None) -> str:
        """The matching strategy's name: the method's own, else ``mode`` (else ``default_mode``)."""
        return self.matcher if self.matcher is not None else (mode or self.default_mode)  # type: ignore[return-value]

    def alpha_for(self, alpha: float) -> float:
        return float(self.alpha) if self.alpha is not None else float(alpha)

    def needs_activations(self, alpha: float) -> bool:
        """Whether a merge with this (resolved) ``alpha`` reads activation statistics."""
        if self.activations == "by_alpha":
            return self.alpha_for(alpha) < 1.0
        return self.activations == "always"


@dataclass(frozen=True)
class Dataset:
    """A data source that commands accept in ``--data SPEC`` (``NAME``, ``NAME:0-4``, ...).

    ``load(split, **options)`` returns ``(x, y)``: a float tensor of inputs (``N x C x H x W`` for
    images) and a long tensor of class labels, for ``split`` ``"train"`` or ``"test"``.
    ``classes`` is the number of classes; ``input_shape`` the shape of one input.
    """

    name: str
    load: Callable[..., tuple]
    classes: int
    input_shape: tuple[int, ...]
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("Dataset", self.name)
        if not callable(self.load):
            raise PluginError(f"Dataset {self.name!r}: load must be callable")
