"""The equivariance probe: ops no handler describes are measured, soundly, and agree with the handlers.

The op zoo runs small models through torch.export twice: with every built-in handler, and with only
the handlers that state structure the probe cannot measure (parameters of linear layers, reshapes,
cuts of an axis); every other ATen op is then measured by the probe. Both analyses must give the
same groups (sizes, members, fixed or not), and every probed spec must pass its permutation check.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mudsc_graph import analyze
from mudsc_graph.analysis.pipeline import analyze_full
from mudsc_graph.analysis.probe import Prober, act, _derangement
from mudsc_graph.analysis.propagate import op_name
from mudsc_graph.plugin import registry as R

B, T, C = 2, 6, 16

# the handlers kept when the probe is tested: what states structure (a parameter's rows, a reshape
# into heads, a cut of an axis into pieces), which a measurement cannot see
STRUCTURAL = {
    "linear", "view", "reshape", "_unsafe_view", "unflatten", "flatten", "split", "split_with_sizes", "chunk", "cat",
    "slice", "select", "unbind", "stack", "sym_size", "_assert_tensor_metadata", "alias", "expand", "unsqueeze", "_to_copy",
}


class ProbeOnly(R.Registry):
    """The built-in registry with every call_function handler outside ``STRUCTURAL`` removed."""

    def handler_for(self, opcode, target):
        h = super().handler_for(opcode, target)
        if opcode == "call_function" and op_name(target) not in STRUCTURAL:
            return None
        return h


def _probe_only() -> ProbeOnly:
    base = R.Registry.from_plugin_manager(R.make_plugin_manager(load_entry_points=False))
    reg = ProbeOnly.__new__(ProbeOnly)
    reg.__dict__.update(base.__dict__)
    return reg


def heads(t):
    return t.view(B, T, 2, 8).transpose(1, 2)


def merge_heads(t):
    return t.transpose(1, 2).reshape(B, T, C)


# each case: y = f(h, g) of two hidden layers h, g: (B, T, C), read by a last Linear(C, 4)
ZOO = {
    "unary": lambda h, g: torch.tanh(h) + torch.sigmoid(g) + F.gelu(h) * F.silu(g) + torch.exp(-h.abs()) + torch.sin(h) * torch.cos(g),
    "unary2": lambda h, g: torch.erf(h) + F.softplus(g) + F.elu(h) - F.leaky_relu(g, 0.1) + F.hardtanh(h) + F.mish(g) + F.hardswish(h),
    "unary3": lambda h, g: torch.sqrt(h.abs() + 1) + torch.rsqrt(g.square() + 1) + torch.log1p(h.abs()) + torch.clamp(g, -0.5, 0.5) + F.relu6(h),
    "unary4": lambda h, g: torch.reciprocal(h.abs() + 1) + torch.log(g.abs() + 1) + torch.sign(h) * torch.floor(g) + torch.round(h) + torch.trunc(g) + torch.ceil(h),
    "binary": lambda h, g: torch.maximum(h, g) - torch.minimum(h, g) + h * g / (g.abs() + 1) + torch.where(h > g, h, g) + torch.lerp(h, g, 0.3),
    "binary2": lambda h, g: torch.atan2(h, g) + torch.pow(h.abs(), 1.5) + torch.fmod(h, 0.7) + torch.remainder(g, 0.9) + torch.hypot(h, g) + (h >= g).float(),
    "softmaxes": lambda h, g: torch.softmax(h, -1) + torch.log_softmax(g, -1) + torch.softmax(h, 1),
    "reductions": lambda h, g: h - h.mean(-1, keepdim=True) + g.sum(1, keepdim=True) + h.amax(1, keepdim=True) + g.var(1, keepdim=True) + h.std(-1, keepdim=True),
    "reductions2": lambda h, g: h * torch.logsumexp(g, -1, keepdim=True) + torch.norm(h, dim=-1, keepdim=True) + g.amin(-1, keepdim=True) + h.prod(1, keepdim=True),
    "norms": lambda h, g: F.layer_norm(h, (C,)) + F.rms_norm(g, (C,)) + F.normalize(h, dim=-1),
    "scan": lambda h, g: torch.cumsum(h, 1) + torch.cumprod(torch.sigmoid(g), 1) + torch.flip(h, [1]) + torch.roll(g, 1, 1),
    "transpose": lambda h, g: (h.transpose(1, 2) * g.permute(0, 2, 1)).transpose(1, 2).contiguous(),
    "matmul": lambda h, g: torch.softmax(h @ g.transpose(1, 2), -1) @ g,
    "bmm": lambda h, g: torch.bmm(torch.softmax(torch.bmm(h, g.transpose(1, 2)), -1), h),
    "einsum": lambda h, g: torch.einsum("bts,bsc->btc", torch.einsum("btc,bsc->bts", h, g).softmax(-1), g),
    "attention": lambda h, g: merge_heads(F.scaled_dot_product_attention(heads(h), heads(g), heads(h * g))),
    "attention_masked": lambda h, g: merge_heads(F.scaled_dot_product_attention(heads(h), heads(g), heads(g), is_causal=True)),
    "heads_pointwise": lambda h, g: merge_heads(torch.tanh(heads(h)) * heads(g) + heads(h).softmax(-1)),
    "squeeze": lambda h, g: h.unsqueeze(2).squeeze(2) + g[:, :, None].squeeze(-2),
    "dtype": lambda h, g: h.double().float() + g.half().float() + h.type_as(g),
    "clone": lambda h, g: h.clone() + g.detach() + h.contiguous(),
    "glu": lambda h, g: F.glu(torch.cat([h, g], -1), -1) + h,
    "masked": lambda h, g: h.masked_fill(g > 0.5, 0.0) + torch.nan_to_num(g) + torch.addcmul(h, h, g, value=0.5),
}


class ZooNet(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.a, self.b, self.out = nn.Linear(8, C), nn.Linear(8, C), nn.Linear(C, 4)

    def forward(self, x):
        return self.out(self.fn(self.a(x), self.b(x)))


def _groups(spec):
    return sorted((g.size, g.blocks, g.fixed, tuple(sorted(g.members))) for g in spec.groups)


def _probed_ops(analysis) -> set[str]:
    nodes = analysis.graph_module.graph.nodes
    probed = set(analysis.propagator.probed)
    return {op_name(n.target) for n in nodes if n.name in probed}


@pytest.fixture(scope="module")
def zoo_results():
    reg = _probe_only()
    results = {}
    for name, fn in ZOO.items():
        torch.manual_seed(0)
        model, x = ZooNet(fn).eval(), (torch.randn(B, T, 8),)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handled = analyze_full(model, x, tracer="export")
            probed = analyze_full(model, x, tracer="export", registry=reg)
        results[name] = (model, x, handled, probed)
    return results


@pytest.mark.parametrize("name", list(ZOO))
def test_op_zoo_probe_agrees_with_the_handlers(zoo_results, name):
    model, x, handled, probed = zoo_results[name]
    assert _groups(probed.spec) == _groups(handled.spec)
    for seed in range(3):
        probed.spec.check(model, x, seed=seed)


def test_op_zoo_covers_fifty_aten_ops(zoo_results):
    ops = set().union(*(_probed_ops(r[3]) for r in zoo_results.values()))
    assert len(ops) >= 50, sorted(ops)


def test_the_probe_is_cached_per_op_and_layout():
    """A layer repeated 6 times is measured once: the cache key renames spaces by first appearance."""

    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(C, C) for _ in range(6))

        def forward(self, x):
            for lin in self.layers:
                x = x + torch.cumsum(torch.tanh(lin(x)), 1)
            return x.mean(1)

    torch.manual_seed(0)
    a = analyze_full(Deep().eval(), (torch.randn(B, T, C),), tracer="fx")
    prober = a.propagator.prober
    assert len(a.propagator.probed) == 6 and len(prober.cache) == 1


class Sorts(nn.Module):
    """Ops whose output depends on the order of units: their spaces stay fixed, with a warning."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.a, self.b = nn.Linear(8, C), nn.Linear(C, 4)

    def forward(self, x):
        return self.b(self.op(self.a(x)))


@pytest.mark.parametrize("op, deterministic", [
    (lambda h: torch.sort(h, -1).values, True),  # sorted values: the order of units is lost
    (lambda h: torch.cummax(h, -1).values, True),  # a scan along the units
    (lambda h: torch.diff(h, dim=-1, prepend=h[..., :1]), True),
    (lambda h: h + torch.rand_like(h), False),  # random: no two runs agree
    (lambda h: h[..., torch.tensor([3, 1, 2, 0] * 4)], True),  # data-dependent indexing of units
])
def test_order_dependent_ops_fix_what_they_touch(op, deterministic):
    torch.manual_seed(0)
    model, x = Sorts(op).eval(), (torch.randn(5, 8),)
    with pytest.warns(UserWarning, match="kept as they are"):
        spec = analyze(model, x, registry=_probe_only(), tracer="export")
    assert spec.permutable_units == 0
    if deterministic:
        spec.check(model, x)


def test_act_permutes_blocks_then_the_block_axis():
    """``act`` on a (3 blocks, 4 units) tensor whose units depend on the block: each block's units
    by their own permutation (in the old block order), then the blocks."""
    from mudsc_graph.analysis.spaces import Dep

    gen = torch.Generator().manual_seed(0)
    t = torch.arange(12.0).view(3, 4)
    perms = {0: _derangement(3, gen), 1: _derangement(4, gen), 2: _derangement(4, gen), 3: _derangement(4, gen)}
    got = act(t, [0, Dep(0, (1, 2, 3))], perms.get)
    for j in range(3):
        old = int(perms[0][j])
        assert torch.equal(got[j], t[old][perms[1 + old]])


def test_prober_reads_nothing_it_was_not_given():
    """A measurement never writes the space table: the prober only calls the three readers."""
    calls = []
    prober = Prober(lambda s: calls.append("find") or s, lambda s: True, lambda s: 4)
    from mudsc_graph.analysis.probe import Operand

    x = torch.randn(3, 4)
    finding = prober.measure(lambda xs: [torch.relu(xs[0])], [Operand(0, x, [0, 1])], [(3, 4)], key=None)
    assert finding.sources == [[[(0, 0)], [(0, 1)]]] and not finding.fixed


class TwoGathers(nn.Module):
    """The same op on the same shapes twice, with different index values: an identity gather (units
    stay where they are) and a shuffle (units meet other units' weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, C), nn.Linear(C, C), nn.Linear(C, 4)
        self.register_buffer("same", torch.arange(C))
        self.register_buffer("shuffle", torch.randperm(C, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        h = torch.relu(self.a(x))[..., self.same]
        return self.c(torch.relu(self.b(h))[..., self.shuffle])


def test_index_values_are_part_of_what_is_measured():
    """Integer operands are used as they are, so the cache must not hand the first gather's finding
    to the second: the shuffle's units stay fixed, the identity gather's are merged. An index
    tensor never joins a free group (permuting it with the units that read it is a symmetry, but a
    merge cannot average indices): two classes that each move the same output axis are not one."""
    torch.manual_seed(0)
    model, x = TwoGathers().eval(), (torch.randn(5, 8),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = analyze(model, x, registry=_probe_only(), tracer="export")
    for seed in range(3):
        spec.check(model, x, seed=seed)
    assert spec.permutable_units == C  # a's units through the identity gather; b's stay
    assert not any(name in ("same", "shuffle") for g in spec.free_groups() for name, _ in g.members)
