"""nn.LSTM and nn.GRU: their hidden units are merge groups, with both tracers.

Per layer and direction the ``H`` hidden units are one group: the rows of ``weight_ih``,
``weight_hh`` and the biases in every gate block (LSTM: i, f, g, o; GRU: r, z, n), the columns of
``weight_hh``, and the next layer's (or the consumer's) input columns. ``h_n`` / ``c_n`` stack the
layers and directions on axis 0: a model that returns them keeps every hidden group fixed.

For every case: ``spec.permutable_units`` equals a hand count; ``spec.check`` passes; a permuted
copy merges back into the model (zip and align), which needs the internal probes of the layers
that no graph value shows. Plus a hand-made permutation that does not trust the analysis.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

try:
    from test_constructs import randomize_
except ImportError:  # tests/ collected as a package
    from tests.test_constructs import randomize_

import mudsc_graph
from mudsc_graph.spec.axes import to_json

T, F, B = 5, 4, 3  # time steps, input features, batch
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
TRACERS = ("fx", "export")


class Seq(nn.Module):
    """Linear(4, 8) -> cell(8, 6, ...) -> Linear(6 * D, 3).

    ``head``: ``"seq"`` reads the output sequence and ignores h_n; ``"returns_hn"`` also returns
    the final state; ``"last_hidden"`` classifies from ``h_n[-1]`` (the last layer's last direction).
    """

    def __init__(self, cell, head="seq", **kw):
        super().__init__()
        self.head, self.lstm = head, cell is nn.LSTM
        self.fc = nn.Linear(F, 8)
        self.rnn = cell(8, 6, **kw)
        d = 2 if kw.get("bidirectional") else 1
        self.out = nn.Linear(6 if head == "last_hidden" else 6 * d, 3)

    def forward(self, x):
        y, state = self.rnn(self.fc(x))
        if self.head == "seq":
            return self.out(y)
        if self.head == "returns_hn":
            return self.out(y), state
        h_n = state[0] if self.lstm else state
        return self.out(h_n[-1])


class GivenState(nn.Module):
    """The initial hidden state is a model input (fixed): every hidden group reaches it."""

    def __init__(self, cell):
        super().__init__()
        self.lstm = cell is nn.LSTM
        self.fc = nn.Linear(F, 8)
        self.rnn = cell(8, 6, num_layers=2, batch_first=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x, h0):
        hx = (h0, torch.zeros_like(h0)) if self.lstm else h0
        return self.out(self.rnn(self.fc(x), hx)[0])


class LearnedState(nn.Module):
    """The initial hidden state is computed by a Linear(4, 2 * 6), viewed as (layers, B, H): its rows
    are the two layers' hidden groups (c0, when there is one, is zeros)."""

    def __init__(self, cell):
        super().__init__()
        self.lstm = cell is nn.LSTM
        self.fc, self.init = nn.Linear(F, 8), nn.Linear(F, 12)
        self.rnn = cell(8, 6, num_layers=2, batch_first=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h0 = self.init(x.mean(1)).view(x.shape[0], 2, 6).transpose(0, 1).contiguous()
        hx = (h0, torch.zeros_like(h0)) if self.lstm else h0
        return self.out(self.rnn(self.fc(x), hx)[0])


# id: (make(cell), batch_first, expected permutable units, how the count is made)
CASES = {
    "1layer": (lambda c: Seq(c), False, 14, "8 (fc rows = rnn input) + 6 (hidden)"),
    "2layers": (lambda c: Seq(c, num_layers=2, batch_first=True), True, 20, "8 + 6 (layer 0) + 6 (layer 1)"),
    "bidir2": (lambda c: Seq(c, num_layers=2, bidirectional=True), False, 32, "8 + 2 * 6 (layer 0 fwd, bwd) + 2 * 6 (layer 1)"),
    "bidir2-bf": (lambda c: Seq(c, num_layers=2, bidirectional=True, batch_first=True), True, 32, "8 + 2 * 6 + 2 * 6"),
    "returns_hn": (lambda c: Seq(c, "returns_hn", num_layers=2, bidirectional=True, batch_first=True), True, 8,
                   "8: h_n (and c_n) is returned, so all four hidden groups are fixed"),
    "last_hidden": (lambda c: Seq(c, "last_hidden", num_layers=2, bidirectional=True), False, 32,
                    "8 + 4 * 6: h_n[-1] is layer 1 backward, read by out; layer 1 forward reaches nothing (free)"),
    "given_state": (GivenState, True, 8, "8: h0 is a model input, fixed, and holds both layers' hidden units"),
    "learned_state": (LearnedState, True, 20, "8 + 6 + 6: init's rows are the hidden groups, not groups of their own"),
}
# torch.export takes about a second per model on one core: it gets the cases that cover each feature
# (1 and 2 layers, bidirectional, batch_first either way, h_n returned), fx gets every case
EXPORT_CASES = ("1layer", "2layers", "bidir2", "returns_hn")
MERGE_CASES = {"fx": ("1layer", "2layers", "bidir2", "last_hidden"), "export": ("bidir2",)}


def _inputs(name, batch=B, seed=0):
    batch_first = CASES[name][1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, T, F) if batch_first else (T, batch, F), generator=g)
    if name == "given_state":
        return (x, torch.randn(2, batch, 6, generator=g))
    return (x,)


@functools.lru_cache(maxsize=None)
def _analyzed(cell, name, tracer):
    torch.manual_seed(0)
    model = randomize_(CASES[name][0](CELLS[cell]).eval())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*unsupported")  # no op of these models may be left unsupported
        spec = mudsc_graph.analyze(model, _inputs(name), tracer=tracer)
    return model, spec


def _describe(spec):
    return [(g.size, g.blocks, g.fixed, g.reason, g.members[:4]) for g in spec.groups]


@pytest.mark.parametrize("name, tracer", [(n, "fx") for n in CASES] + [(n, "export") for n in EXPORT_CASES])
@pytest.mark.parametrize("cell", list(CELLS))
def test_hidden_units_are_groups(cell, name, tracer):
    model, spec = _analyzed(cell, name, tracer)
    assert spec.permutable_units == CASES[name][2], (CASES[name][3], _describe(spec))
    spec.check(model, _inputs(name))


@pytest.mark.parametrize("cell", list(CELLS))
def test_gate_blocks_and_recurrent_columns(cell):
    """weight_ih rows are sum(h, h, h[, h]) of one group; weight_hh columns read it."""
    _, spec = _analyzed(cell, "2layers", "fx")
    G = 4 if cell == "lstm" else 3
    for l in (0, 1):
        rows = to_json(spec.axes[f"rnn.weight_ih_l{l}"][0])
        assert rows[0] == "sum" and len(rows[1]) == G and all(e == rows[1][0] for e in rows[1]), rows
        assert [to_json(e) for e in spec.axes[f"rnn.weight_hh_l{l}"]] == [rows, rows[1][0]]
        assert [to_json(e) for e in spec.axes[f"rnn.bias_ih_l{l}"]] == [to_json(e) for e in spec.axes[f"rnn.bias_hh_l{l}"]] == [rows]
        assert 1 in spec.consumed[f"rnn.weight_hh_l{l}"]
    assert spec.axes["rnn.weight_ih_l1"][1] == spec.axes["rnn.weight_hh_l0"][1]  # layer 1 reads layer 0
    assert spec.axes["rnn.weight_ih_l0"][1] == spec.axes["fc.weight"][0]


def test_projections_are_unsupported():
    """The handler gives up on projections; the equivariance probe then measures the LSTM from outside:
    its hidden units stay fixed (with a warning), and the Linear's 8 outputs, which weight_ih's columns
    read, are merged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(F, 8), nn.LSTM(8, 6, proj_size=3)).eval()
    x = (torch.randn(T, B, F),)
    for tracer in TRACERS:
        with pytest.warns(UserWarning, match="proj"):
            spec = mudsc_graph.analyze(model, x, tracer=tracer)
        assert spec.permutable_units == 8
        assert {("0.weight", 0), ("1.weight_ih_l0", 1)} <= set(spec.free_groups()[0].members)
        spec.check(model, x)


# --------------------------------------------------------------------------- by hand


def _permute_by_hand(model, layer, direction, perm, only_ih_rows=False):
    """A copy of a ``Seq`` model with hidden units of (layer, direction) permuted in every tensor
    that holds them; with ``only_ih_rows`` in weight_ih's rows alone (not a valid permutation)."""
    m = copy.deepcopy(model)
    rnn = m.rnn
    H, D = rnn.hidden_size, 2 if rnn.bidirectional else 1
    G = 4 if isinstance(rnn, nn.LSTM) else 3
    sfx = f"_l{layer}" + ("_reverse" if direction else "")
    rows = torch.cat([g * H + perm for g in range(G)])  # the same permutation in every gate block
    cols = torch.arange(D * H)
    cols[direction * H : (direction + 1) * H] = direction * H + perm  # the layer's output: cat of directions
    with torch.no_grad():
        w = getattr(rnn, f"weight_ih{sfx}")
        w.copy_(w[rows])
        if only_ih_rows:
            return m
        w = getattr(rnn, f"weight_hh{sfx}")
        w.copy_(w[rows][:, perm])
        for b in ("bias_ih", "bias_hh"):
            b = getattr(rnn, f"{b}{sfx}")
            b.copy_(b[rows])
        if layer + 1 < rnn.num_layers:
            for d in range(D):
                w = getattr(rnn, f"weight_ih_l{layer + 1}" + ("_reverse" if d else ""))
                w.copy_(w[:, cols])
        else:
            m.out.weight.copy_(m.out.weight[:, cols])
    return m


@pytest.mark.parametrize("layer, direction, bidirectional", [(0, 0, False), (0, 1, True), (1, 0, True)])
@pytest.mark.parametrize("cell", list(CELLS))
def test_permutation_by_hand(cell, layer, direction, bidirectional):
    torch.manual_seed(0)
    model = Seq(CELLS[cell], num_layers=2, bidirectional=bidirectional).eval()
    x = torch.randn(T, B, F)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    good = _permute_by_hand(model, layer, direction, perm)
    bad = _permute_by_hand(model, layer, direction, perm, only_ih_rows=True)
    with torch.no_grad():
        y = model(x)
        assert torch.allclose(good(x), y, atol=1e-6)
        assert (bad(x) - y).abs().max() > 1e-3  # the test can fail
        # h_n moves with the permutation at index layer * D + direction only: why returning it fixes the group
        h_old, h_new = (m.rnn(m.fc(x))[1] for m in (model, good))
        if cell == "lstm":
            h_old, h_new = h_old[0], h_new[0]
        j = layer * (2 if bidirectional else 1) + direction
        assert torch.allclose(h_new[j], h_old[j][..., perm], atol=1e-6)
        assert not torch.allclose(h_new[j], h_old[j], atol=1e-3)
        others = [i for i in range(h_old.shape[0]) if i != j]
        assert torch.allclose(h_new[others], h_old[others], atol=1e-6)


# --------------------------------------------------------------------------- merging


@pytest.mark.parametrize("name, tracer", [(n, t) for t in TRACERS for n in MERGE_CASES[t]])
@pytest.mark.parametrize("cell", list(CELLS))
def test_permuted_copy_merges_back(cell, name, tracer):
    model, spec = _analyzed(cell, name, tracer)
    twin = spec.apply_permutation(model, spec.random_permutation(seed=1))
    (x,) = _inputs(name)
    data = [_inputs(name, batch=16, seed=s)[0] for s in (1, 2)]
    with torch.no_grad():
        assert (twin.rnn.weight_ih_l0 - model.rnn.weight_ih_l0).abs().max() > 1e-3  # really permuted
        want = model(x)
    # mudsc_graph.merge([model, twin], data=data, ..., mode=mode) for both modes, tracing and probing once
    prepared = mudsc_graph.prepare([model, twin], data=data, reset_bn=False, tracer=tracer)
    for mode in ("zip", "align"):
        result = prepared.merge(method="mudsc", mode=mode, alpha=0.5, max_iter=3)
        with torch.no_grad():
            assert torch.allclose(result.model(x), want, atol=1e-4), (mode, (result.model(x) - want).abs().max())
