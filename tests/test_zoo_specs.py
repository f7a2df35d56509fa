"""Every zoo architecture: the inferred groups pass the self-check and cover every unit a human counts."""

from __future__ import annotations

import pytest
import torch

from mudsc_graph import analyze, get_registry

# permutable units a careful human counts (hidden widths; residual streams count once)
EXPECTED = {
    "mlp": 1024 * 3 + 512,
    "resnet20": (16 + 3 * 16) + (32 + 3 * 32) + (64 + 3 * 64),
    "resnet20_gn": (16 + 3 * 16) + (32 + 3 * 32) + (64 + 3 * 64),
    "vgg11": 64 + 128 + 256 * 2 + 512 * 4 + 4096 * 2,
    "vgg11_bn": 64 + 128 + 256 * 2 + 512 * 4 + 4096 * 2,
    "vgg16": 64 * 2 + 128 * 2 + 256 * 3 + 512 * 6 + 4096 * 2,
    "vgg16_bn": 64 * 2 + 128 * 2 + 256 * 3 + 512 * 6 + 4096 * 2,
    "resnet18": 64 + 2 * 64 + 128 + 2 * 128 + 256 + 2 * 256 + 512 + 2 * 512,
    "resnet50": 64 + (256 + 3 * 128) + (512 + 4 * 256) + (1024 + 6 * 512) + (2048 + 3 * 1024),
    # residual stream + per layer: Q/K, V/O (head blocks) and the MLP hidden layer
    "vit_b16": 768 + 12 * (768 + 768 + 3072),
    "timm_vit_b16": 768 + 12 * (768 + 768 + 3072),
    "vit_tiny": 64 + 4 * (64 + 64 + 128),
    "timm_vit_tiny": 64 + 4 * (64 + 64 + 128),
    # channels (the residual stream) + per block: token-mixing hidden units (over the 16 patches) and the channel MLP
    "mixer_tiny": 64 + 2 * (32 + 128),
}
BIG = {"vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "resnet18", "resnet50", "vit_b16", "timm_vit_b16"}


def _randomise_norm_stats(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g))


def test_every_builtin_architecture_has_an_expected_count():
    reg = get_registry()
    builtin = {name for name, plugin in reg.arch_plugins.items() if plugin == "mudsc_plugins.architectures"}
    assert builtin == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_zoo_spec(name):
    torch.manual_seed(0)
    arch = get_registry().architecture(name)
    model = arch.build().eval()
    _randomise_norm_stats(model)
    inputs = arch.example_inputs(2 if name not in BIG else 1)
    spec = analyze(model, inputs, strict=True)
    groups = [(g.size, g.blocks) for g in spec.free_groups()]
    assert spec.permutable_units == EXPECTED[name], groups
    assert spec.check(model, inputs, seed=3) >= 0.0
    if "vit" in name:
        heads = [g for g in spec.free_groups() if g.blocks > 1]
        assert heads and all(len(g.coupled) == 1 for g in heads), "Q/K and V/O head groups must be coupled in pairs"
