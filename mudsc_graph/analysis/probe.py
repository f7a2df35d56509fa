"""The numerical equivariance probe: how an op that no handler describes moves units.

A layer handler states an op's semantics. For the long tail (an ATen operator, a custom op, a
method or a parameter-free leaf module that nobody wrote a handler for) the analysis *measures*
them instead: the op is run on its traced inputs, each unit space its inputs carry is permuted at
random, and the output axes that carry the same permutation are recorded. Two trials with fresh
values and permutations, tolerance relative to the output's scale.

For every class of input axes (the axes of one space; spaces that only move together are joined,
as a binary op joins its operands) the probe finds, per output, the axes that show the class's
permutation, or none (a reduction over it: the output does not depend on its order). What it
cannot explain (sorting, data-dependent indexing, random ops) fixes the spaces involved, exactly
as an op without a handler did before. Head structure (a :class:`~.spaces.Dep` layout) passes
through an op whose axis map keeps the block axis, after a second check with an independent
permutation per block; otherwise its blocks are joined (one permutation for all of them: sound,
less merged).

Results are cached per (op, argument structure, shapes, dtypes, layout pattern), so a layer
repeated 32 times is measured once. Concrete argument values come from one run of the graph on
the example inputs (:class:`Samples`), for every node without a handler at once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .spaces import Dep, Layout

RTOL = 1e-4  # of the output's scale: permuted float32 sums differ by rounding only
TRIALS = 2


class Samples:
    """Concrete inputs of chosen nodes, from one run of the graph on the example inputs.

    ``wanted``: names of the nodes whose inputs to keep (those without a handler), all captured by
    the first run; a node asked for later (a handler that gave up) is captured by a run that stops
    right after it. ``captured[node]``: the values of the nodes it reads, by name.
    """

    def __init__(self, gm: fx.GraphModule, values: list[Any], wanted: set[str]) -> None:
        self.gm, self.values, self.wanted = gm, values, set(wanted)
        self.captured: dict[str, dict[str, Any]] = {}
        self._ran = False

    def inputs_of(self, node: fx.Node) -> dict[str, Any] | None:
        if node.name not in self.captured:
            late = node.name not in self.wanted
            self.wanted.add(node.name)
            if late or not self._ran:
                self._run(stop_after=node.name if self._ran else None)
        return self.captured.get(node.name)

    def _run(self, stop_after: str | None) -> None:
        samples = self

        class _Stop(Exception):
            pass

        class _Capture(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                if n.name in samples.wanted and n.name not in samples.captured:
                    samples.captured[n.name] = {m.name: pytree.tree_map(_detach, self.env[m]) for m in n.all_input_nodes}
                out = super().run_node(n)
                if n.name == stop_after:
                    raise _Stop
                return out

        try:
            with torch.no_grad():
                _Capture(self.gm).run(*self.values)
        except _Stop:
            pass
        except Exception:  # the graph ran when its shapes were recorded; a failure here only means no samples
            pass
        self._ran = True


def _detach(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


@dataclass
class Operand:
    """A tensor the op reads: where it sits among the flattened arguments (or the module's
    parameter name), its example value, one layout per axis, and whether it is computed from
    parameters alone (a weight: an axis it is summed over is one it reads)."""

    leaf: int | str
    value: torch.Tensor
    layout: list[Layout]
    constant: bool = False


@dataclass
class Finding:
    """What the probe measured. ``sources[o][k]``: the operand axes ``(operand index, axis)`` whose
    units output ``o``'s axis ``k`` carries (empty: none, a fresh fixed axis); ``keep_blocks``:
    whether block structure passes (Dep layouts rebased) or is joined; ``fixed``: operand axes the
    op reads in an order-dependent way; ``links``: operand axes of different spaces that only move
    together (and so index the same units); ``reduced``: operand axes the output does not depend
    on the order of (summed over, alone or against the other axes of their link); ``copies``: output
    axes with no source along which the output is constant (a broadcast: any permutation leaves it
    as it is, so they may join any space, as ``expand``'s new axes do)."""

    sources: list[list[list[tuple[int, int]]]]
    keep_blocks: bool
    fixed: list[tuple[int, int]]
    links: list[list[tuple[int, int]]]
    reduced: list[tuple[int, int]]
    copies: list[tuple[int, int]]


class Prober:
    """Measures ops. ``find``/``free``/``size`` read the space table (never written here)."""

    def __init__(self, find: Callable[[int], int], free: Callable[[int], bool], size: Callable[[int], int], seed: int = 0) -> None:
        self.find, self.free, self.size = find, free, size
        self.cache: dict[Any, Finding | None] = {}
        self.gen = torch.Generator().manual_seed(seed)

    # -- the op as a function of its operands -------------------------------------------------
    def measure(self, fn: Callable[[list[torch.Tensor]], list[torch.Tensor]], operands: list[Operand], out_shapes: list[tuple],
                key: Any) -> Finding | None:
        """The finding for ``fn`` (operands -> flat outputs); ``None``: the op could not be run or
        compared (the caller fixes what it touches)."""
        pattern = self._pattern(operands)
        full_key = (key, pattern) if key is not None else None
        if full_key is not None and full_key in self.cache:
            return self.cache[full_key]
        try:
            finding = self._measure(fn, operands, out_shapes)
        except Exception:  # an op that fails on jittered values: not understood
            finding = None
        if full_key is not None:
            self.cache[full_key] = finding
        return finding

    def _pattern(self, operands: list[Operand]) -> tuple:
        """Operand shapes, dtypes and layouts with spaces renamed by first appearance (and freeness),
        so that a repeated layer hits the cache."""
        names: dict[int, int] = {}

        def canon(L: Layout) -> Any:
            if isinstance(L, int):
                r = self.find(L)
                return (names.setdefault(r, len(names)), self.free(r))
            return ("dep", L.ref, tuple(canon(p) for p in L.parts))

        return tuple((o.leaf, tuple(o.value.shape), o.value.dtype, tuple(canon(L) for L in o.layout), _digest(o.value)) for o in operands)

    def _measure(self, fn: Callable, operands: list[Operand], out_shapes: list[tuple]) -> Finding | None:
        trials = [self._inputs(operands) for _ in range(TRIALS)]
        bases = [self._run(fn, xs, out_shapes) for xs in trials]
        if any(b is None for b in bases):
            return None
        classes = self._classes(operands, free=True)
        settled = self._classes(operands, free=False)
        size = lambda axes: self._class_size(operands, axes)  # noqa: E731
        test = lambda group: self._axis_test(fn, operands, trials, bases, out_shapes, group)  # noqa: E731
        found: dict[int, dict[int, tuple[int, ...]] | None] = {c: test([axes]) for c, axes in enumerate(classes)}
        # classes that only move together (the operands of a binary op): those of one size jointly;
        # then each with a settled axis of its size (a weight's columns reading a model input)
        links: list[list[tuple[int, int]]] = []
        stuck = [c for c, r in found.items() if r is None]
        for n in sorted({size(classes[c]) for c in stuck}):
            group = [c for c in stuck if size(classes[c]) == n]
            r = test([classes[c] for c in group]) if len(group) > 1 else None
            if r is not None:
                found.update({c: r for c in group})
                links.append([ax for c in group for ax in classes[c]])
                continue
            for c in group:
                for axes in (f for f in settled if size(f) == n):
                    r = test([classes[c], axes])
                    if r is not None:
                        found[c] = r
                        links.append(classes[c] + axes)
                        break
        self._one_claim_per_axis(operands, classes, found, links)
        fixed = [ax for c, r in found.items() if r is None for ax in classes[c]]
        sources: list[list[list[tuple[int, int]]]] = [[[] for _ in s] for s in out_shapes]
        for c, r in found.items():
            for o, ks in (r or {}).items():
                for k in ks:
                    sources[o][k] += classes[c]
        keep = self._blocks_pass(fn, operands, trials, bases, out_shapes, sources, links)
        reduced = [ax for c, r in found.items() if r == {} for ax in classes[c]]
        copies = [(o, k) for o, row in enumerate(sources) for k, ss in enumerate(row)
                  if not ss and out_shapes[o][k] > 1 and all(_constant_along(b[o], k) for b in bases)]
        return Finding(sources, keep, fixed, links, reduced, copies)

    @staticmethod
    def _one_claim_per_axis(operands: list[Operand], classes: list, found: dict, links: list) -> None:
        """Classes tested apart that each move the same output axis are not one space: moving both
        would move that axis twice (a gather whose index tensor and source can each be permuted
        alone). The first (a float operand's first) keeps the axis; the others are fixed."""
        linked = {ax: g for g, group in enumerate(links) for ax in group}
        claims: dict[tuple[int, int], list[int]] = {}
        for c, r in found.items():
            for o, ks in (r or {}).items():
                for k in ks:
                    claims.setdefault((o, k), []).append(c)
        for cs in claims.values():
            units = list(dict.fromkeys(linked.get(classes[c][0], ("class", c)) for c in cs))
            if len(units) < 2:
                continue
            floats = [c for c in cs if operands[classes[c][0][0]].value.is_floating_point()]
            keep = linked.get(classes[(floats or cs)[0]][0], ("class", (floats or cs)[0]))
            for c in cs:
                if linked.get(classes[c][0], ("class", c)) != keep:
                    found[c] = None

    def _inputs(self, operands: list[Operand]) -> list[torch.Tensor]:
        """Fresh values of the example's kind: floats jittered multiplicatively (signs and zeros kept,
        so a log or a mask stays valid; a constant tensor becomes random), integers and booleans as given."""
        out = []
        for o in operands:
            t = o.value
            if t.is_floating_point() or t.is_complex():
                noise = torch.randn(t.shape, generator=self.gen).to(t.dtype)
                if t.numel() > 1 and bool((t == t.reshape(-1)[0]).all()):
                    t = noise + (t.reshape(-1)[0] if torch.isfinite(t.reshape(-1)[0]) else 0)
                else:
                    t = t * torch.exp(0.3 * noise)
            out.append(t)
        return out

    def _run(self, fn: Callable, xs: list[torch.Tensor], out_shapes: list[tuple]) -> list[torch.Tensor] | None:
        with torch.no_grad():
            outs = fn([x.clone() for x in xs])
        if len(outs) != len(out_shapes) or any(tuple(o.shape) != tuple(s) for o, s in zip(outs, out_shapes)):
            return None
        return [o.detach() for o in outs]

    def _classes(self, operands: list[Operand], free: bool) -> list[list[tuple[int, int]]]:
        """Operand axes grouped by the space they index (a Dep axis: by its parts together): those
        with units to permute (``free``), or those whose spaces are settled; axes of one unit never."""
        by_key: dict[Any, list[tuple[int, int]]] = {}
        for i, o in enumerate(operands):
            for a, L in enumerate(o.layout):
                if o.value.shape[a] <= 1 or any(self.free(s) for s in _leaves(L)) != free:
                    continue
                key = self.find(L) if isinstance(L, int) else tuple(self.find(s) for s in _leaves(L))
                by_key.setdefault(key, []).append((i, a))
        return list(by_key.values())

    def _class_size(self, operands: list[Operand], axes: list[tuple[int, int]]) -> int:
        i, a = axes[0]
        return int(operands[i].value.shape[a])

    def _axis_test(self, fn: Callable, operands: list[Operand], trials: list, bases: list, out_shapes: list[tuple],
                   group: list[list[tuple[int, int]]]) -> dict[int, tuple[int, ...]] | None:
        """Permute every axis of ``group`` by one permutation: ``{output: axes showing it}`` (an
        output whose axes show none of it: absent), the same in every trial; ``None``: no explanation."""
        axes = [ax for cls in group for ax in cls]
        n = self._class_size(operands, axes)
        if any(operands[i].value.shape[a] != n for i, a in axes):
            return None
        answer: dict[int, tuple[int, ...]] | None = None
        for xs, base in zip(trials, bases):
            p = _derangement(n, self.gen)
            moved = list(xs)
            for i, a in axes:
                moved[i] = moved[i].index_select(a, p)
            out = self._run(fn, moved, out_shapes)
            if out is None:
                return None
            got: dict[int, tuple[int, ...]] = {}
            for o, (b, y) in enumerate(zip(base, out)):
                ks = _explain(b, y, p)
                if ks is None:
                    return None
                if ks:
                    got[o] = ks
            if answer is not None and got != answer:
                return None
            answer = got
        return answer

    def _blocks_pass(self, fn: Callable, operands: list[Operand], trials: list, bases: list, out_shapes: list[tuple],
                     sources: list, links: list[list[tuple[int, int]]]) -> bool:
        """Whether Dep layouts may pass rebased (and linked block by block): each operand's block
        axis maps to one output axis, and an independent permutation per block (and per space,
        linked spaces sharing theirs) commutes with the op."""
        deps = [(i, a) for i, o in enumerate(operands) for a, L in enumerate(o.layout) if isinstance(L, Dep) and any(self.free(s) for s in _leaves(L))]
        if not deps:
            return True
        if any(not all(isinstance(p, int) for p in operands[i].layout[a].parts) for i, a in deps):
            return False
        shared = self._aliases(operands, links)
        layouts = out_layouts(operands, sources, keep_blocks=True)
        if shared is None or layouts is None:
            return False
        alias, settled = shared
        for xs, base in zip(trials, bases):
            perms: dict[int, torch.Tensor | None] = {}

            def perm_of(s: int) -> torch.Tensor | None:
                r = alias.get(self.find(s), self.find(s))
                if r not in perms:
                    perms[r] = _derangement(self.size(r), self.gen) if self.free(r) and r not in settled else None
                return perms[r]

            try:
                moved = [act(x, o.layout, perm_of) for x, o in zip(xs, operands)]
                out = self._run(fn, moved, out_shapes)
                want = [act(b, L, perm_of) for b, L in zip(base, layouts)]
            except _CannotAct:
                return False
            if out is None or not all(_close(w, y) for w, y in zip(want, out)):
                return False
        return True

    def _aliases(self, operands: list[Operand], links: list[list[tuple[int, int]]]) -> tuple[dict[int, int], set[int]] | None:
        """Linked spaces share one permutation: ``{space root: representative}`` (Dep layouts paired
        block by block), and the representatives that include a settled space (they stay put).
        ``None`` when a link pairs a Dep with a plain axis or Deps of different blocks."""
        alias: dict[int, int] = {}
        settled: set[int] = set()

        def rep(r: int) -> int:
            while alias.get(r, r) != r:
                r = alias[r]
            return r

        for group in links:
            layouts = [operands[i].layout[a] for i, a in group]
            deps = [L for L in layouts if isinstance(L, Dep)]
            if deps and (len(deps) != len(layouts) or len({len(L.parts) for L in deps}) != 1):
                return None
            columns = list(zip(*[L.parts for L in deps])) if deps else [tuple(layouts)]
            for column in columns:
                roots = [rep(self.find(s)) for s in column]
                for r in roots[1:]:
                    if r != roots[0]:
                        alias[r] = roots[0]
                if not all(self.free(r) for r in roots):
                    settled.add(roots[0])
        return {r: rep(r) for r in list(alias)}, {rep(r) for r in settled}


class _CannotAct(Exception):
    pass


def out_layouts(operands: list[Operand], sources: list, keep_blocks: bool) -> list[list[Layout | None]] | None:
    """Each output axis's layout from its first source, with a Dep's block axis re-indexed to the
    output axis that carries that operand's block axis (``None``: an axis with no source, or, without
    ``keep_blocks``, the Dep collapsed by the caller). ``None`` if a block axis has no single image."""
    result = []
    for srcs in sources:
        image: dict[int, dict[int, int]] = {}  # operand -> {its axis: this output's axis}
        for k, ss in enumerate(srcs):
            for i, a in ss:
                image.setdefault(i, {})[a] = k
        row: list[Layout | None] = []
        for ss in srcs:
            if not ss:
                row.append(None)
                continue
            i, a = ss[0]
            L = operands[i].layout[a]
            if isinstance(L, Dep):
                if not keep_blocks:
                    row.append(L)  # collapsed by the caller
                    continue
                ref = image.get(i, {}).get(L.ref)
                if ref is None:
                    return None
                L = Dep(ref, L.parts)
            row.append(L)
        result.append(row)
    return result


def act(t: torch.Tensor, layout: list[Layout | None], perm_of: Callable[[int], torch.Tensor | None]) -> torch.Tensor:
    """``t`` permuted as its layouts say: a plain axis by its space's permutation; a Dep axis block by
    block (in the old block order), then the block axis itself."""
    for a, L in enumerate(layout):
        if isinstance(L, Dep):
            if L.ref == a or not all(isinstance(p, int) for p in L.parts) or len(L.parts) != t.shape[L.ref]:
                raise _CannotAct
            inner = a - (1 if L.ref < a else 0)
            pieces = []
            for j, part in enumerate(L.parts):
                s = t.select(L.ref, j)
                p = perm_of(part)
                pieces.append(s if p is None else s.index_select(inner, p))
            t = torch.stack(pieces, dim=L.ref)
    for a, L in enumerate(layout):
        if isinstance(L, int):
            p = perm_of(L)
            if p is not None:
                t = t.index_select(a, p)
    return t


def _digest(t: torch.Tensor) -> Any:
    """Integer and boolean operands are used as they are (indices, masks): their values are part of
    what was measured, so of the cache key. Floats are replaced by jittered values anyway."""
    if t.is_floating_point() or t.is_complex():
        return None
    return hash(t.detach().cpu().contiguous().numpy().tobytes()) if t.numel() <= 1 << 16 else id(t)


def _leaves(L: Layout) -> list[int]:
    if isinstance(L, int):
        return [L]
    return [s for p in L.parts for s in _leaves(p)]


def _derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation that moves every unit (so no axis passes the test by luck)."""
    p = torch.randperm(n, generator=gen)
    if n > 1:
        fixed = p == torch.arange(n)
        while bool(fixed.any()):
            p = torch.randperm(n, generator=gen)
            fixed = p == torch.arange(n)
    return p


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return bool(torch.equal(a, b))
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    fa, fb = a.double(), b.double()
    finite = torch.isfinite(fa)
    same = (fa == fb) | (fa.isnan() & fb.isnan())  # infinities and NaNs where they were
    if not bool((finite == torch.isfinite(fb)).all()) or not bool(same[~finite].all()):
        return False
    scale = float(fa[finite].abs().max()) if bool(finite.any()) else 0.0
    return bool(((fa[finite] - fb[finite]).abs() <= RTOL * scale + 1e-30).all())


def _explain(base: torch.Tensor, out: torch.Tensor, p: torch.Tensor) -> tuple[int, ...] | None:
    """The axes of ``base`` along which ``p`` turns it into ``out``: ``()`` when out equals base;
    the smallest set of equal-size axes (up to three); ``None`` when none does."""
    if _close(base, out):
        return ()
    n = len(p)
    cands = [k for k, m in enumerate(base.shape) if m == n]
    for r in range(1, min(3, len(cands)) + 1):
        for ks in itertools.combinations(cands, r):
            y = base
            for k in ks:
                y = y.index_select(k, p)
            if _close(y, out):
                return ks
    return None


def _constant_along(t: torch.Tensor, k: int) -> bool:
    return _close(t, t.narrow(k, 0, 1).expand_as(t).contiguous())
