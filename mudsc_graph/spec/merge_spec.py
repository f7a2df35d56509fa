"""MergeSpec: which parameter axes share a unit space, with structure. The analysis's product.

Every axis of every parameter and buffer is described by an *axis expression* over groups, a
small typed tree defined in :mod:`mudsc_graph.spec.axes` (``Units(gid)``, ``Fixed(n)``,
``Concat(parts)``, ``Kron(major, minor)``, ``GroupedIn(space, groups)``, ``Interleave(parts, blocks)``).
In memory a MergeSpec holds typed expressions; :meth:`MergeSpec.to_json` / :meth:`MergeSpec.from_json`
write and read them as nested lists (``["g", id]``, ``["fixed", n]``, ``["sum", [...]]``, ``["kron", a, b]``,
``["inner", e, groups]``, ``["interleave", [...], blocks]``), and list-form expressions given to :class:`MergeSpec` or :class:`Probe`
are converted on construction.

A group has ``size`` units in ``blocks`` blocks of ``block_size`` (``blocks == 1``: plain). A
valid permutation of a block group moves whole blocks and permutes freely inside each block;
groups listed in ``coupled`` share the block permutation (Q/K and V/O heads of one attention
layer; the in and out channels of a grouped convolution). Example, Conv -> BN -> ReLU -> Conv::

    group 0 (8 units): conv1.weight[0], conv1.bias[0], bn1.weight[0], bn1.bias[0],
                       bn1.running_mean[0], bn1.running_var[0], conv2.weight[1]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import permute
from .axes import Expr, as_expr, from_json, is_expr, to_json


@dataclass
class Probe:
    """Where a group's features can be read: axis ``axis`` of fx node ``node``'s output.

    ``expr`` is that axis's full expression (the group may be one part of it); ``consumer`` is
    true when the value feeds a layer with parameters (the default place to read features).
    With ``key``, the units are inside the op (attention heads of a leaf module): the features
    come from the ``features`` function of layer handler ``handler``, units on axis ``axis`` (-1).
    """

    node: str
    axis: int
    expr: Expr
    consumer: bool
    key: str | None = None
    handler: str | None = None
    span: int = 1
    """The units run along ``span`` axes from ``axis`` on, flattened (experts x their hidden units)."""
    mixed: tuple[int, ...] = ()
    """Other axes of the value that carry units to be matched (the channels a token-mixing layer
    runs over): each model lays its samples out along them in its own order, so the features are
    averaged over them (what stays aligned across models is kept)."""

    def __post_init__(self) -> None:
        self.expr = as_expr(self.expr)
        self.mixed = tuple(self.mixed)

    def read(self, value: torch.Tensor) -> torch.Tensor:
        """The node's value, averaged over the ``mixed`` axes, with the probe's axes flattened into axis ``axis``."""
        if self.mixed:
            value = value.mean(dim=self.mixed, keepdim=True)
        return value.flatten(self.axis, self.axis + self.span - 1) if self.span > 1 else value


@dataclass
class Group:
    id: int
    size: int
    blocks: int = 1
    fixed: bool = False
    reason: str | None = None
    members: list[tuple[str, int]] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    coupled: tuple[int, ...] = ()

    @property
    def block_size(self) -> int:
        return self.size // self.blocks


@dataclass
class MergeSpec:
    """The merge groups of a model (see the module docstring)."""

    groups: list[Group]
    axes: dict[str, list[Expr]]
    shapes: dict[str, tuple[int, ...]]
    warnings: list[str] = field(default_factory=list)
    consumed: dict[str, list[int]] = field(default_factory=dict)
    """Axes along which a parameter reads the units of its input (weight columns)."""
    buffers: list[str] = field(default_factory=list)
    """Names in ``axes`` that are buffers (BatchNorm running statistics), not parameters."""
    fixed: dict[str, dict[int, str]] = field(default_factory=dict)
    """Why each axis that no group covers keeps its order (``Fixed`` of more than one position):
    ``{name: {axis: "kernel taps"}}``; every such axis of an analysed model has a reason."""

    def __post_init__(self) -> None:
        # list-form (JSON) expressions are converted; lists already typed are kept as they are
        self.axes = {k: v if all(is_expr(e) for e in v) else [as_expr(e) for e in v] for k, v in self.axes.items()}

    # -- queries ---------------------------------------------------------------------------------
    @property
    def permutable_units(self) -> int:
        return sum(g.size for g in self.groups if not g.fixed)

    def group(self, gid: int) -> Group:
        return self.groups[gid]

    def free_groups(self) -> list[Group]:
        return [g for g in self.groups if not g.fixed]

    # -- permutations (see permute.py) -----------------------------------------------------------
    def random_permutation(self, seed: int = 0) -> dict[int, torch.Tensor]:
        return permute.random_permutation(self, seed)

    def apply_permutation(self, model: torch.nn.Module, perm: dict[int, torch.Tensor]) -> torch.nn.Module:
        return permute.apply_permutation(self, model, perm)

    def permute_state_dict(self, state: dict[str, torch.Tensor], perm: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        return permute.permute_state_dict(self, state, perm)

    def check(self, model: torch.nn.Module, example_inputs: Any, *, seed: int = 0, rtol: float = 1e-4, trials: int = 3) -> float:
        """Raise :class:`~mudsc_graph.errors.SpecCheckError` if one of ``trials`` random valid
        permutations changes the output by more than ``rtol`` of its scale; see :func:`~mudsc_graph.spec.permute.check`."""
        return permute.check(self, model, example_inputs, seed=seed, rtol=rtol, trials=trials)

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self, indent: int | None = None) -> str:
        data = {
            "version": 1,
            "groups": [_group_json(g) for g in self.groups],
            "axes": {k: [to_json(e) for e in v] for k, v in self.axes.items()},
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "warnings": self.warnings,
            "consumed": self.consumed,
            "buffers": self.buffers,
        }
        if self.fixed:  # written only when there is something to say: older specs read back as they were written
            data["fixed"] = {k: {str(a): why for a, why in v.items()} for k, v in self.fixed.items()}
        return json.dumps(data, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "MergeSpec":
        data = json.loads(text)
        groups = []
        for g in data["groups"]:
            probes = [Probe(**p) for p in g.pop("probes")]
            groups.append(
                Group(**{**g, "members": [tuple(m) for m in g["members"]], "coupled": tuple(g["coupled"]), "probes": probes})
            )
        shapes = {k: tuple(v) for k, v in data["shapes"].items()}
        axes = {k: [from_json(e) for e in v] for k, v in data["axes"].items()}
        fixed = {k: {int(a): why for a, why in v.items()} for k, v in data.get("fixed", {}).items()}
        return cls(groups, axes, shapes, data.get("warnings", []), data.get("consumed", {}), data.get("buffers", []), fixed)


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _group_json(g: Group) -> dict[str, Any]:
    """A group as JSON data, fields in declaration order (as ``dataclasses.asdict`` wrote them)."""
    probes = [{k: list(v) if k == "mixed" else v for k, v in {**_fields(p), "expr": to_json(p.expr)}.items()
               if (k, v) not in (("span", 1), ("mixed", ()))} for p in g.probes]
    return {**_fields(g), "members": [list(m) for m in g.members], "probes": probes, "coupled": list(g.coupled)}
