"""Vision Transformer with timm's module names and attention style.

Names (as ``timm.models.vision_transformer.VisionTransformer``)::

    patch_embed.proj            Conv2d, kernel = stride = patch
    cls_token                   (1, 1, D)
    pos_embed                   (1, N + 1, D)
    blocks.{i}.norm1
    blocks.{i}.attn.qkv         one fused Linear(D, 3 D)
    blocks.{i}.attn.proj
    blocks.{i}.ls1.gamma        only with ``init_values`` (LayerScale), else ``ls1`` is Identity
    blocks.{i}.norm2
    blocks.{i}.mlp.fc1 / fc2
    blocks.{i}.ls2.gamma        only with ``init_values``
    norm
    head

Attention is written exactly in timm's fused style::

    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(q, k, v)
    x = x.transpose(1, 2).reshape(B, N, C)
    x = self.proj(x)

Everything is ``torch.fx``-traceable.  Initialisation: ``pos_embed`` truncated normal
(std 0.02), ``cls_token`` normal (std 1e-6), PyTorch defaults elsewhere.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchEmbed",
    "Attention",
    "LayerScale",
    "Mlp",
    "Block",
    "TimmVisionTransformer",
    "timm_vit_tiny",
    "timm_vit_b16",
]


class PatchEmbed(nn.Module):
    """Image to patch tokens: ``proj`` conv, then flatten to ``(B, N, D)``."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """timm multi-head self-attention with a fused ``qkv`` Linear and SDPA."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return x


class LayerScale(nn.Module):
    """Per-channel learnable scale (CaiT / timm): ``x * gamma``."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """timm ``Mlp``: ``fc1 -> GELU -> fc2`` (dropout modules carry no parameters)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))


class Block(nn.Module):
    """Pre-norm block: ``x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


class TimmVisionTransformer(nn.Module):
    """timm-layout ViT with class-token pooling.

    Args:
        img_size, patch_size, in_chans: input geometry.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer sizes.
        init_values: LayerScale initial value; ``None`` disables LayerScale (no ``ls*.gamma``).
        num_classes: outputs of ``head``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(
            *(
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, norm_layer)
                for _ in range(depth)
            )
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def timm_vit_tiny(
    img_size: int = 32,
    patch_size: int = 4,
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    num_classes: int = 10,
    qkv_bias: bool = True,
    init_values: float | None = None,
    in_chans: int = 3,
) -> TimmVisionTransformer:
    """Small timm-layout ViT for 32x32 inputs; ``init_values=1e-5`` etc. turns LayerScale on."""
    return TimmVisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                 num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                 init_values=init_values)


def timm_vit_b16(
    num_classes: int = 1000,
    img_size: int = 224,
    init_values: float | None = None,
    in_chans: int = 3,
) -> TimmVisionTransformer:
    """ViT-B/16 in timm layout (``vit_base_patch16_224``): D=768, 12 blocks, 12 heads, MLP x4.

    86,567,656 parameters with 1000 classes at 224 px.
    """
    return TimmVisionTransformer(img_size=img_size, patch_size=16, in_chans=in_chans,
                                 num_classes=num_classes, embed_dim=768, depth=12, num_heads=12,
                                 mlp_ratio=4.0, qkv_bias=True, init_values=init_values)
