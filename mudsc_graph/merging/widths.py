"""Width budgets: a merged group wider than one model's (``merge(..., width=1.5)``).

A group of ``O`` units merged at width ``w`` has ``O + round((w - 1) * O)`` merged units (rounded
half up; whole blocks for heads and GroupNorm groups: ``G + round((w - 1) * G)`` blocks), between ``O`` (today's
merge, width 1) and ``N * O`` (every unit of every model kept: the ensemble's units). The matcher
leaves the least similar units unmerged (zip stops fusing early; align detaches its weakest pairs).

The merged module is then rebuilt with the new widths (:func:`resize_module`): every tensor takes
its merged shape, and the attributes torch's layers keep of their sizes (``in_features``,
``num_features``, ``normalized_shape``, ...) and an attention layer's head count follow. Whether a
model's code can run at a group's new width is checked before matching, on the meta device (no
memory, no arithmetic): a group whose widening the forward cannot take (a size fixed in code, such
as ``nn.MultiheadAttention``'s inner width, or a fused tensor whose blocks are interleaved) stays at
one model's width, with a warning saying which and why. A Hugging Face model's config is rewritten
with the new sizes (:func:`widened_config`), or the width is refused where no config expresses them
(one ``intermediate_size`` for every layer).
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import MergeError
from ..spec.axes import GroupedIn, group_ids, match, size
from ..spec.merge_spec import MergeSpec
from .weights import apply_along

#: Attributes that hold an attention layer's number of heads (torch, timm, Hugging Face, ours).
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "num_key_value_heads", "num_kv_heads",
                   "n_kv_heads")
#: Attributes that hold the total width of an attention layer's heads (heads x head size).
HEADS_WIDTH_ATTRIBUTES = ("all_head_size", "inner_dim", "attn_dim")


def check_width(width: Any, n_models: int | None = None) -> None:
    """``width``: a number between 1 and N, or a mapping of group ids / parameter names to such numbers."""
    values = width.values() if isinstance(width, Mapping) else [width]
    for key in (width if isinstance(width, Mapping) else ()):
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise MergeError(f"a width= key must be a group id or a parameter or module name, got {key!r}")
    top = n_models if n_models is not None else float("inf")
    for w in values:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 < w <= top:
            raise MergeError(f"width must be a number above 0 (below 1: narrower than one model, zip only) and at most "
                             f"{n_models or 'N'} (the number of models: every unit kept), got {w!r}")


def _produced(spec: MergeSpec, gid: int) -> list[str]:
    """The tensors that produce group ``gid``'s units (it is on an axis they do not read: a Linear's
    rows, a norm's weight), the names a ``width=`` mapping is matched against."""
    return [name for name, axis in spec.groups[gid].members if axis not in spec.consumed.get(name, ())]


def _names(key: str, names: list[str]) -> bool:
    return any(n == key or n.startswith(key + ".") for n in names)


def width_of(spec: MergeSpec, gid: int, width: Any) -> float:
    """The width asked for group ``gid``: the number, or the largest of the mapping's entries that
    name the group (its id, or a parameter or module that produces its units)."""
    if not isinstance(width, Mapping):
        return float(width)
    names = _produced(spec, gid)
    found = [float(w) for key, w in width.items() if key == gid or (isinstance(key, str) and _names(key, names))]
    return max(found, default=1.0)


def _check_keys(spec: MergeSpec, width: Mapping) -> None:
    names = [name for g in spec.groups for name in _produced(spec, g.id)]
    for key in width:
        if isinstance(key, int) and not 0 <= key < len(spec.groups):
            raise MergeError(f"width= names group {key}, but the model has groups 0..{len(spec.groups) - 1} (see mudsc inspect)")
        if isinstance(key, str) and not _names(key, names):
            raise MergeError(f"width= names {key!r}, which produces no merge group's units (name a parameter or module; "
                             "see mudsc inspect)")


def rigid_groups(spec: MergeSpec) -> dict[int, str]:
    """Groups whose width the structure of a tensor that holds them fixes: ``{gid: why}``."""
    out: dict[int, str] = {}

    def walk(e: Any, name: str) -> None:
        def note(why: str) -> None:
            for g in group_ids(e):
                out.setdefault(g, f"{name} {why}")

        match(e, units=lambda g: None, fixed=lambda n: None,
              concat=lambda parts: [walk(p, name) for p in parts],
              kron=lambda a, b: (walk(a, name), walk(b, name)),
              grouped_in=lambda space, groups: note("is a grouped convolution's weight (its groups are fixed)"),
              interleave=lambda parts, blocks: note("interleaves its blocks with other groups' (a fused head-major tensor)"))

    for name, exprs in spec.axes.items():
        for e in exprs:
            walk(e, name)
    return out


def target_units(spec: MergeSpec, gids: list[int], width: Any, n_models: int) -> dict[int, int]:
    """``{gid: merged units}`` of the groups ``width`` widens or narrows (width below 1, plain groups
    only: heads and GroupNorm groups keep their count); coupled groups get one block count (the
    largest asked of them)."""
    check_width(width, n_models)
    if isinstance(width, Mapping):
        _check_keys(spec, width)
    out: dict[int, int] = {}
    wanted = set(gids)
    for gid in gids:
        group = spec.groups[gid]
        coupling = [gid, *(c for c in group.coupled if c in wanted)]
        w = max(width_of(spec, g, width) for g in coupling)
        count, each = (group.blocks, group.block_size) if group.blocks > 1 else (group.size, 1)  # whole blocks, or units
        more = min(math.floor((w - 1.0) * count + 0.5), (n_models - 1) * count)  # rounded half up
        if group.blocks > 1:
            more = max(more, 0)  # heads and GroupNorm groups never narrow: their count is the model's
        more = max(more, 1 - count)  # at least one unit
        if more != 0:
            out[gid] = each * (count + more)
    return out


def merged_shapes(spec: MergeSpec, units: Mapping[int, int]) -> dict[str, tuple[int, ...]]:
    """The shape every tensor of the spec has when its groups have ``units`` merged units (only the
    tensors whose shape changes)."""
    sizes = {g.id: units.get(g.id, g.size) for g in spec.groups}
    out = {}
    for name, exprs in spec.axes.items():
        old = tuple(spec.shapes[name])
        if not any(g in units for e in exprs for g in group_ids(e)):
            continue
        new = tuple(d if isinstance(e, GroupedIn) else size(e, sizes) for d, e in zip(old, exprs))
        if new != old:
            out[name] = new
    return out


def resize_module(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], heads: Mapping[str, tuple[int, int, int]] | None = None) -> None:
    """Give ``model``'s tensors named in ``shapes`` those shapes (new, zero tensors of the same dtype,
    device and ``requires_grad``; a tensor tied under several names stays tied), then update the
    size attributes of torch's layers and, in the modules ``heads`` names (``{module path: (old
    heads, new heads, head size)}``) or their nearest parent that has one, the head count (and the
    heads' total width)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    holders: dict[int, list[tuple[nn.Module, str]]] = {}  # every place a tensor is held (tied weights: several)
    for module in modules.values():
        for table in (module._parameters, module._buffers):
            for attr, t in table.items():
                if t is not None:
                    holders.setdefault(id(t), []).append((module, attr))
    done: set[int] = set()
    for name, shape in shapes.items():
        path, _, attr = name.rpartition(".")
        module = modules.get(path)
        if module is None:
            raise MergeError(f"cannot resize {name!r}: the model has no module {path!r}")
        old = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
        if old is None:
            raise MergeError(f"cannot resize {name!r}: {path or 'the model'} has no parameter or buffer {attr!r}")
        if id(old) in done:
            continue
        done.add(id(old))
        t = torch.zeros(shape, dtype=old.dtype, device=old.device)
        new = nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
        for holder, key in holders[id(old)]:
            (holder._parameters if key in holder._parameters else holder._buffers)[key] = new
    for path, module in modules.items():
        _fit_attributes(module)
    for path, (old, new, each) in (heads or {}).items():
        parts = path.split(".") if path else []
        for k in range(len(parts), -1, -1):  # the module and its parents, nearest first
            module = modules.get(".".join(parts[:k]))
            hit = [a for a in HEAD_ATTRIBUTES if _is_int(getattr(module, a, None)) and getattr(module, a) == old]
            for a in hit:
                setattr(module, a, new)
            if hit:
                for a in HEADS_WIDTH_ATTRIBUTES:
                    if _is_int(getattr(module, a, None)) and getattr(module, a) == old * each:
                        setattr(module, a, new * each)
                break


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fit_attributes(m: nn.Module) -> None:
    """The size attributes of torch's layers, read back from their tensors."""
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = w.shape[0], w.shape[1]
    elif isinstance(m, _ConvNd) and isinstance(w, torch.Tensor):
        depthwise = m.groups > 1 and m.groups == m.in_channels and m.groups == m.out_channels
        if isinstance(m, _ConvTransposeNd):
            in_c, out_c = w.shape[0], w.shape[1] * m.groups
        else:
            out_c, in_c = w.shape[0], w.shape[1] * m.groups
        if depthwise:
            m.groups = in_c = out_c
        m.in_channels, m.out_channels = in_c, out_c
    elif isinstance(m, _NormBase):
        t = w if isinstance(w, torch.Tensor) else getattr(m, "running_mean", None)
        if isinstance(t, torch.Tensor):
            m.num_features = t.shape[0]
    elif isinstance(m, nn.LayerNorm) and isinstance(w, torch.Tensor):
        m.normalized_shape = tuple(w.shape)
    elif isinstance(m, nn.GroupNorm) and isinstance(w, torch.Tensor):
        per = m.num_channels // m.num_groups
        m.num_channels, m.num_groups = w.shape[0], w.shape[0] // per
    elif isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = w.shape[0], w.shape[1]
    elif isinstance(m, nn.RMSNorm) and isinstance(w, torch.Tensor):
        m.normalized_shape = tuple(w.shape)


def head_changes(spec: MergeSpec, units: Mapping[int, int]) -> dict[str, tuple[int, int, int]]:
    """``{module path: (old heads, new heads, head size)}`` for every module holding a widened block group."""
    out = {}
    for name, exprs in spec.axes.items():
        for e in exprs:
            for g in group_ids(e):
                group = spec.groups[g]
                if g in units and group.blocks > 1:
                    out[name.rpartition(".")[0]] = (group.blocks, units[g] // group.block_size, group.block_size)
    return out


def widened(model: nn.Module, spec: MergeSpec, units: Mapping[int, int]) -> nn.Module:
    """``model`` (in place) rebuilt for ``units``: its tensors in their merged shapes (zeros)."""
    resize_module(model, merged_shapes(spec, units), head_changes(spec, units))
    return model


def rebuild(model: nn.Module, info: Any, source: str = "checkpoint") -> nn.Module:
    """``model`` (freshly built, in place) resized as a merge's width metadata says (``{"shapes":
    {name: shape}, "heads": {module path: [old, new, head size]}}``, as ``mudsc merge`` records it),
    so a width-budget checkpoint loads into it; ``ValueError`` for metadata that is not of that form."""
    shapes, heads = (info.get("shapes"), info.get("heads", {})) if isinstance(info, Mapping) else (None, None)
    ok = isinstance(shapes, Mapping) and isinstance(heads, Mapping)
    ok = ok and all(isinstance(v, (list, tuple)) and all(_is_int(d) and d >= 0 for d in v) for v in shapes.values())
    ok = ok and all(isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_int(d) and d > 0 for d in v) for v in heads.values())
    if not ok:
        raise ValueError(f"{source}: its width metadata is not of the form mudsc merge writes; write the merge again")
    resize_module(model, {k: tuple(v) for k, v in shapes.items()}, {k: tuple(v) for k, v in heads.items()})
    return model


def net2net(model: nn.Module, spec: MergeSpec, units: Mapping[int, int], seed: int | None = None) -> nn.Module:
    """A wider copy of ``model`` that computes the same function (Net2Net, Chen et al. 2016): each
    group in ``units`` gets that many units, its first ones the model's own in order, the others
    copies of its units in turn (``seed``: drawn at random; heads and GroupNorm groups as whole blocks). A copied
    unit's producers (weight rows, biases, norm affines and statistics) are duplicated and its
    consumers' weights (``spec.consumed`` axes) split evenly among its copies. Exact wherever no
    layer normalises over the widened axis as a whole (a LayerNorm over a residual stream sees its
    copies twice); groups ``expressible`` refuses cannot be widened at all. A Hugging Face model's
    config says the new sizes (``MergeError`` where none can)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    chosen: dict[int, torch.Tensor] = {}  # coupled groups (Q/K and V/O of one attention layer) copy the same heads
    for gid, new in units.items():
        group = spec.groups[gid]
        each = group.block_size if group.blocks > 1 else 1
        old_blocks, new_blocks = group.size // each, new // each
        if new % each or new_blocks < old_blocks:
            raise MergeError(f"net2net: group {gid} has {group.size} units in blocks of {each}; {new} is not a wider whole number of blocks")
        extra = next((chosen[c] for c in group.coupled if c in chosen), None)
        if extra is None:
            extra = (torch.randint(old_blocks, (new_blocks - old_blocks,), generator=gen) if gen is not None
                     else torch.arange(new_blocks - old_blocks) % old_blocks)
        chosen[gid] = extra
        src = torch.cat([torch.arange(old_blocks), extra])
        src = (src[:, None] * each + torch.arange(each)).reshape(-1)  # units
        dup = torch.zeros(new, group.size)
        dup[torch.arange(new), src] = 1.0
        maps[gid] = (dup, dup / dup.sum(0, keepdim=True))  # (copies, consumers' split shares)
    sizes = {g.id: g.size for g in spec.groups}
    wide = copy.deepcopy(model)
    state = {k: v for k, v in model.state_dict().items()}
    widened(wide, spec, units)
    out = {}
    for name, t in state.items():
        exprs = spec.axes.get(name)
        if exprs is None or not torch.is_floating_point(t) or not any(g in units for e in exprs for g in group_ids(e)):
            out[name] = t
            continue
        consumed = set(spec.consumed.get(name, ()))
        x = t.double()
        for a, e in enumerate(exprs):
            pick = 1 if a in consumed else 0
            x = apply_along(x, a, e, lambda g, pick=pick: maps[g][pick].double() if g in maps else None, sizes)
        out[name] = x.to(t.dtype)
    if hasattr(getattr(wide, "config", None), "to_dict"):
        config = widened_config(model, {k: tuple(v.shape) for k, v in out.items()})
        if config is None:
            raise MergeError(f"net2net: {type(model.config).__name__} cannot say the sizes {describe(spec, units)}")
        adopt_config(wide, config)
    wide.load_state_dict(out)
    return wide


# -- what the model's code can take -------------------------------------------------------------------
def on_meta(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose tensors are on the meta device (no memory is copied)."""
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _shapes_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, Mapping):
        return {k: _shapes_of(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [_shapes_of(v) for v in out]
    return None


def _run(model: nn.Module, inputs: Any) -> Any:
    """The output shapes of ``model`` on ``inputs`` (a tuple or dict), or the exception it raised."""
    try:
        with torch.no_grad():
            out = model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)
        return _shapes_of(out)
    except Exception as exc:  # noqa: BLE001 - any failure of user code means "cannot take this width"
        return exc


def expressible(model: nn.Module, spec: MergeSpec, units: Mapping[int, int], example_inputs: Any) -> tuple[dict[int, int], dict[int, str]]:
    """The part of ``units`` the model's code can run with, and why each other group stays at one
    model's width (``{gid: reason}``). Checked on the meta device: the coupled groups of one
    attention layer are tried together, then all that passed together."""
    rigid = rigid_groups(spec)
    if any(isinstance(m, nn.GroupNorm) and not m.affine for m in model.modules()):  # no tensor says its channels
        rigid.update({g: "a GroupNorm without affine weights may read it, and its group count cannot be followed"
                      for g in units if spec.groups[g].blocks > 1})
    refused = {g: rigid[g] for g in units if g in rigid}
    todo = {g: u for g, u in units.items() if g not in refused}
    if not todo:
        return {}, refused
    meta_inputs = _to_meta(example_inputs)
    reference = _run(on_meta(model), meta_inputs)
    if isinstance(reference, Exception):  # code that does not run on meta: checked for real, on a copy
        meta_inputs, reference, make = example_inputs, _run(model, example_inputs), lambda: copy.deepcopy(model)
    else:
        make = lambda: on_meta(model)  # noqa: E731
    if isinstance(reference, Exception):
        raise MergeError(f"width: the model fails on its example inputs ({type(reference).__name__}: {reference})")

    def runs(part: Mapping[int, int]) -> str | None:
        trial = widened(make(), spec, part)
        got = _run(trial, meta_inputs)
        if isinstance(got, Exception):
            return f"{type(got).__name__}: {str(got).splitlines()[0] if str(got) else ''}"[:200]
        return None if got == reference else f"the output's shape changes ({got} instead of {reference})"

    config = hasattr(getattr(model, "config", None), "to_dict")  # a Hugging Face model: its config must say the sizes too
    fits = (lambda part: widened_config(model, merged_shapes(spec, part)) is not None) if config else (lambda part: True)
    if runs(todo) is None and fits(todo):
        return todo, refused
    ok: dict[int, int] = {}
    seen: set[int] = set()
    for gid in sorted(todo):
        if gid in seen:
            continue
        unit = sorted({gid, *(c for c in spec.groups[gid].coupled if c in todo)})
        seen.update(unit)
        why = runs({g: todo[g] for g in unit})
        if why is None:
            ok.update({g: todo[g] for g in unit})
        else:
            refused.update({g: why for g in unit})
    # the largest set of kinds of group (same size and blocks: every layer's MLP) that runs and fits together
    kinds: dict[tuple[int, int], list[int]] = {}
    for g in ok:
        kinds.setdefault((spec.groups[g].size, spec.groups[g].blocks), []).append(g)
    subsets = sorted((c for r in range(len(kinds), 0, -1) for c in itertools.combinations(kinds, r)),
                     key=lambda c: -sum(len(kinds[k]) for k in c))
    for choice in subsets:
        part = {g: ok[g] for k in choice for g in kinds[k]}
        if runs(part) is None and fits(part):
            refused.update({g: "its config cannot say this size with the others'" if config else "the widened groups do not "
                            "run together" for g in ok if g not in part})
            return part, refused
    refused.update({g: "its config cannot say this size" if config else "the widened groups do not run together" for g in ok})
    return {}, refused


def _to_meta(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to("meta")
    if isinstance(inputs, Mapping):
        return {k: _to_meta(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_meta(v) for v in inputs)
    return inputs


# -- Hugging Face configs -------------------------------------------------------------------------------
def adopt_config(model: nn.Module, config: Any) -> None:
    """``config``'s values in ``model.config`` itself: its submodules hold the same object (a
    transformers model's ``self.model.config``), so replacing the attribute would leave them the old one."""
    model.config.__dict__.update(copy.deepcopy(config).__dict__)


def widened_config(model: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """A copy of ``model.config`` whose model has exactly the tensor shapes ``shapes`` (a model's
    full state-dict shapes), found among the configs that change the integer fields equal to an old
    size into the matching new size (head counts included; ``head_dim`` kept); ``None`` if none does."""
    config = model.config
    old = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if all(old.get(k) == tuple(s) for k, s in shapes.items()):
        return copy.deepcopy(config)
    changes: dict[int, set[int]] = {}
    for name, s in shapes.items():
        for a, b in zip(old.get(name, ()), s):
            if a != b:
                changes.setdefault(a, set()).add(b)
    fields = config.to_dict()
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and getattr(config, "num_attention_heads", None) and getattr(config, "hidden_size", None):
        head_dim = config.hidden_size // config.num_attention_heads
    for a, news in list(changes.items()):  # a head count changes with whole heads
        if head_dim:
            for b in list(news):
                if a % head_dim == 0 and b % head_dim == 0:
                    changes.setdefault(a // head_dim, set()).add(b // head_dim)
    candidates = [(k, sorted(changes[v])) for k, v in fields.items()
                  if isinstance(v, int) and not isinstance(v, bool) and v in changes]
    if not candidates or len(candidates) > 12:
        return None
    for choice in itertools.product(*[[None, *news] for _, news in candidates]):
        trial = copy.deepcopy(config)
        for (key, _), value in zip(candidates, choice):
            if value is not None:
                setattr(trial, key, value)
        if head_dim and hasattr(trial, "head_dim"):
            trial.head_dim = head_dim
        if _config_shapes(type(model), trial) == {**old, **{k: tuple(s) for k, s in shapes.items()}}:
            return trial
    return None


def _config_shapes(cls: type, config: Any) -> dict[str, tuple[int, ...]] | None:
    try:
        if hasattr(config, "validate"):  # transformers checks a config when it is saved (heads dividing the hidden size)
            config.validate()
        with torch.device("meta"):
            m = cls(config)
    except Exception:  # noqa: BLE001 - a config the class rejects is not a candidate
        return None
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def describe(spec: MergeSpec, units: Mapping[int, int]) -> str:
    """``"12 groups: 768 -> 1152 units, ..."``, for messages."""
    pairs = sorted({(spec.groups[g].size, u) for g, u in units.items()})
    return ", ".join(f"{a} -> {b}" for a, b in pairs[:4]) + (" ..." if len(pairs) > 4 else "")


__all__ = ["adopt_config", "check_width", "describe", "expressible", "head_changes", "merged_shapes", "net2net", "rebuild", "width_of", "resize_module", "target_units", "widened",
           "widened_config"]
