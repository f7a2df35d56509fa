"""VGG-11 / VGG-16 with torchvision's parameter names.

Layout (identical to ``torchvision.models.vgg11`` / ``vgg16`` at ``width=1``):

* ``features.N``: ``Conv2d(3x3, padding=1)`` [``BatchNorm2d``] ``ReLU`` ... ``MaxPool2d(2)``,
  indexed exactly as torchvision's ``nn.Sequential``;
* ``avgpool``: ``AdaptiveAvgPool2d((7, 7))`` (so a 32x32 input, whose last feature map is
  1x1, is simply replicated to 7x7);
* ``classifier``: ``Linear(C*7*7, 4096) ReLU Dropout Linear(4096, 4096) ReLU Dropout
  Linear(4096, num_classes)`` -> keys ``classifier.0``, ``classifier.3``, ``classifier.6``.

``width`` scales every conv channel count and the 4096 hidden size.  Unlike torchvision,
the ReLUs are not in-place (same keys, same function; in-place ops would overwrite tensors
that forward hooks may still hold).  Initialisation follows torchvision (Kaiming-normal
fan-out for convs, N(0, 0.01) for linears, BN weight 1 / bias 0).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG", "vgg11", "vgg16", "VGG_CFGS"]

#: torchvision configurations: ints are conv widths, "M" is a 2x2 max-pool.
VGG_CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _scale(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class VGG(nn.Module):
    """Generic torchvision-layout VGG.

    Args:
        cfg: list of conv widths and ``"M"`` (max-pool) markers.
        num_classes: outputs of the last classifier Linear.
        batch_norm: insert ``BatchNorm2d`` after every conv (the ``*_bn`` variants).
        width: multiplier for conv channels and the classifier hidden size (4096).
        in_chans: number of input channels.
        dropout: dropout probability in the classifier.
    """

    def __init__(
        self,
        cfg: list[int | str],
        num_classes: int = 1000,
        batch_norm: bool = False,
        width: float = 1.0,
        in_chans: int = 3,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            c_out = _scale(int(v), width)
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        hidden = _scale(4096, width)
        self.classifier = nn.Sequential(
            nn.Linear(c_in * 7 * 7, hidden),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg11(
    num_classes: int = 1000, batch_norm: bool = False, width: float = 1.0, in_chans: int = 3
) -> VGG:
    """VGG-11 (configuration "A"); torchvision ``vgg11`` / ``vgg11_bn`` keys at ``width=1``."""
    return VGG(VGG_CFGS["A"], num_classes=num_classes, batch_norm=batch_norm, width=width,
               in_chans=in_chans)


def vgg16(
    num_classes: int = 1000, batch_norm: bool = False, width: float = 1.0, in_chans: int = 3
) -> VGG:
    """VGG-16 (configuration "D"); torchvision ``vgg16`` / ``vgg16_bn`` keys at ``width=1``."""
    return VGG(VGG_CFGS["D"], num_classes=num_classes, batch_norm=batch_norm, width=width,
               in_chans=in_chans)
