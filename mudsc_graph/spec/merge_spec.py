"""MergeSpec: which parameter axes share a unit space, with structure. The analysis's product.

Every axis of every parameter and buffer is described by an *axis expression* over groups
(JSON-friendly nested lists):

- ``["g", id]``: the axis is exactly the units of group ``id`` (in order);
- ``["fixed", n]``: ``n`` positions that never move (kernel taps, ...);
- ``["sum", [e1, e2, ...]]``: concatenation (fused qkv rows: ``sum(QK, QK, V)``);
- ``["kron", a, b]``: row-major product; one side is fixed (conv -> flatten -> Linear columns
  are ``kron(channels, fixed(H*W))``);
- ``["inner", e, groups]``: a grouped convolution's ``in/groups`` weight axis: for a row in
  block ``j`` of axis 0, the units inside block ``j`` of the input space ``e``.

A group has ``size`` units in ``blocks`` blocks of ``block_size`` (``blocks == 1``: plain). A
valid permutation of a block group moves whole blocks and permutes freely inside each block;
groups listed in ``coupled`` share the block permutation (Q/K and V/O heads of one attention
layer; the in and out channels of a grouped convolution). Example, Conv -> BN -> ReLU -> Conv::

    group 0 (8 units): conv1.weight[0], conv1.bias[0], bn1.weight[0], bn1.bias[0],
                       bn1.running_mean[0], bn1.running_var[0], conv2.weight[1]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

Expr = list  # see the module docstring


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
        from .permute import random_permutation

        return random_permutation(self, seed)

    def apply_permutation(self, model: torch.nn.Module, perm: dict[int, torch.Tensor]) -> torch.nn.Module:
        from .permute import apply_permutation

        return apply_permutation(self, model, perm)

    def permute_state_dict(self, state: dict[str, torch.Tensor], perm: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        from .permute import permute_state_dict

        return permute_state_dict(self, state, perm)

    def check(self, model: torch.nn.Module, example_inputs: Any, *, seed: int = 0, rtol: float = 1e-4, trials: int = 3) -> float:
        """Raise :class:`~mudsc_graph.errors.SpecCheckError` if one of ``trials`` random valid
        permutations changes the output by more than ``rtol`` of its scale; see :func:`~mudsc_graph.spec.permute.check`."""
        from .permute import check

        return check(self, model, example_inputs, seed=seed, rtol=rtol, trials=trials)

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self, indent: int | None = None) -> str:
        data = {
            "version": 1,
            "groups": [
                {**asdict(g), "members": [list(m) for m in g.members], "coupled": list(g.coupled)} for g in self.groups
            ],
            "axes": self.axes,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "warnings": self.warnings,
            "consumed": self.consumed,
            "buffers": self.buffers,
        }
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
        return cls(groups, data["axes"], shapes, data.get("warnings", []), data.get("consumed", {}), data.get("buffers", []))


def _gids(e: Expr) -> list[int]:
    if e[0] == "g":
        return [e[1]]
    if e[0] == "sum":
        return [g for x in e[1] for g in _gids(x)]
    if e[0] == "kron":
        return _gids(e[1]) + _gids(e[2])
    if e[0] == "inner":
        return _gids(e[1])
    return []
