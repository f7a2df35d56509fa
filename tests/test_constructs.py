"""Merge-group inference on one tiny model per construct (see ``construct_models.py``).

For every case: the model traces and runs; ``analyze`` gives a spec whose random valid permutations
leave the output unchanged (``spec.check``, three seeds); and ``spec.permutable_units`` equals the
count a careful human made by the rules of docs/concepts.md ("Spaces") (the arithmetic is in each
case's ``note``, printed on failure together with the inferred groups).

Plus: an unsupported op warns (naming the node) and raises in strict mode, and two checks that do
not trust the analysis: a hand-made permutation of an MLP's hidden units leaves its output
unchanged (the invariance idea itself), and ``spec.check`` does notice when a permutation it
applies is not actually valid for the model it is given.
"""

from __future__ import annotations

import inspect
import random

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

try:
    from construct_models import CASES, CASES_BY_NAME, PlainMLP
except ImportError:  # tests/ collected as a package
    from tests.construct_models import CASES, CASES_BY_NAME, PlainMLP

import mudsc_graph
from mudsc_graph.errors import SpecCheckError, UnsupportedOpError

# The analysis is written in parallel with these tests; until it lands they skip instead of
# breaking collection for everyone. Any other import failure propagates.
analyze = getattr(mudsc_graph, "analyze", None)
needs_analyze = pytest.mark.skipif(analyze is None, reason="mudsc_graph.analyze is not implemented yet")

CHECK_SEEDS = (0, 1, 2)
SUPPORTED = [c for c in CASES if c.name != "unsupported_rfft"]


# --------------------------------------------------------------------------- helpers


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make the self-check non-trivial: random BatchNorm statistics and affine parameters, and random
    values for every constant-initialised parameter (cls tokens, positional embeddings, layer scale,
    LayerNorm/GroupNorm affine, zero biases). Scales are moderate so few ReLU channels die."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            if m.weight is not None:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    for p in model.parameters():
        flat = p.detach().flatten()
        if flat.numel() > 1 and bool((flat == flat[0]).all()):
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def build(case, seed: int = 0):
    """The case's model (seed 0, eval mode, randomised) and its example inputs."""
    torch.manual_seed(0)
    model = randomize_(case.make_model().eval(), seed)
    return model, tuple(case.make_inputs())


def _outputs(model: nn.Module, inputs: tuple) -> tuple:
    with torch.no_grad():
        out = model(*inputs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _max_diff(a: tuple, b: tuple) -> float:
    assert len(a) == len(b)
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def _run_check(spec, model: nn.Module, inputs: tuple, seed: int):
    """``spec.check`` with a given seed: passed as a keyword if ``check`` takes one, else global."""
    _seed_all(seed)
    params = inspect.signature(spec.check).parameters
    for kw in ("seed", "generator"):
        if kw in params:
            arg = seed if kw == "seed" else torch.Generator().manual_seed(seed)
            return spec.check(model, inputs, **{kw: arg})
    return spec.check(model, inputs)


def describe(spec, case=None) -> str:
    """A diagnosable dump: the case's counting note, then every inferred group and warning."""
    lines = []
    if case is not None:
        lines.append(f"case {case.name}: expected {case.expected_units} permutable units")
        lines.append(f"  note: {case.note}")
    lines.append(f"analysis: permutable_units={getattr(spec, 'permutable_units', '?')}")
    lines.append("  groups (id, size, blocks, fixed, members):")
    try:
        for g in spec.groups:
            members = list(getattr(g, "members", []))
            shown = ", ".join(_fmt_member(m) for m in members[:10])
            more = f", ... (+{len(members) - 10})" if len(members) > 10 else ""
            lines.append(
                f"    {g.id!s:>8} size={g.size!s:<3} blocks={g.blocks!s:<2} fixed={g.fixed!s:<5} [{shown}{more}]"
            )
        for w in spec.warnings:
            lines.append(f"  warning: {w}")
    except Exception as e:  # the dump must never hide the real failure
        lines.append(f"  (could not list groups: {e!r})")
    return "\n".join(lines)


def _fmt_member(m) -> str:
    if isinstance(m, (tuple, list)) and len(m) == 2:
        return f"{m[0]}:{m[1]}"
    return str(m)


# --------------------------------------------------------------------------- models themselves


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_model_runs_and_traces(case):
    """Every test model runs and torch.fx's default tracer reproduces it exactly."""
    model, inputs = build(case)
    ref = _outputs(model, inputs)
    traced = torch.fx.symbolic_trace(model)
    assert _max_diff(ref, _outputs(traced, inputs)) == 0.0
    assert case.expected_units >= 0 and case.note


# --------------------------------------------------------------------------- analysis per case


@needs_analyze
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_spec_check_passes(case):
    """Random valid permutations (three seeds) leave the output unchanged."""
    model, inputs = build(case)
    ref = _outputs(model, inputs)
    spec = analyze(model, inputs)
    for seed in CHECK_SEEDS:
        try:
            diff = _run_check(spec, model, inputs, seed)
        except SpecCheckError as e:
            pytest.fail(f"spec.check failed (seed {seed}): {e}\n{describe(spec, case)}")
        if diff is not None:
            assert float(diff) < 1e-3, f"check returned max abs diff {diff}\n{describe(spec, case)}"
    # the check must leave the model computing what it computed before
    assert _max_diff(ref, _outputs(model, inputs)) < 1e-4, "spec.check changed the model's function"


@needs_analyze
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_permutable_units(case):
    """The analysis finds exactly the permutable units a careful human counts."""
    model, inputs = build(case)
    spec = analyze(model, inputs)
    info = describe(spec, case)
    by_groups = sum(g.size for g in spec.groups if not g.fixed)
    assert spec.permutable_units == by_groups, f"permutable_units != sum of non-fixed group sizes ({by_groups})\n{info}"
    assert spec.permutable_units == case.expected_units, (
        f"{case.name}: analysis found {spec.permutable_units} permutable units, expected "
        f"{case.expected_units}\n{info}"
    )


@needs_analyze
@pytest.mark.parametrize("case", SUPPORTED, ids=lambda c: c.name)
def test_strict_accepts_supported_constructs(case):
    """Every construct other than the unsupported-op model is understood: strict mode does not raise."""
    model, inputs = build(case)
    try:
        analyze(model, inputs, strict=True)
    except UnsupportedOpError as e:
        pytest.fail(f"{case.name}: strict analysis rejected a supported construct: {e}")


# --------------------------------------------------------------------------- unsupported op


def _rfft_node_names(model: nn.Module) -> list[str]:
    graph = torch.fx.symbolic_trace(model).graph
    return [n.name for n in graph.nodes if n.target is torch.fft.rfft]


@needs_analyze
def test_unsupported_op_warns_naming_the_node():
    case = CASES_BY_NAME["unsupported_rfft"]
    model, inputs = build(case)
    spec = analyze(model, inputs)
    names = _rfft_node_names(model)  # ["fft_rfft"]
    assert names
    hits = [w for w in spec.warnings if any(n in w for n in names) or "rfft" in w]
    assert hits, f"no warning names the rfft node {names}\n{describe(spec, case)}"


@needs_analyze
def test_unsupported_op_strict_raises():
    model, inputs = build(CASES_BY_NAME["unsupported_rfft"])
    with pytest.raises(UnsupportedOpError):
        analyze(model, inputs, strict=True)


# --------------------------------------------------------------------------- independent guards


def _permute_mlp_hidden(sd: dict, p1: torch.Tensor, p2: torch.Tensor) -> dict:
    """PlainMLP state dict with hidden layer 1 permuted by p1 and hidden layer 2 by p2, by hand."""
    sd = {k: v.clone() for k, v in sd.items()}
    sd["fc1.weight"] = sd["fc1.weight"][p1]
    sd["fc1.bias"] = sd["fc1.bias"][p1]
    sd["fc2.weight"] = sd["fc2.weight"][:, p1][p2]
    sd["fc2.bias"] = sd["fc2.bias"][p2]
    sd["fc3.weight"] = sd["fc3.weight"][:, p2]
    return sd


def test_hand_permutation_preserves_mlp_function():
    """The invariance the whole framework rests on, without the analysis: permuting an MLP's hidden
    units consistently (rows of one layer, columns of the next) leaves the output unchanged, while
    an inconsistent permutation (rows only) changes it."""
    case = CASES_BY_NAME["plain_mlp"]
    model, inputs = build(case)
    ref = _outputs(model, inputs)
    g = torch.Generator().manual_seed(3)
    p1, p2 = torch.randperm(16, generator=g), torch.randperm(12, generator=g)
    assert not torch.equal(p1, torch.arange(16))

    permuted = PlainMLP().eval()
    permuted.load_state_dict(_permute_mlp_hidden(model.state_dict(), p1, p2))
    assert not torch.equal(permuted.fc1.weight, model.fc1.weight)
    assert _max_diff(ref, _outputs(permuted, inputs)) < 1e-5

    broken_sd = {k: v.clone() for k, v in model.state_dict().items()}
    broken_sd["fc1.weight"] = broken_sd["fc1.weight"][p1]  # rows only: inconsistent
    broken = PlainMLP().eval()
    broken.load_state_dict(broken_sd)
    assert _max_diff(ref, _outputs(broken, inputs)) > 1e-3


class _OrderDependentMLP(PlainMLP):
    """Same parameters as PlainMLP, but the hidden units are weighted by a fixed ramp that is not a
    parameter: permuting them (as PlainMLP's spec allows) changes this model's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x)) * torch.linspace(0.25, 4.0, 16)
        return self.fc3(F.relu(self.fc2(h)))


@needs_analyze
def test_spec_check_detects_an_invalid_permutation():
    """``spec.check`` is not vacuous: the spec of PlainMLP applied to a model whose hidden units are
    order-dependent must make the check fail."""
    case = CASES_BY_NAME["plain_mlp"]
    model, inputs = build(case)
    spec = analyze(model, inputs)
    assert spec.permutable_units > 0, describe(spec, case)

    trap = _OrderDependentMLP().eval()
    trap.load_state_dict(model.state_dict())
    with pytest.raises(SpecCheckError):
        _run_check(spec, trap, inputs, seed=0)
