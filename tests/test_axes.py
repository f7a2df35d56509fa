"""Typed axis expressions (mudsc_graph.spec.axes): JSON in today's list format, queries checked by
hand, index arrays against brute-force permutations of ``torch.arange``, list-form specs accepted."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

try:
    from construct_models import CASES_BY_NAME
except ImportError:  # pragma: no cover - run from the repository root
    from tests.construct_models import CASES_BY_NAME

import mudsc_graph
from mudsc_graph.errors import SpecError
from mudsc_graph.spec import axes
from mudsc_graph.spec.axes import Concat, Fixed, GroupedIn, Kron, Units
from mudsc_graph.spec.merge_spec import Group, MergeSpec, Probe

# one expression of every kind, nested, with its JSON written out by hand
NESTED = Concat([Units(0), Fixed(3), Kron(Units(1), Fixed(4)), Kron(Fixed(2), Concat([Units(2), Units(0)]))])
NESTED_JSON = ["sum", [["g", 0], ["fixed", 3], ["kron", ["g", 1], ["fixed", 4]], ["kron", ["fixed", 2], ["sum", [["g", 2], ["g", 0]]]]]]
SIZES = {0: 5, 1: 6, 2: 7}


@pytest.mark.parametrize(
    "expr, data",
    [
        (Units(3), ["g", 3]),
        (Fixed(9), ["fixed", 9]),
        (Concat([Units(1), Units(1), Units(2)]), ["sum", [["g", 1], ["g", 1], ["g", 2]]]),
        (Kron(Units(0), Fixed(16)), ["kron", ["g", 0], ["fixed", 16]]),
        (GroupedIn(Units(4), 2), ["inner", ["g", 4], 2]),
        (NESTED, NESTED_JSON),
    ],
)
def test_json_round_trip_of_every_kind(expr, data):
    assert axes.to_json(expr) == data
    assert axes.from_json(data) == expr
    assert axes.from_json(json.loads(json.dumps(axes.to_json(expr)))) == expr
    assert hash(axes.from_json(data)) == hash(expr)  # frozen: usable as keys


@pytest.mark.parametrize("bad", [[], ["g"], ["g", "0"], ["g", True], ["fixed", -1], ["sum", ["g", 0]], ["kron", ["g", 0]], ["inner", ["g", 0], 0], ["mul", 1, 2], "g"])
def test_from_json_refuses_what_is_no_expression(bad):
    with pytest.raises(SpecError, match="not an axis expression"):
        axes.from_json(bad)


def test_walkers_refuse_list_form_with_a_hint():
    with pytest.raises(TypeError, match="from_json"):
        axes.group_ids(["g", 0])


def test_group_ids_and_size_by_hand():
    assert axes.group_ids(NESTED) == [0, 1, 2, 0]
    assert axes.size(NESTED, SIZES) == 5 + 3 + 6 * 4 + 2 * (7 + 5)
    assert axes.group_ids(GroupedIn(Concat([Units(3), Fixed(2)]), 4)) == [3]
    assert axes.group_ids(Kron(Fixed(2), Fixed(3))) == []
    assert axes.size(Kron(Fixed(2), Fixed(3)), {}) == 6
    with pytest.raises(ValueError, match="no size"):
        axes.size(GroupedIn(Units(0), 2), SIZES)
    assert axes.has_group(NESTED) and not axes.has_group(Fixed(3))
    assert axes.has_group(NESTED, lambda g: g == 2) and not axes.has_group(NESTED, lambda g: g == 5)


def test_simplify_renumber_relabel_ungroup():
    assert axes.simplify(Concat([Fixed(2), Kron(Fixed(3), Fixed(4))])) == Fixed(14)
    assert axes.simplify(Concat([Units(0), Kron(Fixed(3), Fixed(4))])) == Concat([Units(0), Fixed(12)])
    assert axes.renumber(NESTED, {0: 7, 2: 8}, SIZES) == Concat(
        [Units(7), Fixed(3), Kron(Fixed(6), Fixed(4)), Kron(Fixed(2), Concat([Units(8), Units(7)]))]
    )  # group 1 dropped: fixed, and not simplified
    assert axes.relabel(Kron(Units(1), Fixed(2)), lambda g: Units(g + 1)) == Kron(Units(2), Fixed(2))
    assert axes.ungroup([Units(0), GroupedIn(Units(1), 2), Fixed(3)]) == ([Units(0), Units(1), Fixed(3)], 2)
    assert axes.ungroup([Units(0), Fixed(3)]) == ([Units(0), Fixed(3)], 0)


def _perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def test_index_of_kron_and_sum_against_brute_force():
    p, q = _perm(5, 1), _perm(6, 2)
    perm, sizes = {0: p, 1: q}, {0: 5, 1: 6}
    # kron(g0, fixed 4): rows of a (5, 4) grid are the units
    assert torch.equal(axes.index(Kron(Units(0), Fixed(4)), perm, sizes), torch.arange(20).view(5, 4)[p].reshape(-1))
    # kron(fixed 3, g1): columns of a (3, 6) grid are the units
    assert torch.equal(axes.index(Kron(Fixed(3), Units(1)), perm, sizes), torch.arange(18).view(3, 6)[:, q].reshape(-1))
    # sum(g0, fixed 2, kron(g1, fixed 2), g0): each part permuted in place
    e = Concat([Units(0), Fixed(2), Kron(Units(1), Fixed(2)), Units(0)])
    n = axes.size(e, sizes)
    base = torch.arange(n)
    parts = list(base.split([5, 2, 12, 5]))
    brute = torch.cat([parts[0][p], parts[1], parts[2].view(6, 2)[q].reshape(-1), parts[3][p]])
    assert torch.equal(axes.index(e, perm, sizes), brute)
    assert torch.equal(axes.index(e, {}, sizes), base)  # groups left out keep the identity
    with pytest.raises(SpecError, match="no index array"):
        axes.index(GroupedIn(Units(0), 5), perm, sizes)


def test_grouped_conv_weight_permutation_against_brute_force():
    """The ``inner`` axis: permuting the packed weight equals densify -> permute rows and columns -> pack."""
    blocks, d_out, d_in = 3, 2, 4
    pi = _perm(blocks, 3)  # the shared block permutation of the coupled in/out groups
    gen = torch.Generator().manual_seed(4)
    p_out = torch.cat([pi[j] * d_out + torch.randperm(d_out, generator=gen) for j in range(blocks)])
    p_in = torch.cat([pi[j] * d_in + torch.randperm(d_in, generator=gen) for j in range(blocks)])
    w = torch.arange(blocks * d_out * d_in * 2, dtype=torch.float32).view(blocks * d_out, d_in, 2)
    spec = MergeSpec(
        [Group(0, blocks * d_out, blocks, coupled=(1,)), Group(1, blocks * d_in, blocks, coupled=(0,))],
        {"w": [Units(0), GroupedIn(Units(1), blocks), Fixed(2)]},
        {"w": tuple(w.shape)},
    )
    got = spec.permute_state_dict({"w": w}, {0: p_out, 1: p_in})["w"]
    dense = torch.zeros(blocks * d_out, blocks * d_in, 2)
    for j in range(blocks):
        dense[j * d_out : (j + 1) * d_out, j * d_in : (j + 1) * d_in] = w[j * d_out : (j + 1) * d_out]
    dense = dense[p_out][:, p_in]
    brute = torch.cat([dense[j * d_out : (j + 1) * d_out, j * d_in : (j + 1) * d_in] for j in range(blocks)])
    assert torch.equal(got, brute)


def test_take_slices_of_a_group():
    t = torch.arange(5 + 3 + 24 + 24).float()
    got = axes.take(t, NESTED, 0, SIZES)
    assert [tuple(x.shape) for x in got] == [(5,), (5, 2)]  # once plain, once under kron(fixed 2, ...)
    assert torch.equal(got[0], t[:5])
    tail = t[32:].view(2, 12)[:, 7:]  # the g0 part of each of the 2 fixed rows
    assert torch.equal(got[1], tail.T)
    assert axes.take(t, NESTED, 9, SIZES) == []


@pytest.mark.parametrize("case", ["grouped_conv", "conv_flatten_linear", "timm_attention", "resnext_block"])
def test_an_analysed_spec_survives_json(case):
    c = CASES_BY_NAME[case]
    torch.manual_seed(0)
    spec = mudsc_graph.analyze(c.make_model().eval(), c.make_inputs())
    again = MergeSpec.from_json(spec.to_json())
    assert again == spec
    assert again.to_json() == spec.to_json()
    assert all(axes.is_expr(e) for v in again.axes.values() for e in v)
    assert all(axes.is_expr(p.expr) for g in again.groups for p in g.probes)


def test_a_spec_saved_in_the_list_format_loads_and_writes_back_the_same_text():
    saved = json.dumps(
        {
            "version": 1,
            "groups": [
                {"id": 0, "size": 4, "blocks": 2, "fixed": False, "reason": None, "members": [["c.weight", 0], ["c.weight", 1]],
                 "probes": [{"node": "c", "axis": 1, "expr": ["sum", [["g", 0], ["fixed", 1]]], "consumer": True, "key": None, "handler": None}],
                 "coupled": []},
            ],
            "axes": {"c.weight": [["g", 0], ["inner", ["g", 0], 2], ["fixed", 3]], "fc.weight": [["fixed", 2], ["kron", ["g", 0], ["fixed", 9]]]},
            "shapes": {"c.weight": [4, 2, 3], "fc.weight": [2, 36]},
            "warnings": [],
            "consumed": {"c.weight": [1], "fc.weight": [1]},
            "buffers": [],
        }
    )
    spec = MergeSpec.from_json(saved)
    assert spec.axes["fc.weight"][1] == Kron(Units(0), Fixed(9))
    assert spec.axes["c.weight"][1] == GroupedIn(Units(0), 2)
    assert spec.groups[0].probes[0].expr == Concat([Units(0), Fixed(1)])
    assert spec.to_json() == saved
    spec.fixed = {"c.weight": {2: "kernel taps"}}  # the reasons of fixed axes travel with the spec
    assert MergeSpec.from_json(spec.to_json()).fixed == {"c.weight": {2: "kernel taps"}}


def test_hand_written_list_form_specs_are_converted_and_work():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).eval(), (torch.randn(4, 2),)
    members = [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]
    spec = MergeSpec(
        [Group(0, 3, members=members, probes=[Probe("_1", 1, ["g", 0], True)])],
        {"0.weight": [["g", 0], ["fixed", 2]], "0.bias": [["g", 0]], "2.weight": [["fixed", 2], ["g", 0]], "2.bias": [["fixed", 2]]},
        {"0.weight": (3, 2), "0.bias": (3,), "2.weight": (2, 3), "2.bias": (2,)},
        consumed={"2.weight": [1]},
    )
    assert spec.axes["2.weight"] == [Fixed(2), Units(0)] and spec.groups[0].probes[0].expr == Units(0)
    spec.check(model, x)
    perm = {0: torch.tensor([2, 0, 1])}
    state = spec.permute_state_dict(model.state_dict(), perm)
    assert torch.equal(state["0.weight"], model[0].weight[perm[0]]) and torch.equal(state["2.weight"], model[2].weight[:, perm[0]])
    assert json.loads(spec.to_json())["axes"]["2.weight"] == [["fixed", 2], ["g", 0]]


def test_interleave_index_take_and_merge_against_brute_force():
    """Head-major fused rows: 3 heads, each [q (2), k (2), v (4)]; Q/K is a group of 3 blocks of 2,
    V/O of 3 blocks of 4, moving their blocks together. The index array moves whole segments and
    permutes inside each block; ``take`` reads each group's rows; merging by permutation matrices
    along the axis equals indexing by the same permutation."""
    from mudsc_graph.merging.weights import apply_along

    e = axes.Interleave([Units(0), Units(0), Units(1)], 3)
    sizes = {0: 6, 1: 12}
    assert axes.from_json(axes.to_json(e)) == e and axes.to_json(e) == ["interleave", [["g", 0], ["g", 0], ["g", 1]], 3]
    assert axes.size(e, sizes) == 24 and axes.group_ids(e) == [0, 0, 1]
    blocks = [2, 0, 1]  # new head j is old head blocks[j]
    inner_qk = [[1, 0], [0, 1], [1, 0]]  # inside each old head
    inner_v = [[3, 2, 1, 0], [0, 1, 2, 3], [1, 3, 0, 2]]
    p_qk = torch.tensor([blocks[j] * 2 + inner_qk[blocks[j]][t] for j in range(3) for t in range(2)])
    p_v = torch.tensor([blocks[j] * 4 + inner_v[blocks[j]][t] for j in range(3) for t in range(4)])
    expected = []
    for j in range(3):  # by hand: new segment j is old segment blocks[j], its q, k and v rows permuted
        old = blocks[j] * 8
        expected += [old + t for t in inner_qk[blocks[j]]] + [old + 2 + t for t in inner_qk[blocks[j]]]
        expected += [old + 4 + t for t in inner_v[blocks[j]]]
    idx = axes.index(e, {0: p_qk, 1: p_v}, sizes)
    assert idx.tolist() == expected
    rows = torch.arange(24.0)[:, None].repeat(1, 2)
    got = axes.take(rows, e, 1, sizes)
    assert len(got) == 1 and got[0][:, 0].tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    perm_matrix = lambda p: torch.eye(p.numel())[p]  # noqa: E731  (new x old)
    mats = {0: perm_matrix(p_qk), 1: perm_matrix(p_v)}
    w = torch.randn(24, 5)
    torch.testing.assert_close(apply_along(w, 0, e, mats.get, sizes), w[idx])
