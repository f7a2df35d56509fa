"""CIFAR-style ResNet-20 (He et al. 2016, section 4.2), optionally with GroupNorm.

Structure: 3x3 stem conv (16*w channels) -> three stages of three ``BasicBlock`` s with
16*w / 32*w / 64*w channels (strides 1, 2, 2) -> global average pool -> ``linear``.

Parameter names::

    conv1, bn1,
    layer{1..3}.{0..2}.conv1 / bn1 / conv2 / bn2,
    layer{k}.{i}.shortcut.0 (1x1 conv, no bias) / shortcut.1 (norm)   # only where shapes change
    linear

``shortcut`` is an empty ``nn.Sequential`` (identity) when input and output shapes match.

With ``norm="gn"`` every norm is an ``nn.GroupNorm`` but keeps the ``bn*`` attribute names, so
the keys are the same apart from BatchNorm's running-statistics buffers.  The default group
count is 8: it divides 16*w, 32*w and 64*w for every integer width (and for w = 0.5).  A
custom ``gn_groups`` must divide every channel count, otherwise a ``ValueError`` is raised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNetCIFAR", "resnet20"]


def _norm(kind: str, channels: int, gn_groups: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        if channels % gn_groups != 0:
            raise ValueError(f"gn_groups={gn_groups} does not divide {channels} channels")
        return nn.GroupNorm(gn_groups, channels)
    raise ValueError(f"unknown norm {kind!r}; expected 'bn' or 'gn'")


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (1x1 conv + norm shortcut when needed)."""

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, norm: str = "bn", gn_groups: int = 8
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, planes, gn_groups)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm(norm, planes, gn_groups)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                _norm(norm, planes, gn_groups),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet with three stages; ``num_blocks=(3, 3, 3)`` gives ResNet-20.

    Args:
        num_blocks: blocks per stage.
        num_classes: outputs of ``linear``.
        width: channel multiplier (stage widths 16*w, 32*w, 64*w).
        norm: ``"bn"`` (BatchNorm2d) or ``"gn"`` (GroupNorm).
        gn_groups: groups of every GroupNorm (ignored for ``"bn"``).
        in_chans: input channels.
    """

    def __init__(
        self,
        num_blocks: tuple[int, int, int] = (3, 3, 3),
        num_classes: int = 10,
        width: float = 1,
        norm: str = "bn",
        gn_groups: int = 8,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        widths = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = _norm(norm, widths[0], gn_groups)
        in_planes = widths[0]
        stages = []
        for planes, n, stride in zip(widths, num_blocks, (1, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(BasicBlock(in_planes, planes, s, norm=norm, gn_groups=gn_groups))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(
    num_classes: int = 10,
    width: float = 1,
    norm: str = "bn",
    gn_groups: int = 8,
    in_chans: int = 3,
    num_blocks: tuple[int, int, int] = (3, 3, 3),
) -> ResNetCIFAR:
    """CIFAR ResNet-20 (3 stages x 3 BasicBlocks), widths 16/32/64 times ``width``; ``num_blocks``
    other depths of the family (``(5, 5, 5)``: ResNet-32, ``(7, 7, 7)``: ResNet-44)."""
    return ResNetCIFAR(tuple(num_blocks), num_classes=num_classes, width=width, norm=norm,
                       gn_groups=gn_groups, in_chans=in_chans)
