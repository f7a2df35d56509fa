"""Models of different depths (merging/depth.py) against exact oracles: a deeper copy of a model
made by inserting identity blocks (zero residual branches) merges with it back to the model, and
the alignment found keeps the real blocks; what cannot be aligned is one clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mudsc_graph import MergeError, analyze, merge
from mudsc_graph.merging.depth import cka, segments
from mudsc_plugins.zoo.resnet_cifar import ResNetCIFAR

from test_merge import _data, _model, _permuted


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    err = float((got - want).abs().max() / want.abs().max())
    assert err < tol, f"relative difference {err}"


def _deeper(model: nn.Module, insert: dict[str, list[int]], seed: int = 5) -> nn.Module:
    """``model`` (a CIFAR ResNet) with identity blocks inserted at the given positions of each stage:
    random convolutions, their residual branch's last BatchNorm zeroed (relu(x + 0) = x after a ReLU)."""
    counts = [len(model.layer1), len(model.layer2), len(model.layer3)]
    for k, stage in enumerate(("layer1", "layer2", "layer3")):
        counts[k] += len(insert.get(stage, []))
    width = model.conv1.out_channels / 16
    torch.manual_seed(seed)
    deep = ResNetCIFAR(tuple(counts), num_classes=model.linear.out_features, width=width).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layer")}
    for stage in ("layer1", "layer2", "layer3"):
        old, new = getattr(model, stage), getattr(deep, stage)
        src = iter(range(len(old)))
        for j in range(len(new)):
            if j in insert.get(stage, []):
                with torch.no_grad():
                    new[j].bn2.weight.zero_()
                    new[j].bn2.bias.zero_()
                    new[j].bn1.running_mean.uniform_(-0.2, 0.2)
                continue
            new[j].load_state_dict(old[next(src)].state_dict())
    deep.load_state_dict({**deep.state_dict(), **state})
    return deep


def test_segments_is_the_best_monotone_split():
    score = torch.tensor([[0.9, 0.1, 0.1, 0.1], [0.1, 0.2, 0.8, 0.8], [0.0, 0.0, 0.0, 0.9]])
    assert segments(score) == [0, 2, 3]  # the later of two equal ends
    x = torch.randn(30, 7)
    assert cka(x, x[:, torch.randperm(7)]) == pytest.approx(1.0)  # units' order does not matter


@pytest.mark.parametrize("insert", [{"layer2": [2]}, {"layer1": [0], "layer3": [1, 3]}], ids=["one", "three"])
@pytest.mark.parametrize("order", ["shallow-first", "deep-first"])
def test_a_model_and_a_deeper_copy_with_identity_blocks_merge_back(insert, order):
    arch, a = _model("resnet20")
    data = _data(arch)
    deep = _permuted(_deeper(a, insert), (data[0],), seed=3)
    models = [a, deep] if order == "shallow-first" else [deep, a]
    with pytest.warns(UserWarning, match="models of different depths"):
        r = merge(models, data=data, reset_bn=False, max_iter=10)
    d = 1 if order == "shallow-first" else 0
    for stage, where in insert.items():
        n = len(getattr(a, stage))
        assert r.depth_alignment[d][stage] == [k for k in range(n + len(where)) if k not in where]  # the real blocks
    assert len(r.model.layer1) == len(r.model.layer2) == len(r.model.layer3) == 3
    with torch.no_grad():
        x = _data(arch, 1, seed=9)[0]
        _close(r.model(x), a(x))


def test_the_alignment_can_be_given_and_is_checked():
    arch, a = _model("resnet20")
    data = _data(arch)
    deep = _deeper(a, {"layer2": [1]})  # (a stage's first block reshapes: no identity block goes before it)
    r = merge([a, deep], data=None, example_inputs=(data[0],), method="weight_matching", reset_bn=False,
              depth_alignment={1: {"layer2": [0, 2, 3]}})
    assert r.depth_alignment == {1: {"layer2": [0, 2, 3]}}
    with torch.no_grad():
        _close(r.model(data[1]), a(data[1]))
    with pytest.raises(MergeError, match="give 3 increasing block indices"):
        merge([a, deep], data=data, depth_alignment={1: {"layer2": [0, 0, 3]}})
    with pytest.raises(MergeError, match="needs calibration data"):
        merge([a, deep], data=None, example_inputs=(data[0],), method="weight_matching", reset_bn=False)


def test_models_that_differ_beyond_their_chains_are_refused():
    arch, a = _model("resnet20")
    other = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(MergeError):
        merge([a, other], data=_data(arch))


def test_a_hugging_face_llama_with_an_identity_layer_and_a_wider_mlp_merges_back(tmp_path):
    """transformers' Llama: 2 layers, and 3 with an identity layer (o_proj and down_proj zero) and a
    wider MLP (a Net2Net copy): merged at 2 layers and the first's sizes, saved and loaded back."""
    import importlib
    import os

    transformers = importlib.import_module("transformers") if os.environ.get("CI") else pytest.importorskip("transformers")
    from mudsc_graph.merging.widths import net2net

    def config(layers: int) -> object:
        return transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)

    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(config(2)).eval()
    for m in a.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.weight.data.uniform_(0.5, 1.5)
    deep = transformers.LlamaForCausalLM(config(3)).eval()
    state = a.state_dict()
    moved = {k.replace("layers.1.", "layers.2."): v for k, v in state.items() if "layers.1." in k}
    deep.load_state_dict({**deep.state_dict(), **{k: v for k, v in state.items() if "layers.1." not in k}, **moved})
    with torch.no_grad():
        deep.model.layers[1].self_attn.o_proj.weight.zero_()
        deep.model.layers[1].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 40, (8, 12))
    spec = analyze(deep, {"input_ids": ids[:2]})
    mlp = [g.id for g in spec.free_groups() if g.size == 24]
    deep = net2net(deep, spec, {g: 36 for g in mlp})
    with pytest.warns(UserWarning, match="model 1 keeps model.layers blocks \\[0, 2\\]"):
        r = merge([a, deep], data=[{"input_ids": ids}], method="zipit", matcher_options={"a": 1.0})
    assert (r.model.config.num_hidden_layers, r.model.config.intermediate_size) == (2, 24)
    with torch.no_grad():
        ref = a(input_ids=ids).logits
        _close(r.model(input_ids=ids).logits, ref)
    r.model.save_pretrained(tmp_path)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        _close(back(input_ids=ids).logits, ref)


def test_the_command_line_merges_a_resnet20_and_a_resnet32(tmp_path):
    import json

    from typer.testing import CliRunner

    from mudsc_cli.app import app
    from mudsc_graph import get_registry
    from mudsc_graph.io.checkpoints import load_checkpoint

    arch = get_registry().architecture("resnet20")
    torch.manual_seed(0)
    torch.save(arch.build().state_dict(), tmp_path / "r20.pt")
    torch.save(arch.build(num_blocks=(5, 5, 5)).state_dict(), tmp_path / "r32.pt")
    run = lambda *args: CliRunner().invoke(app, [str(x) for x in args])  # noqa: E731
    both = ("merge", tmp_path / "r20.pt", tmp_path / "r32.pt", "--arch", "resnet20", "--model-arch-opt", "1:num_blocks=(5, 5, 5)",
            "--data", "mnist5k", "--samples", "50", "--method", "zipit", "--quiet")
    r = run(*both, "--out", tmp_path / "m.pt")
    assert r.exit_code == 0 and "models of different depths: model 1 keeps layer1 blocks" in r.output, r.output
    r = run(*both, "--depth-alignment", "1:layer2=0,3,4", "--out", tmp_path / "g.pt")
    assert r.exit_code == 0, r.output
    meta = load_checkpoint(tmp_path / "g.pt")[1]
    assert meta["depth_alignment"]["1"]["layer2"] == [0, 3, 4] and len(meta["depth_alignment"]["1"]) == 3
    ev = run("eval", tmp_path / "g.pt", "--arch", "resnet20", "--data", "mnist5k", "--json")
    assert ev.exit_code == 0 and 0 <= json.loads(ev.output)["accuracy"] <= 1, ev.output
    bad = run(*both, "--depth-alignment", "1:layer2=zero", "--out", tmp_path / "x.pt")
    assert bad.exit_code == 1 and "is not I:CHAIN=K,K" in bad.output and not (tmp_path / "x.pt").exists()


def test_three_models_two_of_them_deeper():
    arch, a = _model("resnet20")
    data = _data(arch)
    deep = _deeper(a, {"layer2": [2], "layer3": [1]})
    other = _permuted(_deeper(a, {"layer1": [3]}), (data[0],), seed=6)
    with pytest.warns(UserWarning, match="models of different depths"):
        r = merge([a, _permuted(deep, (data[0],), seed=3), other], data=data, reset_bn=False, max_iter=10,
                  matcher_options={"a": 1.0})  # three copies of a unit: no decay, so they fuse before any other pair
    assert r.depth_alignment == {1: {"layer2": [0, 1, 3], "layer3": [0, 2, 3]}, 2: {"layer1": [0, 1, 2]}}
    with torch.no_grad():
        x = _data(arch, 1, seed=9)[0]
        _close(r.model(x), a(x))


def test_a_batch_the_models_refuse_while_aligning_is_one_line():
    arch, a = _model("resnet20")
    deep = _deeper(a, {"layer2": [1]})
    with pytest.raises(MergeError, match="aligning depths: ResNetCIFAR failed on calibration batch 0"):
        merge([a, deep], data=[torch.randn(4, 5, 32, 32)], example_inputs=(_data(arch)[0],), reset_bn=False)
