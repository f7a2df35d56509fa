"""Vision Transformer with torchvision's module names and forward.

One implementation, :class:`VisionTransformer`, serves ``vit_b16`` (torchvision ``vit_b_16``
sizes; identical ``state_dict`` keys and shapes) and the small ``vit_tiny`` for CIFAR-size
inputs.  Names::

    conv_proj                                   patch embedding (Conv2d, kernel = stride = patch)
    class_token                                 (1, 1, D)
    encoder.pos_embedding                       (1, N + 1, D)
    encoder.layers.encoder_layer_{i}.ln_1
    encoder.layers.encoder_layer_{i}.self_attention   nn.MultiheadAttention(batch_first=True)
    encoder.layers.encoder_layer_{i}.ln_2
    encoder.layers.encoder_layer_{i}.mlp.0 / mlp.3    Linear GELU Dropout Linear Dropout
    encoder.ln
    heads.head

The forward reproduces torchvision's op sequence (shape read from ``x.shape``, ``reshape`` to
``(n, D, n_h * n_w)``, ``permute``, class token ``expand`` + ``cat``, pre-norm residual blocks,
token 0, head) but without ``torch._assert`` calls and without any Python control flow on
tensor values, so ``torch.fx`` can trace it with ``nn.MultiheadAttention`` as a leaf module.

Initialisation follows torchvision except that ``heads.head`` keeps PyTorch's default Linear
init instead of zeros (a zero head makes every random model output a constant, which is useless
for merging tests).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

__all__ = ["MLPBlock", "EncoderBlock", "Encoder", "VisionTransformer", "vit_b16", "vit_tiny"]


class MLPBlock(nn.Sequential):
    """torchvision's ``MLPBlock``: ``Linear GELU Dropout Linear Dropout`` (indices 0..4)."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(in_dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, in_dim),
            nn.Dropout(dropout),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x = x + attn(ln_1(x)); y = x + mlp(ln_2(x))``."""

    def __init__(
        self,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = nn.MultiheadAttention(
            hidden_dim, num_heads, dropout=attention_dropout, batch_first=True
        )
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = norm_layer(hidden_dim)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x = self.self_attention(x, x, x, need_weights=False)[0]
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    """Positional embedding, dropout, ``layers`` (``encoder_layer_{i}``) and final ``ln``."""

    def __init__(
        self,
        seq_length: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(
            OrderedDict(
                (
                    f"encoder_layer_{i}",
                    EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                                 norm_layer),
                )
                for i in range(num_layers)
            )
        )
        self.ln = norm_layer(hidden_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class VisionTransformer(nn.Module):
    """torchvision-layout ViT (class-token pooling, linear ``heads.head``).

    Args:
        image_size: input height = width (must be divisible by ``patch_size``).
        patch_size: patch side; ``conv_proj`` has kernel = stride = ``patch_size``.
        num_layers, num_heads, hidden_dim, mlp_dim: transformer sizes.
        dropout, attention_dropout: dropout probabilities (0 by default, as torchvision).
        num_classes: outputs of ``heads.head``.
        in_chans: input channels.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.num_classes = num_classes

        self.conv_proj = nn.Conv2d(in_chans, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout,
                               attention_dropout)
        self.seq_length = seq_length
        self.heads = nn.Sequential(OrderedDict([("head", nn.Linear(hidden_dim, num_classes))]))

        fan_in = self.conv_proj.in_channels * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        n_h = h // p
        n_w = w // p
        x = self.conv_proj(x)  # (n, D, n_h, n_w)
        x = x.reshape(n, self.hidden_dim, n_h * n_w)
        return x.permute(0, 2, 1)  # (n, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]
        return self.heads(x)


def vit_b16(num_classes: int = 1000, image_size: int = 224, in_chans: int = 3) -> VisionTransformer:
    """ViT-B/16 (torchvision ``vit_b_16``): 12 layers, 12 heads, D=768, MLP 3072, patch 16.

    86,567,656 parameters with 1000 classes at 224 px.
    """
    return VisionTransformer(image_size=image_size, patch_size=16, num_layers=12, num_heads=12,
                             hidden_dim=768, mlp_dim=3072, num_classes=num_classes,
                             in_chans=in_chans)


def vit_tiny(
    image_size: int = 32,
    patch_size: int = 4,
    num_layers: int = 4,
    num_heads: int = 4,
    hidden_dim: int = 64,
    mlp_dim: int = 128,
    num_classes: int = 10,
    in_chans: int = 3,
) -> VisionTransformer:
    """Small torchvision-layout ViT for 32x32 inputs (64 patches + class token by default)."""
    return VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                             num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                             num_classes=num_classes, in_chans=in_chans)
