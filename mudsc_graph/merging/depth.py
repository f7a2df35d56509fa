"""Models of different depths: chains of repeated blocks aligned, the deeper ones cut to one depth.

A *chain* is a container (``nn.Sequential`` or ``nn.ModuleList``) of blocks named ``0 .. n-1`` that
the models hold at the same path with different counts (a ResNet stage of 3 blocks and of 5, a
transformer's ``layers`` of 6 and of 12); everything outside the chains must be the same. The merged
model has the depth of the shallowest model (the *reference*). Each deeper model is aligned to it
(the layer alignment of Xu et al.'s heterogeneous merging): its blocks are cut into as many
consecutive segments as the reference has blocks, so that the output of each segment is as similar
as possible to the output of the reference's block (linear CKA over the calibration samples, which
no permutation of units changes; a dynamic programme over the segment ends, ties to the later
end), and each segment is represented by its one block that changes its input most (the relative
norm of ``output - input``; a block that changes the shape of its input is always kept). The others
are removed: exactly right for blocks that compute the identity (zero residual branches), an
approximation otherwise. The alignment is shown (:attr:`~mudsc_graph.MergeResult.depth_alignment`,
a warning) and can be set (``merge(..., depth_alignment={model: {chain: [kept blocks]}})``).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import MergeError
from ..inputs import call

CHAIN_TYPES = (nn.Sequential, nn.ModuleList)


def _children(m: nn.Module) -> list[str]:
    names = [n for n, _ in m.named_children()]
    return names if names and names == [str(k) for k in range(len(names))] else []


def chains(models: Sequence[nn.Module]) -> dict[str, list[int]]:
    """``{container path: blocks per model}`` for every chain whose length differs between the
    models; ``MergeError`` when the models differ in anything else."""
    found: dict[str, list[int]] = {}
    mods = [dict(m.named_modules()) for m in models]
    for path, container in mods[0].items():
        if not isinstance(container, CHAIN_TYPES) or not _children(container):
            continue
        counts = [len(_children(m[path])) if isinstance(m.get(path), CHAIN_TYPES) else -1 for m in mods]
        if -1 not in counts and len(set(counts)) > 1 and not any(path.startswith(p + ".") for p in found):
            found[path] = counts
    if not found:
        return {}

    def outside(model: nn.Module) -> set[str]:
        return {k for k in model.state_dict() if not any(k.startswith(p + ".") for p in found)}

    ref = outside(models[0])
    for i, m in enumerate(models[1:], start=1):
        if outside(m) != ref:
            extra = sorted(outside(m) ^ ref)[:3]
            raise MergeError(f"model {i} differs from model 0 in more than the depth of its chains of blocks ({', '.join(found)}): "
                             f"{extra}; only models whose extra layers are repeated blocks can be merged")
    for path, counts in found.items():  # every block of a chain: the same structure as model 0's first blocks
        shallow = min(counts)
        for i, (m, n) in enumerate(zip(mods, counts)):
            for k in range(shallow, n):
                keys = {name for name, _ in m[f"{path}.{k}"].named_parameters()}
                peer = {name for name, _ in m[f"{path}.{shallow - 1}"].named_parameters()}
                if keys != peer:
                    raise MergeError(f"model {i}'s block {path}.{k} is not of the kind of the others in its chain; "
                                     "the chain cannot be shortened")
    return found


def _capture(model: nn.Module, path: str, batches: Iterable[Any], limit: int = 512) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every block's inputs and outputs of chain ``path``, ``(samples, features)`` each (up to ``limit`` samples)."""
    blocks = [model.get_submodule(f"{path}.{k}") for k in range(len(_children(model.get_submodule(path))))]
    ins: list[list[torch.Tensor]] = [[] for _ in blocks]
    outs: list[list[torch.Tensor]] = [[] for _ in blocks]

    def hook(k: int) -> Any:
        def fn(module: nn.Module, args: tuple, out: Any) -> None:
            x = args[0] if args else None
            y = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                ins[k].append(x.detach().float().flatten(1).cpu())
                outs[k].append(y.detach().float().flatten(1).cpu())
        return fn

    handles = [b.register_forward_hook(hook(k)) for k, b in enumerate(blocks)]
    seen = 0
    try:
        with torch.no_grad():
            for k, inputs in enumerate(batches):
                try:
                    call(model, inputs)
                except Exception as exc:  # noqa: BLE001 - the user's model on the user's data: one line, not a traceback
                    raise MergeError(f"aligning depths: {type(model).__name__} failed on calibration batch {k}: "
                                     f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
                seen += len(outs[0][-1]) if outs[0] else 0
                if seen >= limit:
                    break
    finally:
        for h in handles:
            h.remove()
    if not all(outs):
        raise MergeError(f"the blocks of chain {path!r} were not called with a tensor on the calibration data; cannot align depths")
    return [torch.cat(x)[:limit] for x in ins], [torch.cat(y)[:limit] for y in outs]


def cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two ``(samples, features)`` sets, from their centred Gram matrices."""
    k, l_ = x.double() @ x.double().T, y.double() @ y.double().T
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    kc, lc = h @ k @ h, h @ l_ @ h
    den = float(kc.norm() * lc.norm())
    return float((kc * lc).sum()) / den if den > 0 else 0.0


def segments(score: torch.Tensor) -> list[int]:
    """The end (inclusive) of each reference block's segment of the deeper chain maximising the summed
    ``score[j, end_j]`` (``m x n``, m <= n): consecutive, non-empty, the last one ending at ``n - 1``;
    ties to the later end."""
    m, n = score.shape
    neg = float("-inf")
    best = torch.full((m, n), neg, dtype=torch.float64)
    back = torch.zeros((m, n), dtype=torch.long)
    for k in range(n - m + 1):
        best[0, k] = score[0, k]
    for j in range(1, m):
        for k in range(j, n - m + j + 1):
            prev = best[j - 1, :k]
            arg = int(len(prev) - 1 - torch.argmax(prev.flip(0)))  # the latest of the best
            best[j, k] = prev[arg] + score[j, k]
            back[j, k] = arg
    ends = [n - 1]
    for j in range(m - 1, 0, -1):
        ends.append(int(back[j, ends[-1]]))
    return ends[::-1]


def align(reference: nn.Module, deeper: nn.Module, path: str, batches: list[Any]) -> list[int]:
    """The blocks of ``deeper``'s chain ``path`` kept, one per block of ``reference``'s (see the module docstring)."""
    _, ref_out = _capture(reference, path, batches)
    ins, outs = _capture(deeper, path, batches)
    score = torch.tensor([[cka(r, o) for o in outs] for r in ref_out])
    ends = segments(score)
    kept, start = [], 0
    for end in ends:
        members = list(range(start, end + 1))
        reshaping = [k for k in members if ins[k].shape != outs[k].shape]
        if len(reshaping) > 1:
            raise MergeError(f"chain {path!r}: blocks {reshaping} both change the shape of their input but fall in one segment")
        effect = {k: float((outs[k] - ins[k]).norm() / ins[k].norm().clamp_min(1e-12)) for k in members if not reshaping}
        kept.append(reshaping[0] if reshaping else max(members, key=lambda k: (effect[k], -k)))
        start = end + 1
    return kept


def cut(model: nn.Module, kept: Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` whose chains hold only the ``kept`` blocks (renumbered from 0); a Hugging
    Face config's ``num_hidden_layers`` follows when it counted the cut chain."""
    out = copy.deepcopy(model)
    for path, keep in kept.items():
        container = out.get_submodule(path)
        old = len(_children(container))
        blocks = [container[k] for k in keep]
        for new_index, (k, block) in enumerate(zip(keep, blocks)):
            for m in block.modules():  # transformers' layers know their index (their place in a cache)
                if getattr(m, "layer_idx", None) == k:
                    m.layer_idx = new_index
        new = type(container)(blocks) if isinstance(container, nn.ModuleList) else nn.Sequential(*blocks)
        parent, _, name = path.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, name, new)
        config = getattr(out, "config", None)
        if config is not None and getattr(config, "num_hidden_layers", None) == old:
            config.num_hidden_layers = len(keep)
            for key, value in list(vars(config).items()):  # per-layer lists (layer_types): the kept layers'
                if isinstance(value, list) and len(value) == old:
                    setattr(config, key, [value[k] for k in keep])
    return out


def align_depths(models: list[nn.Module], batches: list[Any] | None,
                 given: Mapping[int, Mapping[str, Sequence[int]]] | None = None) -> tuple[list[nn.Module], dict[int, dict[str, list[int]]]]:
    """The models with every chain cut to the shallowest model's depth, and the blocks each deeper
    model keeps (``{model: {chain: kept}}``); ``given`` sets some of them instead of the alignment."""
    found = chains(models)
    if not found:
        if given:
            raise MergeError("depth_alignment= was given, but the models have chains of blocks of one depth")
        return models, {}
    given = {int(i): dict(v) for i, v in (given or {}).items()}
    ref = min(range(len(models)), key=lambda i: sum(counts[i] for counts in found.values()))
    if any(counts[i] < counts[ref] for counts in found.values() for i in range(len(models))):
        raise MergeError(f"the models' chains of blocks ({', '.join(found)}) are not deeper in one model than in another throughout; "
                         "cannot pick one depth")
    out, alignment = list(models), {}
    for i, model in enumerate(models):
        deep = {path: counts for path, counts in found.items() if counts[i] > counts[ref]}
        if not deep:
            continue
        kept = {}
        for path, counts in deep.items():
            choice = given.get(i, {}).get(path)
            if choice is None:
                if batches is None:
                    raise MergeError("aligning models of different depths needs calibration data (pass data=), or give "
                                     "depth_alignment={model: {chain: [kept blocks]}}")
                choice = align(models[ref], model, path, batches)
            choice = [int(k) for k in choice]
            if len(choice) != counts[ref] or sorted(set(choice)) != choice or not all(0 <= k < counts[i] for k in choice):
                raise MergeError(f"depth_alignment for model {i}, chain {path!r}: give {counts[ref]} increasing block indices "
                                 f"below {counts[i]}, got {choice}")
            kept[path] = choice
        out[i] = cut(model, kept)
        alignment[i] = kept
    return out, alignment


__all__ = ["align", "align_depths", "chains", "cka", "cut", "segments"]
