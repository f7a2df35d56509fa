"""Plain multi-layer perceptron (the MNIST MLP of the MuDSC paper).

The default configuration is 784-1024-1024-1024-512 with ReLU after every hidden
layer, no biases, and a final linear classifier.  Parameter names are

* ``layers.0.weight`` ... ``layers.{L-1}.weight`` for the hidden layers,
* ``head.weight`` for the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """A stack of ``Linear -> ReLU`` layers followed by a linear ``head``.

    Args:
        in_features: size of the flattened input.
        hidden: widths of the hidden layers.
        num_classes: number of outputs of ``head``.
        bias: whether every Linear (hidden layers and head) has a bias.

    The input is flattened from dimension 1 on inside ``forward``, so images of shape
    ``(B, 1, 28, 28)`` and flat vectors ``(B, 784)`` are both accepted.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (1024, 1024, 1024, 512),
        num_classes: int = 10,
        bias: bool = False,
    ) -> None:
        super().__init__()
        widths = [int(in_features), *(int(h) for h in hidden)]
        self.layers = nn.ModuleList(
            nn.Linear(widths[i], widths[i + 1], bias=bias) for i in range(len(widths) - 1)
        )
        self.head = nn.Linear(widths[-1], num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


def mlp(
    in_features: int = 784,
    hidden: Sequence[int] = (1024, 1024, 1024, 512),
    num_classes: int = 10,
    bias: bool = False,
) -> MLP:
    """Build the MuDSC MNIST MLP (784-1024-1024-1024-512-``num_classes``, no bias)."""
    return MLP(in_features=in_features, hidden=hidden, num_classes=num_classes, bias=bias)
