"""Tests for the architecture zoo (``mudsc_plugins.zoo``).

Small entries are built and run on CPU; the large ones (ResNet-18/50, ViT-B/16, full-width
VGG) are built on the ``meta`` device only, to check key names and parameter counts against
torchvision's (equal counts prove the layouts match).  Forward passes of the large models are
marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.fx

try:
    from mudsc_plugins import zoo
except ImportError:  # package not installed: load plugins/ as mudsc_plugins
    _root = Path(__file__).resolve().parents[1] / "plugins"
    _init = _root / "__init__.py"
    _spec = importlib.util.spec_from_file_location(
        "mudsc_plugins", _init if _init.exists() else None,
        submodule_search_locations=[str(_root)],
    )
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["mudsc_plugins"] = _mod
    if _spec.loader is not None:
        _spec.loader.exec_module(_mod)
    from mudsc_plugins import zoo

TINY = ["mlp", "resnet20", "resnet20_gn", "vit_tiny", "timm_vit_tiny", "mixer_tiny", "vgg11", "vgg11_bn",
        "vgg16", "vgg16_bn"]
BIG = ["resnet18", "resnet50", "vit_b16", "timm_vit_b16"]
# VGG's default 4096-wide classifier is ~130M parameters; shrink it for the CPU forward test.
OVERRIDES = {n: {"width": 0.125} for n in TINY if n.startswith("vgg")}


pytestmark = pytest.mark.usefixtures("one_thread")


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta(name: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):
        return zoo.build(name, **kw)


def _check_forward_and_trace(name: str, num_classes: int, **overrides) -> None:
    entry = zoo.ZOO[name]
    torch.manual_seed(0)
    model = entry.build(**overrides).eval()
    x = entry.example_input(batch=2)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, num_classes)
    assert torch.isfinite(y).all()
    graph = torch.fx.Tracer().trace(model)
    gm = torch.fx.GraphModule(model, graph)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_trace_and_determinism(name):
    _check_forward_and_trace(name, 10, **OVERRIDES.get(name, {}))
    torch.manual_seed(0)
    a = zoo.build(name, **OVERRIDES.get(name, {})).state_dict()
    torch.manual_seed(0)
    b = zoo.build(name, **OVERRIDES.get(name, {})).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG)
def test_big_forward_and_trace(name):
    _check_forward_and_trace(name, 1000)


def test_zoo_entries_and_aliases():
    expected = {"mlp", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "resnet20", "resnet20_gn",
                "resnet18", "resnet50", "vit_b16", "vit_tiny", "timm_vit_tiny", "timm_vit_b16", "mixer_tiny"}
    assert set(zoo.ZOO) == expected
    assert zoo.get_entry("vit_b_16") is zoo.ZOO["vit_b16"]
    assert zoo.get_entry("vit_base_patch16_224") is zoo.ZOO["timm_vit_b16"]
    assert zoo.ZOO["mlp"].input_shape == (1, 28, 28)
    assert zoo.ZOO["resnet50"].input_shape == (3, 224, 224)
    with pytest.raises(KeyError):
        zoo.get_entry("no_such_model")


def test_mlp_accepts_flat_input_and_has_no_bias():
    model = zoo.mlp()
    assert model(torch.randn(2, 784)).shape == (2, 10)
    keys = set(model.state_dict())
    assert keys == {"layers.0.weight", "layers.1.weight", "layers.2.weight", "layers.3.weight",
                    "head.weight"}
    assert [layer.out_features for layer in model.layers] == [1024, 1024, 1024, 512]


def test_resnet20_keys_and_groupnorm():
    keys = set(zoo.build("resnet20").state_dict())
    for k in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer3.2.bn2.running_mean",
              "layer2.0.shortcut.0.weight", "layer3.0.shortcut.1.weight", "linear.weight"]:
        assert k in keys
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)
    gn = zoo.build("resnet20_gn")
    assert isinstance(gn.layer3[2].bn2, torch.nn.GroupNorm)
    gn_keys = set(gn.state_dict())
    assert gn_keys == {k for k in keys if "running" not in k and "num_batches" not in k}
    with pytest.raises(ValueError):
        zoo.resnet20(norm="gn", gn_groups=3)


def test_vgg_keys_and_torchvision_param_counts():
    counts = {  # torchvision, 1000 classes
        ("vgg11", False): 132_863_336, ("vgg11", True): 132_868_840,
        ("vgg16", False): 138_357_544, ("vgg16", True): 138_365_992,
    }
    for (name, bn), n in counts.items():
        m = _meta(name, num_classes=1000, batch_norm=bn)
        assert _n_params(m) == n
    keys = set(_meta("vgg16").state_dict())
    assert {"features.0.weight", "features.28.weight", "classifier.0.weight",
            "classifier.3.weight", "classifier.6.weight"} <= keys
    assert "features.41.running_var" in set(_meta("vgg16_bn").state_dict())


def test_resnet_torchvision_keys_and_param_counts():
    r18 = _meta("resnet18")
    r50 = _meta("resnet50")
    assert _n_params(r18) == 11_689_512
    assert _n_params(r50) == 25_557_032
    k18 = set(r18.state_dict())
    k50 = set(r50.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight",
            "layer4.1.conv2.weight", "fc.weight", "fc.bias"} <= k18
    assert "layer1.0.downsample.0.weight" not in k18
    assert {"layer1.0.downsample.1.weight", "layer4.2.conv3.weight", "layer4.2.bn3.running_mean",
            "fc.weight"} <= k50


def test_vit_torchvision_keys_and_param_count():
    m = _meta("vit_b16")
    assert _n_params(m) == 86_567_656
    keys = set(m.state_dict())
    for k in ["conv_proj.weight", "class_token", "encoder.pos_embedding",
              "encoder.layers.encoder_layer_11.self_attention.in_proj_weight",
              "encoder.layers.encoder_layer_11.self_attention.out_proj.weight",
              "encoder.layers.encoder_layer_0.ln_1.weight", "encoder.layers.encoder_layer_0.mlp.0.weight",
              "encoder.layers.encoder_layer_0.mlp.3.weight", "encoder.ln.weight", "heads.head.weight"]:
        assert k in keys
    assert m.encoder.pos_embedding.shape == (1, 197, 768)
    # nn.MultiheadAttention stays a leaf under the default fx Tracer
    graph = torch.fx.Tracer().trace(zoo.build("vit_tiny"))
    mha = [n for n in graph.nodes if n.op == "call_module" and n.target.endswith("self_attention")]
    assert len(mha) == 4


def test_timm_vit_keys_param_count_and_layerscale():
    m = _meta("timm_vit_b16")
    assert _n_params(m) == 86_567_656
    keys = set(m.state_dict())
    for k in ["patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.11.norm1.weight",
              "blocks.11.attn.qkv.weight", "blocks.11.attn.proj.weight", "blocks.11.norm2.bias",
              "blocks.11.mlp.fc1.weight", "blocks.11.mlp.fc2.weight", "norm.weight", "head.weight"]:
        assert k in keys
    assert m.blocks[0].attn.qkv.weight.shape == (3 * 768, 768)
    assert not any(".ls1." in k for k in keys)
    ls = zoo.timm_vit_tiny(init_values=1e-5)
    assert "blocks.3.ls1.gamma" in ls.state_dict() and "blocks.3.ls2.gamma" in ls.state_dict()
    torch.fx.Tracer().trace(ls)
    assert ls(torch.randn(2, 3, 32, 32)).shape == (2, 10)
