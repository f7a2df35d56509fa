"""The long tail, by construction: the plain-torch reproductions of ops and layouts no handler names.

Each model is analysed as its users write it, with both tracers; its permutable units equal a hand
count (with its arithmetic), three random valid permutations leave its output unchanged, and a
permuted copy merges back with MuDSC zip and align. A parameter the traced forward never reads is
fixed, with a warning naming it; several positional inputs per batch are passed as a dict.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mudsc_graph import MergeError, analyze, merge
from mudsc_graph.spec.axes import Fixed

try:
    from test_constructs import randomize_
except ImportError:  # tests/ collected as a package
    from tests.test_constructs import randomize_


class TypeAs(nn.Module):
    """``type_as``: fx saw a binary elementwise op ("cannot link spaces of 32 and 8 units")."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).type_as(x))


class TransposedLinear(nn.Linear):
    """A Linear subclass computing ``x @ W.T + b`` (``aten.numpy_T`` under export)."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class Subclassed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = TransposedLinear(8, 32), TransposedLinear(32, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def weight_normed():
    """``parametrizations.weight_norm``: the Linear's weight is computed (``aten._weight_norm``)."""
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(8, 32)), nn.ReLU(), nn.Linear(32, 4))


class Scan(nn.Module):
    """``cumsum`` along tokens: equivariant in the units, no handler."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h + 0.1 * torch.cumsum(h, 1)).mean(1)


class InnerTransformer(nn.Module):
    """``nn.TransformerEncoder`` inside a user's module: an fx leaf that torch.export sees through."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.t = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.t(self.inp(x)).mean(1))


class Attention(nn.Module):
    """q/k/v from one fused Linear, cut three ways."""

    def __init__(self, layout: str):
        super().__init__()
        self.layout = layout
        self.inp, self.o, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.w = nn.Parameter(torch.randn(48, 16) * 0.2)
        self.qb, self.kb, self.vb = (nn.Parameter(torch.randn(16)) for _ in range(3))

    def forward(self, x):
        B, N, _ = x.shape
        h = self.inp(x)
        if self.layout == "slices":  # y[..., i:i+16].view(B, N, 2, 8): "conflicting structure" before
            y = F.linear(h, self.w, torch.cat((self.qb, self.kb, self.vb)))
            q, k, v = [y[..., i : i + 16].view(B, N, 2, 8).transpose(1, 2) for i in (0, 16, 32)]
        elif self.layout == "cat":  # a bias made by cat, rows reshaped (3, heads, dim): the rows were in no group, silently
            y = F.linear(h, self.w, torch.cat((self.qb, self.kb, self.vb)))
            q, k, v = y.reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # head-major: each head's q, k, v rows together; one permutation shared by all heads before
            y = F.linear(h, self.w, torch.cat((self.qb, self.kb, self.vb)))
            q, k, v = [t.transpose(1, 2) for t in y.view(B, N, 2, 24).chunk(3, -1)]
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, 16)
        return self.out((h + self.o(a)).mean(1))


class Experts(nn.Module):
    """A mixture of experts stored as 3-D tensors (``einsum("td,eid->tei")`` ... ``einsum("tei,edi->ted")``):
    each expert's 8 hidden units used to share one permutation (8 units for 4 experts x 8)."""

    def __init__(self):
        super().__init__()
        self.inp, self.router, self.out = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)
        self.w1, self.w2 = nn.Parameter(torch.randn(4, 8, 16) * 0.3), nn.Parameter(torch.randn(4, 16, 8) * 0.3)

    def forward(self, x):
        h = self.inp(x)
        gate = torch.softmax(self.router(h), -1)
        u = torch.relu(torch.einsum("td,eid->tei", h, self.w1))
        return self.out(h + (gate.unsqueeze(-1) * torch.einsum("tei,edi->ted", u, self.w2)).sum(1))


class GatedExperts(Experts):
    """Experts with per-expert biases added by broadcasting (``(experts, hidden)``) and gate/up rows
    interleaved (``[g0, u0, g1, u1, ...]``, read as ``[..., ::2]`` and ``[..., 1::2]``), as GPT-OSS writes
    them: the biases used to tie every expert to one permutation, the strided slices fixed the units."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 16, 16) * 0.3)
        self.b1, self.b2 = nn.Parameter(torch.randn(4, 16) * 0.3), nn.Parameter(torch.randn(4, 16) * 0.3)

    def forward(self, x):
        h = self.inp(x)
        gate = torch.softmax(self.router(h), -1)
        gu = torch.einsum("td,eid->tei", h, self.w1) + self.b1
        u = torch.sigmoid(gu[..., ::2]) * gu[..., 1::2]
        return self.out(h + (gate.unsqueeze(-1) * (torch.einsum("tei,edi->ted", u, self.w2) + self.b2)).sum(1))


class WrittenInPlace(nn.Module):
    """Two branches written into slices of one buffer (``new_empty`` then ``out[:, :6] = a``, as
    DeepSeek-V3 builds its keys; or ``copy_``/``add_`` into a zeros tensor) and read by one layer: the
    writes were not seen, so the reader's columns were a free group of their own (a wrong merge)."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.a, self.b, self.c = how, nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(12, 4)

    def forward(self, x):
        if self.how == "setitem":
            out = x.new_empty(x.shape[0], 12)
            out[:, :6] = self.a(x)
            out[:, 6:] = torch.relu(self.b(x))
        else:
            out = torch.zeros(x.shape[0], 12)
            out[:, :6].copy_(self.a(x))
            out[:, 6:].add_(torch.relu(self.b(x)))
        return self.c(out)


class HeadBias(nn.Module):
    """Attention whose heads meet a per-head bias: ALiBi slopes built in forward (the heads keep their
    places, the dimensions inside each head still permute), a relative-position table indexed by
    head (its head axis moves with the heads), or scores over a flattened batch x heads axis."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.inp, self.q, self.k, self.v, self.o, self.out = (nn.Linear(a, b) for a, b in ((8, 16),) + ((16, 16),) * 4 + ((16, 4),))
        self.table = nn.Parameter(torch.randn(9, 2)) if kind == "table" else None

    def forward(self, x):
        B, N, _ = x.shape
        h = self.inp(x)
        split = lambda t: t.view(B, N, 2, 8).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        if self.kind == "flat":
            flat = lambda t: t.reshape(B * 2, N, 8)  # noqa: E731
            y = torch.bmm(torch.softmax(torch.bmm(flat(q), flat(k).transpose(1, 2)), -1), flat(v)).view(B, 2, N, 8)
        else:
            pos = torch.arange(N)
            if self.kind == "alibi":
                bias = torch.tensor([0.5, 0.25])[:, None, None] * (pos[None, None, :] - pos[None, :, None]).float()
            else:
                bias = self.table[pos[None, :] - pos[:, None] + 4].permute(2, 0, 1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out((h + self.o(y.transpose(1, 2).reshape(B, N, 16))).mean(1))


X2, X3 = (torch.randn(2, 8),), (torch.randn(2, 5, 8),)
ATTN = 16 + 16 + 16  # residual + Q/K (2 heads of 8) + V/O (2 heads of 8)
CASES = {
    "type_as": (TypeAs, X2, 32, "hidden 32"),
    "linear_subclass": (Subclassed, X2, 32, "hidden 32"),
    "weight_norm": (weight_normed, X2, 32, "hidden 32: weight_norm's direction rows and magnitude g"),
    "cumsum": (Scan, X3, 32, "hidden 32"),
    "inner_transformer": (InnerTransformer, X3, 16 + 16 + 16 + 32, "residual 16, Q/K 16, V/O 16, FFN 32"),
    "qkv_slices": (lambda: Attention("slices"), X3, ATTN, "residual 16 + Q/K 16 + V/O 16"),
    "qkv_cat_bias": (lambda: Attention("cat"), X3, ATTN, "residual 16 + Q/K 16 + V/O 16"),
    "qkv_head_major": (lambda: Attention("head_major"), X3, ATTN, "residual 16 + Q/K 16 + V/O 16, rows interleaved per head"),
    "experts_3d": (Experts, X2, 16 + 4 * 8 + 4, "residual 16 + 4 experts x 8 hidden (blocks) + the experts' order 4 (router rows)"),
    "experts_bias_interleaved": (GatedExperts, X2, 16 + 4 * 8 + 4, "residual 16 + 4 experts x 8 units of a gate and an up row each + router 4"),
    "write_into_slices": (lambda: WrittenInPlace("setitem"), X2, 12, "the two branches' 6 + 6 units, read by c as one axis"),
    "copy_into_slices": (lambda: WrittenInPlace("copy"), X2, 12, "the two branches' 6 + 6 units, read by c as one axis"),
    "alibi": (lambda: HeadBias("alibi"), X3, 16 + 4 * 8, "residual 16 + Q/K and V/O of each head on their own (the heads stay)"),
    "relative_table": (lambda: HeadBias("table"), X3, ATTN + 2, "residual 16 + Q/K 16 + V/O 16 + the table's 2 heads"),
    "flat_batch_heads": (lambda: HeadBias("flat"), X3, ATTN, "residual 16 + Q/K 16 + V/O 16"),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tracer", ["auto", "export"])
def test_long_tail_is_merged_by_construction(name, tracer):
    build, x, units, note = CASES[name]
    torch.manual_seed(0)
    model = randomize_(build().eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing is left unexplained
        spec = analyze(model, x, tracer=tracer)
    assert spec.permutable_units == units, note
    for seed in range(3):
        spec.check(model, x, seed=seed)
    twin = spec.apply_permutation(model, spec.random_permutation(seed=3))
    data = [torch.randn(8, *x[0].shape[1:], generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for mode in ("zip", "align"):
        merged = merge([model, twin], data=data, example_inputs=x, method="mudsc", mode=mode, reset_bn=False, max_iter=2,
                       tracer=tracer).model
        torch.testing.assert_close(merged(*x), model(*x), rtol=1e-4, atol=1e-5)


class MaskToken(nn.Module):
    """A parameter read only when a mask is passed: the permuted twin agreed without the mask and
    differed with it (0.13-0.20 on an output scale of 0.49) while the token was a free group."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.tok = nn.Parameter(torch.randn(16))

    def forward(self, x, mask=None):
        h = self.a(x)
        if mask is not None:
            h = torch.where(mask[..., None], self.tok, h)
        return self.b(torch.relu(h))


def test_a_parameter_the_trace_never_reads_is_fixed_with_a_warning():
    """Not a free group of its own (which the self-check cannot see), but fixed, and the warning says
    how to merge it: traced with a mask, the token joins the hidden units and a permuted copy agrees
    with the model on masked calls too."""
    torch.manual_seed(0)
    model, x = MaskToken().eval(), torch.randn(3, 8)
    with pytest.warns(UserWarning, match="never reads tok.*example inputs that use them"):
        spec = analyze(model, (x,))
    assert spec.permutable_units == 16 and spec.axes["tok"] == [Fixed(16)]
    mask = torch.tensor([True, False, True])
    with_mask = analyze(model, {"x": x, "mask": mask})
    assert ("tok", 0) in next(g for g in with_mask.free_groups() if g.size == 16).members
    twin = with_mask.apply_permutation(model, with_mask.random_permutation(seed=1))
    torch.testing.assert_close(twin(x, mask), model(x, mask))
    torch.testing.assert_close(twin(x), model(x))


def test_a_layer_fx_never_reaches_is_reported_too():
    """torch.fx copies only what the trace reads into its graph: a layer the forward skips used to
    be missing from the spec altogether; now it is fixed, named in the warning and in spec.fixed."""
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.spare = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 8)  # spare: never called

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Skips()
    with pytest.warns(UserWarning, match="never reads spare.weight, spare.bias"):
        spec = analyze(model, (torch.randn(3, 4),), tracer="fx")
    assert spec.fixed["spare.weight"] == {0: "never read by the traced forward", 1: "never read by the traced forward"}
    assert spec.permutable_units == 8


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.m, self.b = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, mem):
        return self.b(torch.relu(self.a(x) + self.m(mem)))


def test_several_inputs_per_batch():
    """A tuple batch is (inputs, labels): a forward of two inputs refuses it and says how to pass
    them; a dict keyed by the forward's names (labels left out) or ``inputs_from_batch`` works."""
    torch.manual_seed(0)
    models = [TwoInputs().eval() for _ in range(2)]
    pairs = [(torch.randn(6, 8), torch.randn(6, 8)) for _ in range(2)]
    with pytest.raises(MergeError, match=r"forward needs 2 inputs \(x, mem\).*\{'x': \.\.\., 'mem': \.\.\.\}.*inputs_from_batch="):
        merge(models, data=pairs)
    by_name = merge(models, data=[{"x": a, "mem": b, "y": torch.zeros(6)} for a, b in pairs], method="zipit")
    by_fn = merge(models, data=pairs, inputs_from_batch=lambda batch: tuple(batch), method="zipit")
    labelled = merge(models, data=[({"x": a, "mem": b}, torch.zeros(6)) for a, b in pairs], method="zipit")  # (inputs by name, labels)
    x, mem = pairs[0]
    torch.testing.assert_close(by_name.model(x, mem), by_fn.model(x, mem))
    torch.testing.assert_close(labelled.model(x, mem), by_fn.model(x, mem))
    assert by_name.spec.permutable_units == 16
