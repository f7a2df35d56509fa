"""Reading a partial-zip checkpoint back (``mudsc eval`` of a ``--stop-at`` merge): its tensors and
metadata checked, the module rebuilt with :func:`~mudsc_graph.merging.partial_zip.build_partial`.

Each check ends in one :class:`~mudsc_graph.io.paths.CheckpointError` line.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
from torch import nn

from ..errors import MudscError
from ..merging.partial_zip import build_partial, stop_index
from .fitting import fit_state_dict
from .paths import CheckpointError


MAX_PARTIAL_MODELS = 1024

_PER_MODEL_KEY = re.compile(r"tail(\d+)\.|unmerge(\d+)_")
_UNMERGE_KEY = re.compile(r"unmerge(\d+)_(.+)\.u(\d+)")


def partial_models_in(state: Mapping[str, Any]) -> set[int]:
    """The indices ``i`` of the models whose own tensors (``tail{i}.*``, ``unmerge{i}_*``) ``state`` holds."""
    found = set()
    for key in state:
        m = _PER_MODEL_KEY.match(str(key))
        if m:
            found.add(int(m.group(1) or m.group(2)))
    return found


def looks_partial(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` has the keys of a partial-zip module (a ``trunk``, and tails or unmerge matrices)."""
    return bool(partial_models_in(state)) and any(str(k).startswith("trunk.") for k in state)


def check_partial_args(n_models: Any, stop_at: Any, state: Mapping[str, Any], source: str = "partial checkpoint", tracer: Any = "auto") -> None:
    """Refuse arguments of :func:`rebuild_partial` (usually read from a checkpoint's metadata) that
    make no sense, or that disagree with the tensors, before anything is built."""
    from ..analysis.trace import TRACERS

    again = "the file is damaged or not written by mudsc merge --stop-at: merge again"
    if isinstance(n_models, bool) or not isinstance(n_models, int) or not 2 <= n_models <= MAX_PARTIAL_MODELS:
        raise CheckpointError(
            f"{source}: n_models is {n_models!r}, not the number of merged models (a whole number from 2 to {MAX_PARTIAL_MODELS}); {again}"
        )
    if isinstance(stop_at, str) and not stop_at.strip():
        raise CheckpointError(
            f"{source}: stop_at is {stop_at!r}, which names no layer, so the partial-zip model cannot be rebuilt "
            "(an older mudsc merge accepted --stop-at ''); merge again with --stop-at MODULE (e.g. layer3) or without it"
        )
    if not isinstance(stop_at, str):
        raise CheckpointError(f"{source}: stop_at is {stop_at!r}, not the module path or node name where the partial merge stopped (a str); {again}")
    if tracer not in TRACERS:
        raise CheckpointError(f"{source}: tracer is {tracer!r}, not one of {', '.join(TRACERS)}; {again}")
    have = partial_models_in(state)
    if have and have != set(range(n_models)):
        tails = ", ".join(f"tail{i}" for i in sorted(have)[:4]) + (", ..." if len(have) > 4 else "")
        many = f"{len(have)} model" + ("s" if len(have) != 1 else "")
        raise CheckpointError(f"{source}: n_models is {n_models} but the file holds the tensors of {many} ({tails}); {again}")


def _check_unmerge(found: dict[tuple[int, int], tuple[str, torch.Tensor]], sizes: dict[int, int], n_models: int, source: str) -> None:
    """Unmerge matrices that ``Unmerge`` can apply: dense floating ``(units, units)`` blocks of known
    groups, the same set for every model."""

    for (_, gid), (key, u) in found.items():
        if gid not in sizes:
            raise CheckpointError(f"{source}: {key} is the unmerge matrix of group {gid}, which this architecture does not have; check --arch / --arch-opt")
        if u.layout != torch.strided or not u.is_floating_point():
            raise CheckpointError(f"{source}: {key} is a {u.dtype} {str(u.layout).replace('torch.', '')} tensor, not a dense floating-point unmerge matrix; the file is damaged: merge again")
        if tuple(u.shape) != (sizes[gid], sizes[gid]):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(u.shape)} but group {gid} of the architecture has {sizes[gid]} units "
                f"(an unmerge matrix is {sizes[gid]} x {sizes[gid]}); check --arch / --arch-opt"
            )
    per_model = [sorted(k.split("_", 1)[1] for (i, _), (k, _) in found.items() if i == m) for m in range(n_models)]
    for m in range(1, n_models):
        if per_model[m] != per_model[0]:
            odd = sorted(set(per_model[m]) ^ set(per_model[0]))[0]
            have, lack = (0, m) if odd in per_model[0] else (m, 0)
            raise CheckpointError(
                f"{source}: unmerge{lack}_{odd} is missing but unmerge{have}_{odd} is there (every model has the same unmerge matrices); "
                "the file is damaged: merge again"
            )


def rebuild_partial(
    build: Callable[[], nn.Module],
    n_models: int,
    stop_at: str,
    example_inputs: tuple,
    state: dict[str, torch.Tensor],
    registry: Any = None,
    tracer: str = "auto",
    source: str = "partial checkpoint",
) -> fx.GraphModule:
    """Rebuild a saved partial-zip module from its architecture and state_dict (analysed with the
    ``tracer`` the merge used, so that node names agree).

    ``build()`` makes a fresh model of the architecture; the module's structure (trunk, tails,
    which values are unmerged where) is recomputed by the same analysis that made it, and the
    unmerge matrices come from ``state`` (keys ``unmerge{i}_{node}.u{gid}``).

    Everything is checked as :func:`mudsc_graph.io.fitting.fit_state_dict` checks a plain
    checkpoint (keys, shapes, dtypes, NaN/inf), after the arguments (:func:`check_partial_args`,
    before anything is built) and the unmerge matrices; finally the module is run once on
    ``example_inputs``. ``source`` names the file in the errors.

    Raises:
        CheckpointError: arguments or tensors that do not fit, each with one line.
        MudscError: the analysis of the architecture fails.
    """
    from ..analysis.pipeline import analyze_full

    check_partial_args(n_models, stop_at, state, source, tracer)
    merged = build().eval()
    analysis = analyze_full(merged, example_inputs, registry=registry, tracer=tracer)
    order = [(n, analysis.graph.nodes[n]["path"]) for n in analysis.graph.graph["order"]]
    try:
        k = stop_index(order, stop_at)
    except MudscError as exc:
        raise CheckpointError(f"{source} was merged up to {stop_at!r}, but {exc} (check --arch / --arch-opt: they must be the merge's)") from None
    trunk = {n for n, _ in order[: k + 1]}
    found: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _UNMERGE_KEY.fullmatch(key)
        if m:
            found[(int(m.group(1)), int(m.group(3)))] = (key, value)
    sizes = {g.id: g.size for g in analysis.spec.groups}
    _check_unmerge(found, sizes, n_models, source)
    if analysis.tracer == "export":  # as merge builds it: the exported graph's own module holds the weights
        import copy

        merged, tails = copy.deepcopy(analysis.graph_module), [copy.deepcopy(analysis.graph_module) for _ in range(n_models)]
    else:
        tails = [build().eval() for _ in range(n_models)]
    module = build_partial(
        merged, tails, analysis.graph_module.graph, trunk, lambda name: analysis.value_axes.get(name),
        lambda i, gid: found[(i, gid)][1] if (i, gid) in found else None, sizes,
    )
    fit_state_dict(module, state, source=source)
    module.eval()
    try:
        with torch.no_grad():
            module(**example_inputs) if isinstance(example_inputs, Mapping) else module(*example_inputs)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"{source} does not fit the architecture: the rebuilt model fails on example inputs ({first}); check --arch / --arch-opt") from None
    return module
