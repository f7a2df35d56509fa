"""Models of different widths: each analysed on its own graph, padded to one width, merged as one.

``merge([a_x2, b_x4], ...)`` of one architecture whose groups differ in size (a ResNet-20 x2 and
x4, MLPs of different hidden sizes, BERTs of different ``intermediate_size``): every model is
analysed (:func:`~mudsc_graph.analysis.pipeline.analyze_full`) and its groups put in
correspondence with model 0's by their place in the graph (the same groups, members, axes and
structure; only the sizes differ). Each model is then padded to the widest size of every group by
Net2Net copies of its own units (:func:`~mudsc_graph.merging.widths.net2net`: a unit's producers
duplicated, its consumers' weights split; the padded model computes what the model does), so
the statistics, the weight similarities and the merged weights run on models of one shape. The
matcher is told which stacked units are copies (``copies=``): zip zips only the models' own units,
into the merged width (by default model 0's own, any width between one unit and all of them
together), and a copy joins its unit's merged unit with a share that counts a unit and its copies
once; align pairs the narrower model's units (its copies included) into the wider one's, so the
merged group has the widest model's size. The merged model is model 0's, rebuilt at the merged sizes.

Output layers with other label spaces (a fixed group of another size: 10 classes and 5) cannot be
merged: each model keeps its own layers from the first one that reads them (partial zip's tails,
:mod:`.partial_zip`; the merged module returns one output per model), with a warning saying so.

Models of different depths are cut to one depth first (:mod:`.depth`). Heads and GroupNorm groups
of different counts (the same size each) are padded with whole-block copies and merged as whole
blocks into model 0's (:func:`~.matching.blocks.group_zip_copies`); a width budget on them, and
blocks of different sizes, are refused with a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import MergeError
from ..spec.axes import to_json
from ..spec.merge_spec import MergeSpec
from .widths import net2net, rigid_groups


@dataclass
class Padding:
    """Models of different widths padded to one: ``models`` (padded copies), ``own`` (each model's
    own units per group), ``copies`` (per group, per model: ``None``, or which own unit each padded
    unit is)."""

    models: list[nn.Module]
    own: list[dict[int, int]]
    copies: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    heads: dict[int, list[int]] = field(default_factory=dict)
    """Fixed groups whose size differs (output layers with other label spaces): ``{gid: sizes}``;
    the tensors holding them are each model's own (partial zip's tails)."""

    def units(self, gid: int) -> list[int]:
        """Each model's own units of group ``gid``."""
        return [sizes[gid] for sizes in self.own]


def sizes_differ(models: list[nn.Module]) -> bool:
    """Whether the models' tensors differ in shape (same names assumed)."""
    ref = {k: tuple(v.shape) for k, v in models[0].state_dict().items()}
    return any(tuple(v.shape) != ref.get(k) for m in models[1:] for k, v in m.state_dict().items())


def _shape_of_spec(spec: MergeSpec) -> tuple:
    """What two models' analyses must share to be merged group by group: every group's members,
    blocks-or-not and fixedness, every tensor's axis expressions (group ids and fixed sizes)."""
    groups = tuple((tuple(g.members), g.blocks > 1, g.fixed, tuple(g.coupled)) for g in spec.groups)
    axes = tuple(sorted((k, tuple(str(to_json(e)) for e in v)) for k, v in spec.axes.items()))
    return groups, axes, tuple(sorted(spec.consumed.items()))


def pad(models: list[nn.Module], analyse: Any) -> Padding:
    """``models`` padded to the widest size of every group (see the module docstring);
    ``analyse(model)`` gives a model's merge spec. ``MergeError`` when the models differ in more
    than sizes, or in what cannot be padded yet."""
    specs = [analyse(m) for m in models]
    ref = _shape_of_spec(specs[0])
    for i, spec in enumerate(specs[1:], start=1):
        if _shape_of_spec(spec) != ref:
            raise MergeError(f"model {i} differs from model 0 in more than its sizes (its merge groups or their layout differ: "
                             "another architecture)")
    own = [{g.id: g.size for g in spec.groups} for spec in specs]
    widest = {g.id: max(sizes[g.id] for sizes in own) for g in specs[0].groups}
    heads: dict[int, list[int]] = {}
    rigid = rigid_groups(specs[0])
    for g in specs[0].groups:
        sizes = [o[g.id] for o in own]
        if len(set(sizes)) == 1:
            continue
        what = f"group {g.id} ({g.members[0][0]}, axis {g.members[0][1]})"
        if g.fixed:  # another label space: each model keeps the layers that hold it (the caller decides where they start)
            heads[g.id] = sizes
            continue
        if g.id in rigid:
            raise MergeError(f"{what} has {sizes} units in the models, but {rigid[g.id]}: it cannot be padded to one width")
        if g.blocks > 1 and len({spec.groups[g.id].block_size for spec in specs}) > 1:
            raise MergeError(f"{what}: its blocks (heads, GroupNorm groups) differ in size between the models ({sizes} units); "
                             "only their number may differ")
    padded, copies = [], {}
    for i, (model, spec) in enumerate(zip(models, specs)):
        grow = {gid: widest[gid] for gid, size in own[i].items() if size < widest[gid] and gid not in heads}
        padded.append(net2net(model, spec, grow) if grow else model)
        for gid in grow:  # as net2net pads: own units in order, then copies of them in turn (whole blocks)
            group = spec.groups[gid]
            each = group.block_size if group.blocks > 1 else 1
            o, w = own[i][gid] // each, widest[gid] // each
            extra = ((torch.arange(w - o) % o)[:, None] * each + torch.arange(each)).reshape(-1)
            copies.setdefault(gid, [None] * len(models))[i] = torch.cat([torch.arange(o * each), extra])
    return Padding(padded, own, copies, heads)


__all__ = ["Padding", "pad", "sizes_differ"]
