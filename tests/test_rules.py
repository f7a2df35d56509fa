"""Propagation rules beyond the construct zoo: einsum, functional layers, stack/unbind, slicing, fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mudsc_graph import analyze, analyze_full
from mudsc_graph.spec.axes import to_json


class EinsumAttention(nn.Module):
    def __init__(self, c=16, h=4):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(c, 3 * c)
        self.out = nn.Linear(c, c)
        self.head = nn.Linear(c, 3)
        self.inp = nn.Linear(5, c)

    def forward(self, x):
        x = self.inp(x)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, C // self.h).unbind(2)
        a = torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1)
        y = torch.einsum("bhij,bjhd->bihd", a, v).reshape(B, T, C)
        return self.head(x + self.out(y))


class Functional(nn.Module):
    """Layers called through torch.nn.functional with parameters read by get_attr."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.b1 = nn.Parameter(torch.randn(8))
        self.g = nn.Parameter(torch.rand(8) + 0.5)
        self.rm = nn.Parameter(torch.randn(8), requires_grad=False)
        self.rv = nn.Parameter(torch.rand(8) + 0.5, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        y = F.conv2d(x, self.w1, self.b1, padding=1)
        y = F.batch_norm(y, self.rm, self.rv, self.g, None, training=False)
        y = F.relu(y).mean((2, 3))
        return F.linear(y, self.w2)


class StackUnbind(nn.Module):
    """Two branches stacked on a new axis, processed together, unbound again: each keeps its space."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.ca, self.cb = nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x):
        s = torch.relu(torch.stack([self.a(x), self.b(x)], dim=0))
        p, q = s.unbind(0)
        return self.ca(p) + self.cb(q)


class SliceChannels(nn.Module):
    """A channel subset goes one way, the rest another: a direct sum."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 10)
        self.p, self.q = nn.Linear(3, 2), nn.Linear(7, 2)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.p(h[:, :3]) + self.q(h[:, 3:])


class ZerosLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h + torch.zeros_like(h))


class MaxOverUnits(nn.Module):
    """torch.max over units returns indices whose values depend on unit order: that space is fixed."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(4, 6)

    def forward(self, x):
        v, i = torch.max(self.fc1(x), dim=1)
        return v + i.float() + self.fc2(x).amax(1)


class OddReshape(nn.Module):
    """(6, 4) -> (4, 6) does not factor into splits and merges: the spaces it touches stay fixed."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 24), nn.Linear(6, 5), nn.Linear(4, 8)

    def forward(self, x):
        h = self.fc1(self.fc3(x).relu()[:, :4]).view(-1, 6, 4).reshape(-1, 4, 6)
        return self.fc2(h)


CASES = [
    # name, model, input, expected permutable units
    ("einsum_attention", EinsumAttention, (2, 6, 5), 16 + 16 + 16),
    ("functional_layers", Functional, (2, 3, 6, 6), 8),
    ("stack_unbind", StackUnbind, (3, 4), 6 + 6),
    ("slice_channels", SliceChannels, (3, 4), 10),
    ("zeros_like", ZerosLike, (3, 4), 8),
    ("max_over_units", MaxOverUnits, (3, 4), 6),
]


@pytest.mark.parametrize("name, make, shape, expected", CASES, ids=[c[0] for c in CASES])
def test_rule(name, make, shape, expected):
    torch.manual_seed(0)
    model = make().eval()
    x = (torch.randn(*shape),)
    spec = analyze(model, x, strict=True)
    assert spec.permutable_units == expected, [(g.size, g.blocks, g.members[:3]) for g in spec.free_groups()]
    for seed in range(3):
        spec.check(model, x, seed=seed)


def test_slice_is_a_direct_sum():
    spec = analyze(SliceChannels(), (torch.randn(3, 4),))
    rows = to_json(spec.axes["fc.weight"][0])
    assert rows[0] == "sum" and [spec.group(e[1]).size for e in rows[1]] == [3, 7]


def test_unfactorable_reshape_falls_back_with_a_warning():
    torch.manual_seed(0)
    model, x = OddReshape(), (torch.randn(2, 4),)
    with pytest.warns(UserWarning, match="does not factor"):
        spec = analyze(model, x)
    assert spec.permutable_units == 8  # fc3's hidden units are still merged
    spec.check(model, x)


def test_multihead_attention_without_its_handler_stays_correct():
    """torch.fx cannot trace through nn.MultiheadAttention: without the handler it is an opaque leaf.
    torch.export can: its ATen graph (batch and heads merged into one axis) gives the handler's groups."""
    from mudsc_graph.plugin import registry as R

    reg = R.Registry.from_plugin_manager(R.make_plugin_manager(load_entry_points=False))
    del reg.handlers[("call_module", nn.MultiheadAttention)]
    torch.manual_seed(0)
    arch = R.get_registry().architecture("vit_tiny")
    model, x = arch.build().eval(), arch.example_inputs(2)
    with pytest.warns(UserWarning, match="MultiheadAttention at node"):
        spec = analyze(model, x, registry=reg, tracer="fx")
    spec.check(model, x)
    assert spec.permutable_units == 4 * 128  # only the MLP hidden layers remain
    with_handler = analyze(model, x)
    assert with_handler.permutable_units == 64 + 4 * (64 + 64 + 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seen_through = analyze_full(model, x, registry=reg)  # auto: fx leaves the module unsupported, export sees through it
    assert seen_through.tracer == "export"
    assert seen_through.spec.permutable_units == with_handler.permutable_units
    assert sorted((g.size, g.blocks) for g in seen_through.spec.free_groups()) == sorted((g.size, g.blocks) for g in with_handler.free_groups())
    seen_through.spec.check(model, x)


class GlobalMax(nn.Module):
    """x.max() without dim returns only the value: the units stay permutable."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x).relu()
        return self.fc2(h) + h.max() + torch.max(h, h * 2).sum()


def test_max_without_dim_keeps_units_permutable():
    torch.manual_seed(0)
    model, x = GlobalMax(), (torch.randn(3, 4),)
    spec = analyze(model, x, strict=True)
    assert spec.permutable_units == 8
    spec.check(model, x)


class ParamMatmul(nn.Module):
    """Parameters used directly in matmul/einsum: their summed-over axes read units."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 8))
        self.w2 = nn.Parameter(torch.randn(6, 8))
        self.w3 = nn.Parameter(torch.randn(5, 6))
        self.register_buffer("emb", torch.randn(3, 5))

    def forward(self, x):
        h = torch.relu(x @ self.w1)
        h = torch.relu(torch.einsum("bi,oi->bo", h, self.w2))
        h = (self.w3 @ h.T).T
        return F.normalize(h, dim=-1) @ self.emb.T  # a fixed class-embedding head


def test_parameters_read_by_matmul_and_einsum_are_consumed():
    torch.manual_seed(0)
    model, x = ParamMatmul(), (torch.randn(3, 4),)
    spec = analyze(model, x, strict=True)
    assert spec.permutable_units == 8 + 6 + 5
    assert spec.consumed == {"w1": [0], "w2": [1], "w3": [1], "emb": [1]}
    spec.check(model, x)


class BuiltConstant(nn.Module):
    """A tensor made inside forward ties the units it meets to their positions."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x)) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        return self.fc3(torch.relu(self.fc2(h)))


def test_constant_tensors_built_in_forward_fix_what_they_touch():
    torch.manual_seed(0)
    model, x = BuiltConstant(), (torch.randn(3, 4),)
    spec = analyze(model, x)
    assert spec.permutable_units == 5
    fixed = [g for g in spec.groups if g.fixed and g.reason and "constant tensor" in g.reason]
    assert fixed and fixed[0].size == 6
    spec.check(model, x)
