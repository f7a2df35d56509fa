"""MLP-Mixer (Tolstikhin et al., 2021): token mixing by an MLP along the patch axis.

Each block mixes tokens with an MLP that runs along the token axis (its hidden units are computed
from all tokens of one channel, so the channels are its samples), then mixes channels with an MLP
per token. The token-mixing hidden units are a merge group whose features are read with the
channels - themselves permuted by the merge - as samples: the structure every permuted-copy test
needs to see. Parameter names follow timm's ``MlpMixer``: ``stem.proj``, ``blocks.{i}.norm1``,
``blocks.{i}.mlp_tokens.fc1/fc2``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp_channels.fc1/fc2``,
``norm``, ``head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MlpMixer", "mixer_tiny"]


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Stem(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, tokens, dim)


class _MixerBlock(nn.Module):
    def __init__(self, dim: int, tokens: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp_tokens = _Mlp(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_channels = _Mlp(dim, channel_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class MlpMixer(nn.Module):
    """Patches -> ``depth`` mixer blocks -> LayerNorm -> mean over tokens -> ``head``."""

    def __init__(self, img_size: int = 32, patch: int = 8, in_chans: int = 3, dim: int = 64, depth: int = 2,
                 token_hidden: int = 32, channel_hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        tokens = (img_size // patch) ** 2
        self.stem = _Stem(in_chans, dim, patch)
        self.blocks = nn.Sequential(*[_MixerBlock(dim, tokens, token_hidden, channel_hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))).mean(1))


def mixer_tiny(**options: object) -> MlpMixer:
    """A small MLP-Mixer for 3x32x32 images: 8x8 patches (16 tokens), width 64, 2 blocks."""
    return MlpMixer(**options)  # type: ignore[arg-type]
