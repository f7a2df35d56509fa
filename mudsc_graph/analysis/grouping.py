"""From the propagated space table to a MergeSpec: groups, axis expressions, probes.

The last step of the analysis (:func:`build_spec`): the closed :class:`~mudsc_graph.analysis.spaces.SpaceTable`
of a finished :class:`~mudsc_graph.analysis.propagate.Propagator` becomes the groups of a
:class:`~mudsc_graph.spec.merge_spec.MergeSpec`, one axis expression per parameter axis, and the probes
where each group's features can be read.
"""

from __future__ import annotations

from ..spec.axes import Concat, Expr, Fixed, GroupedIn, Interleave, Kron, Units, group_ids, renumber, simplify
from ..spec.merge_spec import Group, MergeSpec, Probe
from .propagate import Propagation
from .spaces import Dep, SpaceTable, Stack, Sum


class _Builder:
    """Turns the closed space table into groups and axis expressions."""

    def __init__(self, sp: SpaceTable) -> None:
        self.sp = sp
        self.keys: dict[tuple, int] = {}
        self.groups: list[Group] = []
        self.bad: set[int] = set()
        self.families: dict[int, tuple[int, int]] = {}  # part root -> (block root, index)
        self.block_spaces: set[int] = set()
        self.interleaved: dict[int, list[list[int]]] = {}  # stack root -> its blocks' pieces by position
        self.nested: list[list[int]] = []  # blocks of a stack over a structured space: to fix and join
        self.kron_blocks: dict[int, tuple[list[int], int]] = {}  # stack root -> (its blocks' units, positions per unit)
        for root, d in sp.defn.items():
            if sp.find(root) != root or not isinstance(d, Stack):
                continue
            r = sp.find(d.r)
            if sp.is_fixed(r):
                continue
            if r in sp.defn:  # blocks indexed by a structured space (a grouped conv reading a block group's units
                # one per block): no block permutation of their own can follow it, so the blocks keep their
                # insides and move with the units of r (kron(r, fixed))
                if not all(sp.is_fixed(p) for p in d.parts) or len({sp.find(p) for p in d.parts}) > 1:
                    self.nested.append(list(d.parts))
                continue
            parts = [sp.find(p) for p in d.parts]
            if all(sp.is_fixed(p) for p in parts):  # blocks that move whole, their insides in place: kron(r, fixed)
                continue
            if len(set(parts)) == 1:
                self.bad.add(r)
                continue
            kron = self._kron_parts(parts)
            if kron is not None:  # each block units of k positions (experts' interleaved [g0, u0, g1, u1, ...] rows)
                self.kron_blocks[root] = kron
                self._family(r, kron[0])
                continue
            columns = self._columns(parts)
            if columns is not None:  # head-major: every block a sum of the same pieces (q_j, k_j, v_j)
                self.interleaved[root] = columns
                for col in columns:
                    if not all(sp.is_fixed(p) for p in col):
                        self._family(r, col)
                continue
            self._family(r, parts)

    def _family(self, r: int, parts: list[int]) -> None:
        """``parts`` are the blocks of block space ``r`` (block ``j`` is ``parts[j]``)."""
        sp = self.sp
        if len(set(parts)) != len(parts) or any(p in sp.defn or sp.is_fixed(p) for p in parts):
            self.bad.add(r)
            return
        for j, p in enumerate(parts):
            if self.families.setdefault(p, (r, j)) != (r, j):
                self.bad.add(r)
                self.bad.add(self.families[p][0])
        self.block_spaces.add(r)

    def _kron_parts(self, parts: list[int]) -> tuple[list[int], int] | None:
        """For blocks that are each ``kron(units, fixed k)`` (one k for all), their units; else ``None``."""
        sp, units, ks = self.sp, [], set()
        for p in parts:
            d = sp.defn.get(p)
            if not isinstance(d, Stack) or sp.is_fixed(d.r) or sp.find(d.r) in sp.defn or not all(sp.is_fixed(q) for q in d.parts):
                return None
            units.append(sp.find(d.r))
            ks.add(sp.size[sp.find(d.parts[0])])
        return (units, ks.pop()) if len(ks) == 1 else None

    def _columns(self, parts: list[int]) -> list[list[int]] | None:
        """For blocks that are each a sum of pieces of the same sizes, the pieces by position
        (``columns[k][j]``: piece ``k`` of block ``j``); else ``None``."""
        sp = self.sp
        defs = [sp.defn.get(p) for p in parts]
        if not all(isinstance(d, Sum) for d in defs):
            return None
        shapes = {tuple(sp.size[sp.find(x)] for x in d.parts) for d in defs}
        if len(shapes) != 1:
            return None
        return [[sp.find(d.parts[k]) for d in defs] for k in range(len(defs[0].parts))]

    def expr(self, s: int, strict: bool = True) -> Expr:
        sp = self.sp
        s = sp.find(s)
        n = sp.size[s]
        if n == 1:
            return Fixed(1)
        if sp.is_fixed(s):
            reason = sp.fixed[s]
            return Units(self._gid(("fixed", s), n, 1, True, reason)) if reason else Fixed(n)
        if strict and s in self.families:
            self.bad.add(self.families[s][0])
        d = sp.defn.get(s)
        if d is None:
            return Units(self._gid(("atom", s), n, 1, False, None))
        if isinstance(d, Sum):
            return simplify(Concat([self.expr(p, strict) for p in d.parts]))
        r, parts = sp.find(d.r), [sp.find(p) for p in d.parts]
        if len(set(parts)) == 1:
            return simplify(Kron(self.expr(r, strict), self.expr(parts[0], strict)))
        if not sp.is_fixed(r) and all(sp.is_fixed(p) for p in parts):  # units of k positions each ([g0, u0, g1, u1, ...])
            return simplify(Kron(self.expr(r, strict), Fixed(sp.size[parts[0]])))
        if sp.is_fixed(r):
            return simplify(Concat([self.expr(p, strict) for p in parts]))
        if s in self.kron_blocks:
            units, k = self.kron_blocks[s]
            return simplify(Kron(Units(self._gid(("block", r, tuple(units)), n // k, len(parts), False, None)), Fixed(k)))
        if s in self.interleaved:
            return simplify(Interleave([self._block_expr(r, col) for col in self.interleaved[s]], len(parts)))
        key = ("block", r, tuple(parts))
        return Units(self._gid(key, n, len(parts), False, None))

    def _block_expr(self, r: int, col: list[int]) -> Expr:
        """The group whose block ``j`` is ``col[j]``; when every piece is fixed (RoPE's Q/K rows), the
        blocks still move with ``r``, their insides in place: ``kron(r, fixed)``."""
        if all(self.sp.is_fixed(p) for p in col):
            return simplify(Kron(self.expr(r), Fixed(self.sp.size[col[0]])))
        return Units(self._gid(("block", r, tuple(col)), sum(self.sp.size[p] for p in col), len(col), False, None))

    def _gid(self, key: tuple, size: int, blocks: int, fixed: bool, reason: str | None) -> int:
        gid = self.keys.get(key)
        if gid is None:
            gid = len(self.groups)
            self.keys[key] = gid
            self.groups.append(Group(gid, size, blocks, fixed, reason))
        return gid


def build_spec(prop: Propagation) -> tuple[MergeSpec, dict[str, list[Expr | None] | None]]:
    """The MergeSpec of a finished propagation pass (:meth:`Propagator.result`), and value axes.

    The second result maps each IR node with a tensor output to one expression per axis
    (``None`` for an axis whose units depend on another axis and include a free group).
    """
    sp: SpaceTable = prop.spaces
    buffers = set(prop.buffer_names)
    while True:
        sp.close()
        b = _Builder(sp)
        axes = _param_axes(prop, b)
        for alias, canon in prop.aliases.items():  # tied weights: every name of the tensor
            if canon in axes:
                axes[alias] = axes[canon]
        for name in prop.frozen:  # not in the state_dict: not the spec's business
            axes.pop(name, None)
        if b.bad or b.nested:
            for r in b.bad:
                sp.fix(r, "")
                sp.note(r, "blocks whose structure no permutation can follow (parts shared or reused elsewhere)")
            for parts in b.nested:
                for p in parts:
                    sp.fix(p, "")
                    sp.note(p, "inside blocks indexed by units that are themselves in blocks")
                    sp.union(parts[0], p)
            continue
        # units that only buffers carry (the unused tail of position_ids) have nothing to merge: fix
        # their spaces (not just the group, so that whatever is coupled to them stays put too)
        lone = _buffer_only_spaces(b, axes, buffers)
        if not lone:
            break
        for space in lone:
            sp.fix(space, "only buffers carry these units (no parameter to merge)")
    _couple(b)
    for name, exprs in axes.items():
        for axis, e in enumerate(exprs):
            for gid in group_ids(e):
                b.groups[gid].members.append((name, axis))
    _add_probes(prop, b)
    value_axes = _value_axes(prop, b)
    # keep only groups that index parameters; renumber densely in order of first appearance
    used = [g for g in b.groups if g.members]
    remap = {g.id: i for i, g in enumerate(used)}
    sizes = {g.id: g.size for g in b.groups}
    for g in used:
        for p in g.probes:
            p.expr = renumber(p.expr, remap, sizes)
    axes = {k: [renumber(e, remap, sizes) for e in v] for k, v in axes.items()}
    for g in used:
        g.id = remap[g.id]
        g.coupled = tuple(remap[c] for c in g.coupled if c in remap)
        g.members = list(dict.fromkeys(g.members))
    consumed = _consumed(prop, axes)
    shapes = {name: tuple(prop.attr_shapes[prop.canonical.get(name, name)]) for name in axes}
    buffers = [name for name in axes if name in buffers]
    value_axes = {
        k: [None if e is None else renumber(e, remap, sizes) for e in v] if isinstance(v, list) else None
        for k, v in value_axes.items()
    }
    return MergeSpec(used, axes, shapes, list(prop.warnings), consumed, buffers, _fixed_axes(prop, axes)), value_axes


def _fixed_axes(prop: Propagation, axes: dict[str, list[Expr]]) -> dict[str, dict[int, str]]:
    """Why each parameter axis that no group covers keeps its order (``Fixed`` of more than one position)."""
    out: dict[str, dict[int, str]] = {}
    for name, exprs in axes.items():
        canon = prop.canonical.get(name, name)
        for axis, e in enumerate(exprs):
            if isinstance(e, Fixed) and e.n > 1:
                space = prop.attr_spaces.get((canon, axis))
                why = prop.spaces.why(space) if space is not None else "never read by the traced forward"
                out.setdefault(name, {})[axis] = why
    return out


def _couple(b: _Builder) -> None:
    """Couplings: block groups that share a block space. A block space that is also a group of its
    own (whole heads: a per-head bias table's columns, T5's relative_attention_bias; Q/K rows
    kron(heads, fixed) when RoPE fixes the head dimensions) moves with those blocks: it joins the
    coupling as a block group of one-unit blocks."""
    by_block: dict[int, list[int]] = {}
    for key, gid in b.keys.items():
        if key[0] == "block":
            by_block.setdefault(key[1], []).append(gid)
    for r, gids in by_block.items():
        atom = b.keys.get(("atom", r))
        if atom is not None:
            b.groups[atom].blocks = b.groups[atom].size
            gids.append(atom)
        for gid in gids:
            b.groups[gid].coupled = tuple(x for x in gids if x != gid)


def _consumed(prop: Propagation, axes: dict[str, list[Expr]]) -> dict[str, list[int]]:
    """The axes each parameter reads its units along, for every name of a tied tensor."""
    consumed: dict[str, list[int]] = {}
    for name, axis in sorted(prop.consumed):
        consumed.setdefault(name, []).append(axis)
    for alias, canon in prop.aliases.items():
        if canon in consumed and alias in axes:
            consumed[alias] = list(consumed[canon])
    return consumed


def _buffer_only_spaces(b: _Builder, axes: dict[str, list[Expr]], buffers: set[str]) -> list[int]:
    """The spaces of the free groups whose every member is a buffer."""
    users: dict[int, set[str]] = {}
    for name, exprs in axes.items():
        for e in exprs:
            for gid in group_ids(e):
                users.setdefault(gid, set()).add(name)
    out: list[int] = []
    for key, gid in b.keys.items():
        names = users.get(gid)
        if names and not b.groups[gid].fixed and names <= buffers:
            out += [key[1]] + (list(key[2]) if key[0] == "block" else [])
    return out


def _param_axes(prop: Propagation, b: _Builder) -> dict[str, list[Expr]]:
    axes: dict[str, list[Expr]] = {}
    for name, shape in prop.attr_shapes.items():
        exprs = []
        for axis, n in enumerate(shape):
            inner = prop.inner_params.get((name, axis))
            if inner is not None:
                exprs.append(GroupedIn(b.expr(inner[0]), inner[1]))
            elif (name, axis) in prop.attr_spaces:
                exprs.append(b.expr(prop.attr_spaces[(name, axis)]))
            else:
                exprs.append(Fixed(n))
        axes[name] = exprs
    return axes


def _add_probes(prop: Propagation, b: _Builder) -> None:
    graph = prop.graph
    flattened: list[tuple[int, Probe]] = []
    of_params: set[str] = set()  # parameters and what is computed from them alone (a slice of a weight)
    for name in graph.graph["order"]:
        node = graph.nodes[name]["fx"]
        inputs = node.all_input_nodes
        if node.op == "get_attr" or (node.op.startswith("call_") and inputs and all(a.name in of_params for a in inputs)):
            of_params.add(name)
    for name in graph.graph["order"]:
        attrs = graph.nodes[name]
        v = attrs.get("value")
        if v is None or isinstance(v, list) or attrs["op"] in ("placeholder", "get_attr", "output") or name in prop.stale:
            continue  # (a value written in place later would be read before it is written)
        consumer = any(_has_params(prop, graph.nodes[u], of_params) for u in graph.successors(name))
        producer = _has_params(prop, attrs, of_params)
        if not (consumer or producer):
            continue
        free = _free_axes(b, v.layout)
        for axis, L in enumerate(v.layout):
            if isinstance(L, Dep):  # units that depend on the axis before: the two axes flattened, for a
                gid = _block_group(b, v.layout, axis)  # group with no other probe (experts x hidden units)
                mixed = tuple(a for a in free if a not in (axis - 1, axis))
                if gid is not None:
                    flattened.append((gid, Probe(name, axis - 1, Units(gid), consumer, span=2, mixed=mixed)))
                elif _fixed_blocks(b, v.layout, axis):  # experts in place (a top-k router): a group per expert
                    e = simplify(Concat([b.expr(p, strict=False) for p in L.parts]))
                    flattened += [(gid, Probe(name, axis - 1, e, consumer, span=2, mixed=mixed)) for gid in group_ids(e)
                                  if not b.groups[gid].fixed]
                continue
            e = b.expr(L, strict=False)
            for gid in group_ids(e):
                if not b.groups[gid].fixed:
                    b.groups[gid].probes.append(Probe(name, axis, e, consumer, mixed=tuple(a for a in free if a != axis)))
    for gid, probe in flattened:
        if not any(p.span == 1 for p in b.groups[gid].probes):
            b.groups[gid].probes.append(probe)
    for name, key, handler, L in prop.internal_probes:
        e = b.expr(L, strict=False)
        for gid in group_ids(e):
            if not b.groups[gid].fixed:
                b.groups[gid].probes.append(Probe(name, -1, e, False, key, handler))
    for g in b.groups:
        g.probes.sort(key=lambda p: not p.consumer)


def _free_axes(b: _Builder, layout: list) -> list[int]:
    """The axes of a value that carry units to be matched (a free group among their spaces)."""
    def free(L: object) -> bool:
        if isinstance(L, Dep):
            return any(not b.sp.is_fixed(s) for s in b.sp.leaves(L))
        return any(not b.groups[g].fixed for g in group_ids(b.expr(L, strict=False)))

    return [axis for axis, L in enumerate(layout) if free(L)]


def _fixed_blocks(b: _Builder, layout: list, axis: int) -> bool:
    """Whether the Dep at ``axis`` has one plain part per position of a fixed axis just before it."""
    L, sp = layout[axis], b.sp
    return (axis > 0 and L.ref == axis - 1 and isinstance(layout[axis - 1], int) and sp.is_fixed(layout[axis - 1])
            and all(isinstance(p, int) for p in L.parts))


def _block_group(b: _Builder, layout: list, axis: int) -> int | None:
    """The free block group whose blocks are indexed by axis ``axis - 1`` and whose insides are the
    parts of the Dep at ``axis`` (experts x hidden units), if there is one."""
    L, sp = layout[axis], b.sp
    if axis == 0 or L.ref != axis - 1 or not isinstance(layout[axis - 1], int) or not all(isinstance(p, int) for p in L.parts):
        return None
    gid = b.keys.get(("block", sp.find(layout[axis - 1]), tuple(sp.find(p) for p in L.parts)))
    return gid if gid is not None and not b.groups[gid].fixed else None


def _value_axes(prop: Propagation, b: _Builder) -> dict[str, list[Expr | None] | None]:
    out: dict[str, list[Expr | None] | None] = {}
    sp = prop.spaces
    for name in prop.graph.graph["order"]:
        v = prop.graph.nodes[name].get("value")
        if v is None or isinstance(v, list):
            out[name] = None
            continue
        exprs = []
        for L in v.layout:
            if isinstance(L, Dep):
                free = [s for s in sp.leaves(L) if not sp.is_fixed(s)]
                exprs.append(None if free else Fixed(sp.layout_size(L)))
            else:
                exprs.append(b.expr(L, strict=False))
        out[name] = exprs
    return out


def _has_params(prop: Propagation, attrs: dict, of_params: set[str]) -> bool:
    if attrs["op"] == "call_module":
        m = prop.modules.get(attrs["fx"].target)
        return m is not None and any(True for _ in m.parameters(recurse=False))
    if attrs["op"] == "call_function":  # a parameter, or a slice of one (F.multi_head_attention_forward's q / kv weights)
        return any(a.name in of_params for a in attrs["fx"].all_input_nodes)
    return False

