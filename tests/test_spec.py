"""MergeSpec: permutations respect structure, JSON round trip, the self-check catches bad specs, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from mudsc_graph import MergeSpec, SpecCheckError, TraceError, analyze, get_registry
from mudsc_graph.spec.axes import from_json, to_json


def _arch(name, batch=2):
    torch.manual_seed(0)
    arch = get_registry().architecture(name)
    return arch.build().eval(), arch.example_inputs(batch)


@pytest.fixture(scope="module")
def vit():
    model, x = _arch("timm_vit_tiny")
    return model, x, analyze(model, x)


def test_random_permutation_moves_whole_blocks_and_shares_them_across_couplings(vit):
    _, _, spec = vit
    perm = spec.random_permutation(seed=5)
    heads = [g for g in spec.free_groups() if g.blocks > 1]
    assert heads
    for g in heads:
        p = perm[g.id]
        assert sorted(p.tolist()) == list(range(g.size))
        blocks = p.view(g.blocks, g.block_size) // g.block_size
        assert (blocks == blocks[:, :1]).all(), "a block was torn apart"
        for c in g.coupled:
            other = perm[c].view(g.blocks, -1) // spec.group(c).block_size
            assert torch.equal(other[:, 0], blocks[:, 0]), "coupled groups must share the block permutation"
    assert any(not torch.equal(perm[g.id], torch.arange(g.size)) for g in spec.free_groups())


def test_fused_qkv_rows_are_qk_qk_v(vit):
    _, _, spec = vit
    rows = to_json(spec.axes["blocks.0.attn.qkv.weight"][0])
    assert rows[0] == "sum" and len(rows[1]) == 3
    (_, qk1), (_, qk2), (_, v) = rows[1]
    assert qk1 == qk2 != v
    assert spec.group(qk1).blocks == 4 and spec.group(qk1).coupled == (v,)
    assert to_json(spec.axes["blocks.0.attn.proj.weight"][1]) == ["g", v]


def test_permutation_round_trip_gives_the_weights_back(vit):
    model, x, spec = vit
    perm = spec.random_permutation(seed=2)
    inverse = {k: torch.argsort(v) for k, v in perm.items()}
    back = spec.apply_permutation(spec.apply_permutation(model, perm), inverse)
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


def test_json_round_trip(vit):
    model, x, spec = vit
    again = MergeSpec.from_json(spec.to_json())
    assert again == spec
    assert again.permutable_units == spec.permutable_units
    again.check(model, x)


def test_probes_name_real_nodes_and_prefer_consumer_inputs():
    model, x = _arch("resnet20")
    from mudsc_graph import analyze_full

    result = analyze_full(model, x)
    nodes = set(result.graph.nodes)
    for g in result.spec.free_groups():
        assert g.probes, f"group {g.id} has no probe"
        assert all(p.node in nodes for p in g.probes)
        assert g.probes[0].consumer


def test_check_catches_a_spec_that_links_too_little():
    model, x = _arch("resnet20")
    with torch.no_grad():
        model.bn1.weight.normal_()  # default init is all ones, which any permutation keeps
    spec = analyze(model, x)
    bad = copy.deepcopy(spec)
    # pretend bn1's affine has a space of its own: permuting it alone must change the output
    from mudsc_graph.spec.merge_spec import Group

    new = Group(len(bad.groups), 16)
    new.members = [("bn1.weight", 0)]
    bad.groups.append(new)
    bad.axes["bn1.weight"] = [from_json(["g", new.id])]
    with pytest.raises(SpecCheckError, match=f"group {new.id} .*bn1.weight"):
        bad.check(model, x, seed=1)


def test_check_randomised_batchnorm_statistics_matter():
    """Guards the check itself: permuting a BN's running stats alone changes the output."""
    model, x = _arch("resnet20")
    with torch.no_grad():
        model.bn1.running_mean.normal_()
        y = model(*x)
        model.bn1.running_mean.copy_(model.bn1.running_mean.flip(0))
        assert not torch.allclose(model(*x), y)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return x


def test_untraceable_model_names_the_code_and_what_to_do():
    with pytest.raises(TraceError) as err:
        analyze(DataDependent(), (torch.randn(2, 4),))
    msg = str(err.value)
    assert "cannot trace DataDependent with torch.fx or torch.export" in msg and "\n" not in msg
    assert "test_spec.py" in msg and "if x.sum() > 0" in msg and "module <top>: DataDependent" in msg
    assert "register a LayerHandler for DataDependent" in msg and "torch.where" in msg
    assert "mudsc_graph" not in msg and "trace.py" not in msg  # never points into mudsc's own files


def test_wrong_example_inputs_are_a_clear_error():
    with pytest.raises(TraceError, match="example inputs"):
        analyze(nn.Linear(4, 3), (torch.randn(2, 5),))


def test_a_single_tensor_is_accepted_as_example_inputs():
    spec = analyze(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4))
    assert spec.permutable_units == 8


def test_consumed_axes_are_the_weight_columns(vit):
    _, _, spec = vit
    assert spec.consumed["blocks.0.attn.qkv.weight"] == [1]
    assert spec.consumed["blocks.0.attn.proj.weight"] == [1]
    assert spec.consumed["patch_embed.proj.weight"] == [1]
    assert "blocks.0.norm1.weight" not in spec.consumed and "pos_embed" not in spec.consumed


def test_consumed_axes_of_torchvision_attention_and_grouped_convs():
    model, x = _arch("vit_tiny")
    spec = analyze(model, x)
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert spec.consumed[f"{attn}.in_proj_weight"] == [1] and spec.consumed[f"{attn}.out_proj.weight"] == [1]
    conv = nn.Conv2d(4, 8, 3, groups=2)
    spec = analyze(nn.Sequential(nn.Conv2d(3, 4, 1), conv, nn.ReLU(), nn.Conv2d(8, 2, 1)), (torch.randn(1, 3, 5, 5),))
    assert spec.consumed["1.weight"] == [1] and to_json(spec.axes["1.weight"][1])[0] == "inner"
