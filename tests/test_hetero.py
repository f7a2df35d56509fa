"""Models of different widths (merging/hetero.py) against exact oracles: a model merged with a wider
Net2Net copy of itself (units duplicated, consumers split, permuted or not) comes back at either
width with zip, for N = 2 and 3; what cannot be merged yet is one clear error."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch import nn

from mudsc_graph import MergeError, analyze, merge
from mudsc_graph.merging.widths import expressible, net2net, target_units

from test_merge import _data, _model, _permuted

EXACT_ZIP = {"matcher_options": {"a": 1.0}}  # no similarity decay: every copy of a unit fuses before any other pair


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    err = float((got - want).abs().max() / want.abs().max())
    assert err < tol, f"relative difference {err}"


def _wider(model: nn.Module, x: torch.Tensor, width: float = 2.0, seed: int = 3) -> nn.Module:
    spec = analyze(model, (x[:2],))
    units, _ = expressible(model, spec, target_units(spec, [g.id for g in spec.free_groups()], width, 2), (x[:2],))
    return net2net(model, spec, units, seed=seed)


@pytest.mark.parametrize("name", ["mlp", "resnet20", "vgg11_bn"])
@pytest.mark.parametrize("method", ["zipit", "mudsc"])
def test_a_model_and_its_wider_copy_merge_back_at_either_width(name, method):
    arch, a = _model(name)
    data = _data(arch)
    # activation-only zip cannot tell apart units dead on all calibration data: exact on that data (as test_merge)
    x = data[1] if method == "zipit" else _data(arch, 1, seed=9)[0]
    wide = _wider(a, data[0])
    first = next(iter(a.state_dict()))
    for models, width in (([a, wide], a.state_dict()[first].shape[0]), ([wide, a], wide.state_dict()[first].shape[0])):
        r = merge(models, data=data, method=method, reset_bn=False, max_iter=10, **EXACT_ZIP)
        assert r.model.state_dict()[first].shape[0] == width  # model 0's width
        with torch.no_grad():
            _close(r.model(x), a(x))


def test_three_models_of_two_widths_permuted():
    arch, a = _model("resnet20")
    data = _data(arch)
    x = _data(arch, 1, seed=9)[0]
    wide = _wider(a, data[0], 1.5)
    r = merge([a, _permuted(wide, (data[0],), seed=4), _permuted(a, (data[0],), seed=5)], data=data, reset_bn=False,
              max_iter=10, **EXACT_ZIP)
    with torch.no_grad():
        _close(r.model(x), a(x))


def test_a_width_budget_on_models_of_different_widths_counts_from_model_0():
    arch, a = _model("mlp")
    data = _data(arch)
    wide = _wider(a, data[0])
    r = merge([a, wide], data=data, width=1.5, reset_bn=False, max_iter=5, **EXACT_ZIP)
    assert r.model.layers[0].out_features == int(1.5 * a.layers[0].out_features)
    with torch.no_grad():
        x = _data(arch, 1, seed=9)[0]
        _close(r.model(x), a(x))


def test_align_merges_at_the_widest_width_and_bn_reset_runs():
    arch, a = _model("resnet20")
    _, b = _model("resnet20", seed=1)
    data = _data(arch)
    wide = _wider(b, data[0])
    r = merge([a, wide], data=data, method="mudsc", mode="align", max_iter=3)
    assert r.model.conv1.out_channels == wide.conv1.out_channels
    assert r.model(_data(arch, 1, seed=9)[0]).shape[-1] == a(data[0]).shape[-1]


def test_refit_on_models_of_different_widths_comes_back():
    arch, a = _model("mlp")
    data = _data(arch)
    wide = _wider(a, data[0])
    r = merge([wide, a], data=data, reset_bn=False, max_iter=5, refit=True, **EXACT_ZIP)
    with torch.no_grad():
        x = _data(arch, 1, seed=9)[0]
        _close(r.model(x), a(x))


# -- refused, one line each ------------------------------------------------------------------------------
def test_other_depths_are_merged_at_the_shallower_one():
    """An MLP of 3 hidden layers and one of 2 (depth.py aligns them): the merged model has 2."""
    from mudsc_graph import get_registry

    arch = get_registry().architecture("mlp")
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    with pytest.warns(UserWarning, match="models of different depths"):
        r = merge([arch.build(hidden=(32, 16, 16)), arch.build(hidden=(32, 16))], data=[x])
    assert r.depth_alignment and r.model(x).shape == (8, 10)
    assert len([m for m in r.model.modules() if isinstance(m, nn.Linear)]) == 3


@pytest.mark.parametrize("method", ["zipit", "mudsc"])
@pytest.mark.parametrize("hidden", [(32, 16), (48, 24)], ids=["same-trunk", "wider-trunk"])
def test_models_with_other_label_spaces_keep_their_own_heads(hidden, method):
    """10 classes and 5: each model keeps its output layer (one output per model, a warning); the
    trunks, one a permuted (and wider) copy of the other, merge back exactly."""
    from mudsc_graph import get_registry

    arch = get_registry().architecture("mlp")
    torch.manual_seed(0)
    a = arch.build(hidden=(32, 16), num_classes=10).eval()
    x = torch.randn(16, 1, 28, 28)
    spec = analyze(a, (x[:2],))
    trunk = _permuted(a, (x[:2],), seed=2)
    if hidden != (32, 16):
        trunk = net2net(trunk, spec, {g.id: 3 * g.size // 2 for g in spec.free_groups()})
    b = arch.build(hidden=hidden, num_classes=5).eval()
    b.load_state_dict({**trunk.state_dict(), **{k: v for k, v in b.state_dict().items() if v.shape[0] == 5}})
    with pytest.warns(UserWarning, match="output layers differ"):
        r = merge([a, b], data=[x], method=method, **EXACT_ZIP)  # mudsc: the heads are no weight features
    assert r.own_heads == "head"
    with torch.no_grad():
        out_a, out_b = r.model(x)
        _close(out_a, a(x))
        _close(out_b, b(x))
    with pytest.raises(MergeError, match="must stop before"):
        merge([a, b], data=[x], stop_at=[n for n, _ in a.named_modules()][-1], **EXACT_ZIP)


@pytest.mark.parametrize("order", ["narrow-first", "wide-first"])
def test_vits_with_other_head_counts_merge_as_whole_heads(order):
    """timm's ViT with 3 heads and its Net2Net copy with 5 (whole heads copied) and a wider MLP:
    merged into model 0's heads, exactly, either way round."""
    from test_widths import timm_vit

    a, x = timm_vit()
    spec = analyze(a, (x[:2],))
    grow = [g.id for g in spec.free_groups() if not any("norm" in n for n, _ in g.members)]  # heads and MLPs, not the residual
    units, _ = expressible(a, spec, target_units(spec, grow, 2.0, 2), (x[:2],))
    wide = _permuted(net2net(a, spec, units, seed=4), (x[:2],), seed=5)
    assert wide.blocks[0].attn.num_heads == 6
    models = [a, wide] if order == "narrow-first" else [wide, a]
    r = merge(models, data=[x[:6], x[6:]], **EXACT_ZIP)
    assert r.model.blocks[0].attn.num_heads == models[0].blocks[0].attn.num_heads
    with torch.no_grad():
        _close(r.model(x), a(x))

def test_a_hugging_face_bert_with_a_wider_mlp_merges_back_and_its_config_says_so(tmp_path):
    name = "transformers"
    transformers = importlib.import_module(name) if os.environ.get("CI") else pytest.importorskip(name)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 40, (8, 10))
    spec = analyze(model, {"input_ids": ids[:2]})
    mlp = [g.id for g in spec.free_groups() if g.size == 24]
    wide = net2net(model, spec, {g: 48 for g in mlp}, seed=1)
    assert wide.config.intermediate_size == 48
    r = merge([model, wide], data=[{"input_ids": ids}], method="zipit", **EXACT_ZIP)
    assert r.model.config.intermediate_size == 24
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        _close(r.model(input_ids=ids).last_hidden_state, ref)
    r.model.save_pretrained(tmp_path)
    back = transformers.BertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        _close(back(input_ids=ids).last_hidden_state, ref)


def test_the_command_line_merges_checkpoints_of_different_widths(tmp_path):
    """--model-arch-opt gives model 1 its own sizes; the merged file has model 0's and evaluates as model 0
    (model 1 is its wider Net2Net copy); a width budget on top is rebuilt from the metadata."""
    import json

    from typer.testing import CliRunner

    from mudsc_cli.app import app
    from mudsc_graph import get_registry
    from mudsc_graph.io.checkpoints import load_checkpoint

    torch.manual_seed(0)
    a = get_registry().architecture("mlp").build(hidden=(24, 16), bias=True).eval()
    spec = analyze(a, (torch.randn(2, 1, 28, 28),))
    wide = net2net(a, spec, {g.id: 2 * g.size for g in spec.free_groups()})
    assert wide.layers[0].out_features == 48
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    run = lambda *args: CliRunner().invoke(app, [str(x) for x in args])  # noqa: E731
    arch = ("--arch", "mlp", "--arch-opt", "hidden=(24, 16)", "--arch-opt", "bias=True")
    both = (tmp_path / "a.pt", tmp_path / "wide.pt", *arch, "--model-arch-opt", "1:hidden=(48, 32)", "--data", "digits",
            "--samples", "100", "--method", "zipit", "--matcher-opt", "a=1.0", "--quiet", "--json")
    r = run("merge", *both, "--out", tmp_path / "m.pt")
    assert r.exit_code == 0, r.output
    state, meta = load_checkpoint(tmp_path / "m.pt")
    assert state["layers.0.weight"].shape == (24, 784) and meta["widths"] is None
    assert meta["model_arch_options"][1]["hidden"] == (48, 32) or meta["model_arch_options"][1]["hidden"] == [48, 32]
    evals = [json.loads(run("eval", p, *arch, "--data", "digits", "--json").output) for p in (tmp_path / "m.pt", tmp_path / "a.pt")]
    assert evals[0]["accuracy"] == evals[1]["accuracy"]
    r = run("merge", *both, "--width", "1.5", "--out", tmp_path / "w.pt")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(tmp_path / "w.pt")[1]["widths"]["shapes"]["layers.0.weight"] == [36, 784]
    assert json.loads(run("eval", tmp_path / "w.pt", *arch, "--data", "digits", "--json").output)["accuracy"] == evals[1]["accuracy"]
    bad = run("merge", *both, "--model-arch-opt", "2:hidden=(8, 8)", "--out", tmp_path / "x.pt")
    assert bad.exit_code == 1 and "names model 2" in bad.output and not (tmp_path / "x.pt").exists()


def test_the_command_line_refuses_other_label_spaces_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from mudsc_cli.app import app
    from mudsc_graph import get_registry

    arch = get_registry().architecture("mlp")
    torch.save(arch.build(hidden=(24, 16), num_classes=10).state_dict(), tmp_path / "a.pt")
    torch.save(arch.build(hidden=(24, 16), num_classes=5).state_dict(), tmp_path / "b.pt")
    r = CliRunner().invoke(app, ["merge", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--arch", "mlp", "--arch-opt", "hidden=(24, 16)",
                                 "--model-arch-opt", "1:num_classes=5", "--data", "digits", "--samples", "50", "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 1 and "output layers differ" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "m.pt").exists()


def test_the_command_line_merges_resnet20_checkpoints_of_two_widths(tmp_path):
    """mudsc merge of a x1 and a x2 ResNet-20: written at x1, evaluated; the x2 first: written at x2."""
    import json

    from typer.testing import CliRunner

    from mudsc_cli.app import app
    from mudsc_graph import get_registry
    from mudsc_graph.io.checkpoints import load_checkpoint

    arch = get_registry().architecture("resnet20")
    torch.manual_seed(0)
    torch.save(arch.build(width=1).state_dict(), tmp_path / "x1.pt")
    torch.save(arch.build(width=2).state_dict(), tmp_path / "x2.pt")
    run = lambda *args: CliRunner().invoke(app, [str(x) for x in args])  # noqa: E731
    for first, second, opts, width in (("x1", "x2", ("--arch-opt", "width=1", "--model-arch-opt", "1:width=2"), 16),
                                       ("x2", "x1", ("--arch-opt", "width=2", "--model-arch-opt", "1:width=1"), 32)):
        out = tmp_path / f"{first}{second}.pt"
        r = run("merge", tmp_path / f"{first}.pt", tmp_path / f"{second}.pt", "--arch", "resnet20", *opts, "--data", "mnist5k",
                "--samples", "50", "--out", out, "--quiet")
        assert r.exit_code == 0, r.output
        assert load_checkpoint(out)[0]["conv1.weight"].shape[0] == width
        ev = run("eval", out, "--arch", "resnet20", *opts[:2], "--data", "mnist5k", "--json")
        assert ev.exit_code == 0 and 0 <= json.loads(ev.output)["accuracy"] <= 1, ev.output
