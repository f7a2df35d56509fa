"""Architecture zoo: plain-torch reference models with well-known parameter names.

Every factory is importable from here, and :data:`ZOO` maps a canonical name to a
:class:`ZooEntry` (factory, input shape without batch, aliases, description, default kwargs).

=================  ===========  ============================================================
name               input        model
=================  ===========  ============================================================
mlp                1x28x28      MuDSC MNIST MLP 784-1024-1024-1024-512-10, no bias
vgg11, vgg11_bn    3x32x32      torchvision VGG-11 layout (10 classes)
vgg16, vgg16_bn    3x32x32      torchvision VGG-16 layout (10 classes)
resnet20           3x32x32      CIFAR ResNet-20, BatchNorm
resnet20_gn        3x32x32      CIFAR ResNet-20, GroupNorm (8 groups)
resnet18/resnet50  3x224x224    torchvision ResNet keys (1000 classes)
vit_b16            3x224x224    torchvision ViT-B/16 layout (alias ``vit_b_16``)
vit_tiny           3x32x32      small torchvision-layout ViT
timm_vit_tiny      3x32x32      small timm-layout ViT (fused qkv)
timm_vit_b16       3x224x224    timm ViT-B/16 layout (alias ``vit_base_patch16_224``)
mixer_tiny         3x32x32      small timm-layout MLP-Mixer (token-mixing MLPs; alias ``mlp_mixer``)
=================  ===========  ============================================================

Example::

    from mudsc_plugins.zoo import build, ZOO
    model = build("resnet20", width=2)
    x = ZOO["resnet20"].example_input(batch=4)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .mixer import MlpMixer, mixer_tiny
from .mlp import MLP, mlp
from .resnet import ResNet, resnet18, resnet50
from .resnet_cifar import ResNetCIFAR, resnet20
from .timm_vit import TimmVisionTransformer, timm_vit_b16, timm_vit_tiny
from .vgg import VGG, vgg11, vgg16
from .vit import VisionTransformer, vit_b16, vit_tiny

__all__ = [
    "ZooEntry",
    "ZOO",
    "get_entry",
    "build",
    "names",
    "MLP",
    "VGG",
    "ResNet",
    "ResNetCIFAR",
    "VisionTransformer",
    "TimmVisionTransformer",
    "mlp",
    "vgg11",
    "vgg16",
    "resnet20",
    "resnet18",
    "resnet50",
    "vit_b16",
    "vit_tiny",
    "timm_vit_tiny",
    "timm_vit_b16",
    "MlpMixer",
    "mixer_tiny",
]


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    Attributes:
        factory: callable returning an ``nn.Module``.
        input_shape: shape of one input sample (no batch dimension).
        aliases: other names that resolve to this entry.
        description: one-line human description.
        defaults: keyword arguments passed to ``factory`` unless overridden.
    """

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    aliases: tuple[str, ...] = ()
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict, hash=False)

    def build(self, **overrides: Any) -> nn.Module:
        """Call ``factory(**{**defaults, **overrides})``."""
        return self.factory(**{**self.defaults, **overrides})

    def example_input(self, batch: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
        """A standard-normal batch of shape ``(batch, *input_shape)``."""
        return torch.randn(batch, *self.input_shape, generator=generator)


ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(mlp, (1, 28, 28), (), "MuDSC MNIST MLP 784-1024-1024-1024-512-10, no bias"),
    "vgg11": ZooEntry(vgg11, (3, 32, 32), (), "VGG-11, torchvision layout",
                      {"num_classes": 10}),
    "vgg11_bn": ZooEntry(vgg11, (3, 32, 32), (), "VGG-11 with BatchNorm, torchvision layout",
                         {"num_classes": 10, "batch_norm": True}),
    "vgg16": ZooEntry(vgg16, (3, 32, 32), (), "VGG-16, torchvision layout",
                      {"num_classes": 10}),
    "vgg16_bn": ZooEntry(vgg16, (3, 32, 32), (), "VGG-16 with BatchNorm, torchvision layout",
                         {"num_classes": 10, "batch_norm": True}),
    "resnet20": ZooEntry(resnet20, (3, 32, 32), (), "CIFAR ResNet-20 (BatchNorm)"),
    "resnet20_gn": ZooEntry(resnet20, (3, 32, 32), (), "CIFAR ResNet-20 with GroupNorm (8 groups)",
                            {"norm": "gn"}),
    "resnet18": ZooEntry(resnet18, (3, 224, 224), (), "ResNet-18, torchvision keys"),
    "resnet50": ZooEntry(resnet50, (3, 224, 224), (), "ResNet-50, torchvision keys"),
    "vit_b16": ZooEntry(vit_b16, (3, 224, 224), ("vit_b_16",), "ViT-B/16, torchvision layout"),
    "vit_tiny": ZooEntry(vit_tiny, (3, 32, 32), (),
                         "tiny ViT, torchvision layout (4 layers, 4 heads, D=64, patch 4)"),
    "timm_vit_tiny": ZooEntry(timm_vit_tiny, (3, 32, 32), (),
                              "tiny ViT, timm layout (4 blocks, 4 heads, D=64, patch 4)"),
    "timm_vit_b16": ZooEntry(timm_vit_b16, (3, 224, 224), ("vit_base_patch16_224",),
                             "ViT-B/16, timm layout"),
    "mixer_tiny": ZooEntry(mixer_tiny, (3, 32, 32), ("mlp_mixer",),
                           "tiny MLP-Mixer, timm layout (2 blocks, D=64, patch 8): token-mixing MLPs"),
}

_ALIASES: dict[str, str] = {a: name for name, e in ZOO.items() for a in e.aliases}


def names() -> list[str]:
    """Canonical zoo names, in definition order."""
    return list(ZOO)


def get_entry(name: str) -> ZooEntry:
    """Look up an entry by canonical name or alias; ``KeyError`` lists the valid names."""
    key = _ALIASES.get(name, name)
    try:
        return ZOO[key]
    except KeyError:
        valid = ", ".join(sorted([*ZOO, *_ALIASES]))
        raise KeyError(f"unknown zoo model {name!r}; known: {valid}") from None


def build(name: str, **overrides: Any) -> nn.Module:
    """Build zoo model ``name`` (or alias) with its defaults updated by ``overrides``."""
    return get_entry(name).build(**overrides)
