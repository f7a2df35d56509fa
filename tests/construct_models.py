"""Tiny test models, one per construct that merge-group inference must understand.

Every model is small (channels 4-16, spatial 4-8) so analysing and checking it takes a fraction of
a second. ``CASES`` lists them with the number of permutable units a careful human counts by the
rules of docs/concepts.md ("Spaces"):

* spaces that reach a model input or output are fixed (the input features, the classifier's
  output, anything returned);
* a Linear/Conv output axis starts a new space, its input axis joins the space of what it reads;
* per-channel ops (activations, BN/LN/GN affine, pooling, dropout, broadcast add/mul) pass spaces
  through, residual adds join spaces, concat is a direct sum, split/chunk/unbind give each part its
  own space, ``q @ k^T`` joins Q and K;
* attention with H heads: one Q/K group and one V/O group, each H blocks of head_dim units, size
  H*head_dim;
* GroupNorm(G) / grouped conv (groups=g) give block structure but do not change the unit count; a
  depthwise conv passes its channel space through;
* an op nothing understands makes every space it touches fixed.

``permutable_units`` is the sum of ``size`` over non-fixed groups, each group counted once even if
it appears in several tensors. A space is permutable iff permuting its units consistently in every
tensor axis it appears in leaves the output unchanged; every count below was reasoned that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Case", "CASES", "CASES_BY_NAME"]


@dataclass(frozen=True)
class Case:
    """One construct: how to build it, its example inputs and the expected permutable units."""

    name: str
    make_model: Callable[[], nn.Module]
    make_inputs: Callable[[], tuple]
    expected_units: int
    note: str

    def __repr__(self) -> str:  # short ids in pytest output
        return f"Case({self.name})"


def _randn(*shape: int, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _image(c: int = 3, s: int = 8, b: int = 2) -> Callable[[], tuple]:
    return lambda: (_randn(b, c, s, s),)


def _vec(f: int = 6, b: int = 3) -> Callable[[], tuple]:
    return lambda: (_randn(b, f),)


def _tokens(t: int = 5, f: int = 6, b: int = 2) -> Callable[[], tuple]:
    return lambda: (_randn(b, t, f),)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


# --------------------------------------------------------------------------- plain MLPs


class PlainMLP(nn.Module):
    """Linear(6,16) -> ReLU -> Linear(16,12) -> ReLU -> Linear(12,4)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class MLPBatchNormDropout(nn.Module):
    """Linear(6,10) -> BatchNorm1d -> ReLU -> Dropout -> Linear(10,14) -> GELU -> Dropout -> Linear(14,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 10),
            nn.BatchNorm1d(10),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(10, 14),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(14, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPReturnsFeatures(nn.Module):
    """Returns ``(logits, features)``: the features' space reaches an output and must be fixed.

    Linear(6,16) -> ReLU -> Linear(16,12) -> ReLU = feat; logits = Linear(12,3)(feat).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor):
        feat = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.head(feat), feat


class ResidualFromInput(nn.Module):
    """The input itself is the residual stream: ``h = x + fc2(relu(fc1(x)))``; head(h).

    The residual space is the input's feature space, hence fixed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.fc2(F.relu(self.fc1(x)))
        return self.head(h)


# --------------------------------------------------------------------------- plain convs


class ConvBNReLUConv(nn.Module):
    """Conv(3,8) -> BN -> ReLU -> Conv(8,5); the second conv's output is the model output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


class ConvNetClassifier(nn.Module):
    """Conv(3,8)-BN-ReLU -> Conv(8,12)-BN-ReLU -> global avg pool -> flatten -> Linear(12,5)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 12, 3, padding=1, bias=False),
            nn.BatchNorm2d(12),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------- residual


class ResBlockIdentity(nn.Module):
    """ResNet basic block with an identity shortcut after a stem.

    stem Conv(3,8)-BN-ReLU; block: Conv(8,8)-BN-ReLU-Conv(8,8)-BN, + identity, ReLU;
    avg pool; Linear(8,5).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.conv1 = _conv_bn(8, 8)
        self.conv2 = _conv_bn(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        out = self.conv2(F.relu(self.conv1(x)))
        out = F.relu(out + x)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ResBlockProjection(nn.Module):
    """ResNet basic block with a projection shortcut (1x1 conv + BN, stride 2).

    stem Conv(3,8)-BN-ReLU; block: Conv(8,12,s2)-BN-ReLU-Conv(12,16)-BN; shortcut Conv1x1(8,16,s2)-BN;
    add, ReLU; avg pool; Linear(16,5).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.conv1 = _conv_bn(8, 12, stride=2)
        self.conv2 = _conv_bn(12, 16)
        self.shortcut = _conv_bn(8, 16, k=1, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        out = self.conv2(F.relu(self.conv1(x))) + self.shortcut(x)
        out = F.relu(out)
        return self.fc(out.mean((2, 3)))


# --------------------------------------------------------------------------- concat


class ConcatTwoBranches(nn.Module):
    """stem Conv(3,8)-BN-ReLU; branches Conv1x1(8,4)-BN-ReLU and Conv3x3(8,6)-BN-ReLU;
    cat on channels (10) -> Conv1x1(10,12)-BN-ReLU -> pool -> Linear(12,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.b1 = _conv_bn(8, 4, k=1)
        self.b2 = _conv_bn(8, 6, k=3)
        self.post = _conv_bn(10, 12, k=1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.b1(x)), F.relu(self.b2(x))], dim=1)
        y = F.relu(self.post(y))
        return self.fc(y.mean((2, 3)))


class InceptionWithPoolBranch(nn.Module):
    """Inception-like: cat([Conv1x1(8,4) branch, Conv3x3(8,6) branch, MaxPool3x3(stem)]) = 18 channels
    -> Conv1x1(18,10)-BN-ReLU -> pool -> Linear(10,3). The pool branch carries the stem's space
    into the third part of the concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.b1 = _conv_bn(8, 4, k=1)
        self.b2 = _conv_bn(8, 6, k=3)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.post = _conv_bn(18, 10, k=1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.b1(x)), F.relu(self.b2(x)), self.pool(x)], dim=1)
        y = F.relu(self.post(y))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


# --------------------------------------------------------------------------- split / chunk


class SplitLinearOutput(nn.Module):
    """Linear(6,16) -> split([6,10]) -> a: ReLU -> Linear(6,12); b: Tanh -> Linear(10,12);
    sum -> ReLU -> Linear(12,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.fa = nn.Linear(6, 12)
        self.fb = nn.Linear(10, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.fc(x), [6, 10], dim=1)
        y = self.fa(F.relu(a)) + self.fb(torch.tanh(b))
        return self.head(F.relu(y))


class ChunkGLU(nn.Module):
    """Linear(5,12) -> ReLU -> Linear(12,16) -> chunk(2) -> a * silu(b) (SwiGLU) -> Linear(8,3).

    The elementwise product joins the two halves' spaces into one group of 8 that appears twice in
    the Linear(12,16) weight rows (rows 0-7 and 8-15)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(5, 12)
        self.fc_in = nn.Linear(12, 16)
        self.fc_out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc_in(F.relu(self.fc0(x))).chunk(2, dim=-1)
        return self.fc_out(a * F.silu(b))


# --------------------------------------------------------------------------- flatten


class ConvFlattenLinear(nn.Module):
    """Conv(3,8)-BN-ReLU on 8x8 -> MaxPool2 (4x4) -> Conv1x1(8,6)-BN-ReLU -> flatten (6*16=96)
    -> Linear(96,10) -> ReLU -> Linear(10,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _conv_bn(3, 8)
        self.conv2 = _conv_bn(8, 6, k=1)
        self.fc1 = nn.Linear(96, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = x.flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


# --------------------------------------------------------------------------- depthwise / grouped


class MobileNetBlock(nn.Module):
    """stem Conv(3,8)-BN-ReLU6; 1x1 expand (8->16)-BN-ReLU6; 3x3 depthwise (16, groups=16)-BN-ReLU6;
    1x1 project (16->12)-BN; pool; Linear(12,3). No residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.expand = _conv_bn(8, 16, k=1)
        self.dw = _conv_bn(16, 16, k=3, groups=16)
        self.project = _conv_bn(16, 12, k=1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(x))
        x = F.relu6(self.expand(x))
        x = F.relu6(self.dw(x))
        x = self.project(x)
        return self.fc(x.mean((2, 3)))


class MobileNetV2Residual(nn.Module):
    """MobileNetV2 inverted residual: stem Conv(3,8)-BN-ReLU6; expand 1x1 (8->16)-BN-ReLU6;
    depthwise 3x3 (16)-BN-ReLU6; project 1x1 (16->8)-BN; + stem output; pool; Linear(8,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.expand = _conv_bn(8, 16, k=1)
        self.dw = _conv_bn(16, 16, k=3, groups=16)
        self.project = _conv_bn(16, 8, k=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(x))
        y = self.project(F.relu6(self.dw(F.relu6(self.expand(x)))))
        return self.fc((x + y).mean((2, 3)))


class GroupedConvNet(nn.Module):
    """stem Conv(3,8)-BN-ReLU; grouped Conv3x3(8,16, groups=4)-BN-ReLU; Conv1x1(16,8)-BN-ReLU;
    pool; Linear(8,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.gconv = _conv_bn(8, 16, k=3, groups=4)
        self.pw = _conv_bn(16, 8, k=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.gconv(x))
        x = F.relu(self.pw(x))
        return self.fc(x.mean((2, 3)))


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck: stem Conv(3,8)-BN-ReLU; Conv1x1(8,16)-BN-ReLU; grouped Conv3x3(16,16,
    groups=2)-BN-ReLU; Conv1x1(16,8)-BN; + stem output; ReLU; pool; Linear(8,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.reduce = _conv_bn(8, 16, k=1)
        self.gconv = _conv_bn(16, 16, k=3, groups=2)
        self.expand = _conv_bn(16, 8, k=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = self.expand(F.relu(self.gconv(F.relu(self.reduce(x)))))
        return self.fc(F.relu(x + y).mean((2, 3)))


# --------------------------------------------------------------------------- GroupNorm


class ConvGNStack(nn.Module):
    """Conv(3,8)-GN(2 groups)-ReLU -> Conv(8,12)-GN(4 groups)-ReLU -> pool -> Linear(12,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.gn2 = nn.GroupNorm(4, 12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class ResBlockGroupNorm(nn.Module):
    """ResNet basic block with GroupNorm: stem Conv(3,8)-GN(2)-ReLU; Conv(8,8)-GN(4)-ReLU-Conv(8,8)-GN(2);
    + identity; ReLU; pool; Linear(8,3). The residual space is normalised by GN(2) twice (same
    block partition), the hidden one by GN(4)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.gn0 = nn.GroupNorm(2, 8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn0(self.stem(x)))
        y = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x)))))
        return self.fc(F.relu(x + y).mean((2, 3)))


# --------------------------------------------------------------------------- channels-last LN


class ConvNeXtBlock(nn.Module):
    """ConvNeXt-like: patchify Conv(3,8,k2,s2) on 8x8 (-> 4x4); block: depthwise Conv7->3x3(8) ->
    permute(0,2,3,1) -> LayerNorm(8) -> Linear(8,32) -> GELU -> Linear(32,8) -> permute(0,3,1,2)
    -> + input; global mean -> LayerNorm(8) -> Linear(8,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.pw1 = nn.Linear(8, 32)
        self.pw2 = nn.Linear(32, 8)
        self.head_norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(self.head_norm(x.mean((2, 3))))


# --------------------------------------------------------------------------- squeeze-excitation


class SqueezeExcite(nn.Module):
    """stem Conv(3,8)-BN-ReLU; Conv(8,16)-BN-ReLU; SE: mean over H,W -> Linear(16,4) -> ReLU ->
    Linear(4,16) -> sigmoid -> view(B,16,1,1) -> multiply the feature map; pool; Linear(16,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.conv = _conv_bn(8, 16)
        self.se_reduce = nn.Linear(16, 4)
        self.se_expand = nn.Linear(4, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.conv(x))
        b, c = x.shape[0], x.shape[1]
        s = x.mean((2, 3))
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(s))))
        x = x * s.view(b, c, 1, 1)
        return self.fc(x.mean((2, 3)))


# --------------------------------------------------------------------------- attention


class ManualMHA(nn.Module):
    """Manual multi-head attention with separate q/k/v Linears and different q/k and v widths.

    embed Linear(6,16); pre-norm LayerNorm(16); q,k = Linear(16,8) (H=2 heads, head_dim 4),
    v = Linear(16,12) (H=2, head_dim 6); view(B,T,H,Dh).transpose(1,2); softmax(q @ k^T * s) @ v;
    transpose(1,2).reshape(B,T,12); out Linear(12,16); + residual; mean over T; Linear(16,3).
    """

    H = 2

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.q = nn.Linear(16, 8)
        self.k = nn.Linear(16, 8)
        self.v = nn.Linear(16, 12)
        self.o = nn.Linear(12, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        B, T, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, T, self.H, 4).transpose(1, 2)
        k = self.k(h).view(B, T, self.H, 4).transpose(1, 2)
        v = self.v(h).view(B, T, self.H, 6).transpose(1, 2)
        att = torch.softmax((q @ k.transpose(-2, -1)) * 0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, 12)
        x = x + self.o(y)
        return self.head(x.mean(1))


class TimmAttentionBlock(nn.Module):
    """timm-style pre-norm ViT block with a fused qkv Linear and F.scaled_dot_product_attention.

    embed Linear(6,16); x + proj(attn(LN(x))) with qkv Linear(16,48),
    reshape(B,N,3,H=2,Dh=8).permute(2,0,3,1,4).unbind(0), SDPA, transpose(1,2).reshape(B,N,16),
    proj Linear(16,16); x + fc2(GELU(fc1(LN(x)))) with hidden 32; mean over N; Linear(16,3).
    """

    H = 2

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm1 = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.norm2 = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


class TorchMHABlock(nn.Module):
    """Pre-norm transformer block around nn.MultiheadAttention(16, 2 heads, batch_first=True).

    embed Linear(6,16); h = LN(x); x + attn(h,h,h, need_weights=False)[0];
    x + fc2(GELU(fc1(LN(x)))) with hidden 24; mean over T; Linear(16,3).
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm1 = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


# --------------------------------------------------------------------------- tokens / cls / pos


class TokenClsPosMLP(nn.Module):
    """Token ids (B,6) -> Embedding(10,16); cat cls token (1,1,16) in front (T=7); + pos (1,7,16);
    two pre-norm MLP blocks x + fc2(GELU(fc1(LN(x)))) with hidden 32 and 24; LN; head Linear(16,4)
    on the cls token plus the mean of the other tokens, ``x[:, 0] + x[:, 1:].mean(1)`` (the MLP
    blocks do not mix tokens, so without the mean the token embeddings would not reach the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 16))
        self.pos_embed = nn.Parameter(torch.zeros(1, 7, 16))
        self.norm1 = nn.LayerNorm(16)
        self.fc1a = nn.Linear(16, 32)
        self.fc1b = nn.Linear(32, 16)
        self.norm2 = nn.LayerNorm(16)
        self.fc2a = nn.Linear(16, 24)
        self.fc2b = nn.Linear(24, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = x + self.fc1b(F.gelu(self.fc1a(self.norm1(x))))
        x = x + self.fc2b(F.gelu(self.fc2a(self.norm2(x))))
        x = self.norm(x)
        return self.head(x[:, 0] + x[:, 1:].mean(1))


# --------------------------------------------------------------------------- layer scale


class LayerScaleMLP(nn.Module):
    """embed Linear(6,16); x + gamma * fc2(GELU(fc1(LN(x)))) with gamma (16,) and hidden 32;
    mean over T; Linear(16,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.gamma = nn.Parameter(1e-5 * torch.ones(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x)))) * self.gamma
        return self.head(x.mean(1))


class LayerScaleConv(nn.Module):
    """stem Conv(3,8)-BN-ReLU; x + gamma * (Conv(8,12)-BN-ReLU-Conv(12,8)-BN)(x) with gamma (8,1,1);
    ReLU; pool; Linear(8,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.conv1 = _conv_bn(8, 12)
        self.conv2 = _conv_bn(12, 8)
        self.gamma = nn.Parameter(torch.zeros(8, 1, 1))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + self.gamma * self.conv2(F.relu(self.conv1(x)))
        return self.fc(F.relu(x).mean((2, 3)))


# --------------------------------------------------------------------------- shared modules


class SharedLinearTwice(nn.Module):
    """Linear(6,12) -> ReLU -> shared Linear(12,12) -> ReLU -> the same Linear again -> ReLU ->
    Linear(12,3). The shared weight's rows and columns must be one space."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(6, 12)
        self.shared = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc_in(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.head(x)


class SharedConvBlockTwoInputs(nn.Module):
    """Two image inputs through one shared block Conv(3,8)-BN-ReLU-Conv(8,12)-BN-ReLU; results
    added; pool; Linear(12,3)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1, bias=False),
            nn.BatchNorm2d(12),
            nn.ReLU(),
        )
        self.fc = nn.Linear(12, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        y = self.block(x1) + self.block(x2)
        return self.fc(y.mean((2, 3)))


# --------------------------------------------------------------------------- unsupported op


class UnsupportedRFFT(nn.Module):
    """Linear(6,16) -> ReLU -> Linear(16,12) -> ReLU -> torch.fft.rfft over the 12 features
    (-> 7 complex bins) -> abs -> Linear(7,8) -> ReLU -> Linear(8,3).

    The FFT mixes features in an order-dependent way, so the space it reads (fc2's output, 12) is
    genuinely fixed, and so is its output (the 7 frequency bins)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(7, 8)
        self.fc4 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        h = torch.fft.rfft(h, dim=-1).abs()
        return self.fc4(F.relu(self.fc3(h)))


# --------------------------------------------------------------------------- the cases

CASES: list[Case] = [
    Case("plain_mlp", PlainMLP, _vec(6), 28,
         "input 6 fixed; hidden 16 (fc1->fc2) + 12 (fc2->fc3) = 28; output 4 fixed"),
    Case("mlp_bn_dropout", MLPBatchNormDropout, _vec(6), 24,
         "10 (Linear0 rows, BN1d, Linear4 cols) + 14 (Linear4 rows, Linear7 cols) = 24; "
         "dropout/activations pass through"),
    Case("mlp_returns_features", MLPReturnsFeatures, _vec(6), 16,
         "fc1 hidden 16 permutable; fc2's 12-space is returned as `feat`, so it reaches an output "
         "and is fixed; head output fixed: 16"),
    Case("residual_from_input", ResidualFromInput, _vec(16), 32,
         "the residual stream is the input x itself (16, fixed: fc2 rows, fc1 cols, head cols); "
         "only the MLP hidden 32 is permutable: 32"),
    Case("conv_bn_relu_conv", ConvBNReLUConv, _image(), 8,
         "conv1 out 8 (conv1 rows, bn1, conv2 in) = 8; conv2 out 5 is the model output (fixed)"),
    Case("convnet_classifier", ConvNetClassifier, _image(), 20,
         "conv0 out 8 + conv3 out 12 (pooled to 1x1, flatten is trivial, fc cols) = 20"),
    Case("resblock_identity", ResBlockIdentity, _image(), 16,
         "residual space 8 (stem, conv2 out, both joined by identity add, fc cols) + block hidden 8 "
         "(conv1 out) = 16"),
    Case("resblock_projection", ResBlockProjection, _image(), 36,
         "stem 8 (read by conv1 and the shortcut) + conv1 out 12 + residual 16 (conv2 out joined "
         "with shortcut out by the add, fc cols) = 8 + 12 + 16 = 36"),
    Case("concat_two_branches", ConcatTwoBranches, _image(), 30,
         "stem 8 + branch1 4 + branch2 6 (cat = direct sum 4|6, post conv cols 0-3 / 4-9) + post 12 "
         "= 8 + 4 + 6 + 12 = 30"),
    Case("inception_pool_branch", InceptionWithPoolBranch, _image(), 28,
         "stem 8 (also the 3rd part of the cat via maxpool, post cols 10-17) + b1 4 + b2 6 + post 10 "
         "= 8 + 4 + 6 + 10 = 28"),
    Case("split_linear_output", SplitLinearOutput, _vec(6), 28,
         "fc out 16 = direct sum a 6 | b 10, each its own group (fa cols, fb cols) + fa/fb out 12 "
         "(joined by the add) = 6 + 10 + 12 = 28"),
    Case("chunk_glu", ChunkGLU, _vec(5), 20,
         "fc0 out 12 + GLU 8 (halves joined by a * silu(b), one group appearing at fc_in rows 0-7 and "
         "8-15, counted once) = 12 + 8 = 20"),
    Case("conv_flatten_linear", ConvFlattenLinear, _image(), 24,
         "conv1 out 8 + conv2 out 6 (flatten to 96 = 6 channels x 16 spatial, spatial fixed; group "
         "counts channels) + fc1 out 10 = 8 + 6 + 10 = 24"),
    Case("mobilenet_block", MobileNetBlock, _image(), 36,
         "stem 8 + expanded 16 (expand out = depthwise in = depthwise out, one group) + project 12 "
         "= 8 + 16 + 12 = 36"),
    Case("mobilenetv2_residual", MobileNetV2Residual, _image(), 24,
         "residual 8 (stem out joined with project out) + expanded 16 (through the depthwise) = 24"),
    Case("grouped_conv", GroupedConvNet, _image(), 32,
         "stem 8 (4 blocks of 2, read by groups=4 conv) + gconv out 16 (4 blocks of 4, coupled) + "
         "pw out 8 = 8 + 16 + 8 = 32"),
    Case("resnext_block", ResNeXtBlock, _image(), 40,
         "residual 8 (stem + expand out) + reduce out 16 (2 blocks) + gconv out 16 (2 blocks, coupled) "
         "= 8 + 16 + 16 = 40"),
    Case("conv_gn_stack", ConvGNStack, _image(), 20,
         "conv1 out 8 (GN 2 blocks of 4) + conv2 out 12 (GN 4 blocks of 3) = 20"),
    Case("resblock_groupnorm", ResBlockGroupNorm, _image(), 16,
         "residual 8 (stem/gn0 and conv2/gn2, both GN(2): 2 blocks) + hidden 8 (conv1/gn1, 4 blocks) "
         "= 16"),
    Case("convnext_block", ConvNeXtBlock, _image(), 40,
         "residual 8 (stem out, depthwise through, channels-last LN, pw1 cols, pw2 rows, head LN, "
         "head cols) + pw1 hidden 32 = 40"),
    Case("squeeze_excite", SqueezeExcite, _image(), 28,
         "stem 8 + feature 16 (conv out, joined with se_expand out by the broadcast multiply, "
         "se_reduce cols, fc cols) + SE hidden 4 = 8 + 16 + 4 = 28"),
    Case("manual_mha", ManualMHA, _tokens(), 36,
         "residual 16 (embed out, LN, q/k/v cols, o rows) + Q/K 8 (H=2 x Dh=4, q and k rows, one "
         "group) + V/O 12 (H=2 x Dv=6, v rows, o cols) = 16 + 8 + 12 = 36"),
    Case("timm_attention", TimmAttentionBlock, _tokens(), 80,
         "residual 16 + Q/K 16 (qkv rows 0-15 and 16-31, H=2 x 8) + V/O 16 (qkv rows 32-47, proj "
         "cols) + MLP hidden 32 = 16 + 16 + 16 + 32 = 80"),
    Case("torch_mha", TorchMHABlock, _tokens(), 72,
         "residual 16 (embed out, LNs, in_proj cols, out_proj rows, fc1 cols, fc2 rows) + Q/K 16 "
         "(in_proj rows 0-31) + V/O 16 (in_proj rows 32-47, out_proj cols) + MLP hidden 24 = 72"),
    Case("token_cls_pos", TokenClsPosMLP,
         lambda: (torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(7)),), 72,
         "vocab axis fixed (indexed by the input ids); residual 16 (embedding dim, cls_token, "
         "pos_embed, LNs, fc*a cols, fc*b rows, head cols) + hidden 32 + hidden 24 = 72"),
    Case("layer_scale_mlp", LayerScaleMLP, _tokens(), 48,
         "residual 16 (embed out, gamma, fc2 rows, LN, fc1 cols, head cols) + hidden 32 = 48"),
    Case("layer_scale_conv", LayerScaleConv, _image(), 20,
         "residual 8 (stem, gamma (8,1,1), conv2 out, fc cols) + hidden 12 = 20"),
    Case("shared_linear_twice", SharedLinearTwice, _vec(6), 12,
         "fc_in out 12 = shared in (1st call); shared out = shared in (2nd call) -> one space of 12 "
         "covering fc_in rows, shared rows AND cols, head cols = 12"),
    Case("shared_conv_two_inputs", SharedConvBlockTwoInputs,
         lambda: (_randn(2, 3, 8, 8, seed=1), _randn(2, 3, 8, 8, seed=2)), 20,
         "block hidden 8 (one group for both calls) + block out 12 (both calls joined by the add) "
         "= 20; the two inputs' 3 channels fixed"),
    Case("unsupported_rfft", UnsupportedRFFT, _vec(6), 24,
         "fc1 hidden 16 + fc3 out 8 = 24; fc2 out 12 touches rfft (fixed, and rfft really is order "
         "dependent) and rfft's 7 output bins (fc3 cols) are fixed"),
]

CASES_BY_NAME: dict[str, Case] = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES), "duplicate case names"
