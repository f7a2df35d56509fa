"""Architectures written by others: Hugging Face transformers, timm and torch's composite modules.

Every model is built from a tiny config with random init (nothing is downloaded) and made
non-constant (``randomize_``: LayerNorm 1/0, zero biases, BatchNorm statistics), then analysed as its
users call it (Hugging Face models with keyword inputs). For each:

- the permutable units equal a hand count, written below with its arithmetic, and the groups have
  the sizes and block counts that count implies (attention heads are blocks);
- ``spec.check`` passes: three random valid permutations leave every output unchanged;
- a permuted copy merges back with MuDSC zip and align, and with zip and REPAIR (one :func:`prepare`, three merges).

Hand-count conventions (docs/concepts.md, "Spaces"): a space that reaches an output is fixed (a base
model's ``last_hidden_state`` fixes its residual stream; a classifier's logits do not, the stream
only feeds them); Q/K and V/O of an attention layer are one group each, in head blocks; a per-head
bias table (T5, Swin) adds a group of whole heads coupled to them; RoPE fixes the head dimensions of
Q/K, so they move only as whole heads (a group of ``heads`` units).
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

try:
    from test_constructs import randomize_
except ImportError:  # tests/ collected as a package
    from tests.test_constructs import randomize_

from mudsc_graph import analyze_full, prepare
from mudsc_graph.inputs import call
from mudsc_graph.spec.permute import _flat_outputs


@dataclass(frozen=True)
class Real:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], object]  # batch size -> inputs of one forward call
    units: int
    groups: list  # sorted (size, blocks) of the free groups
    note: str
    reset_bn: bool = False

    def __repr__(self) -> str:
        return self.name


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokens(vocab: int = 50, length: int = 7) -> Callable[[int], dict]:
    def make(b: int, seed: int = 0) -> dict:
        ids = torch.randint(0, vocab, (b, length), generator=_gen(seed))
        mask = torch.ones(b, length, dtype=torch.long)
        mask[1:, length - 2 :] = 0  # padding: the mask path must not break anything
        return {"input_ids": ids, "attention_mask": mask}

    return make


def pixels(size: int = 32, channels: int = 3, key: str | None = "pixel_values") -> Callable[[int], object]:
    def make(b: int, seed: int = 0) -> object:
        x = torch.randn(b, channels, size, size, generator=_gen(seed))
        return {key: x} if key else (x,)

    return make


def _check_and_merge_back(case: Real) -> None:
    torch.manual_seed(0)
    model = randomize_(case.build().eval())
    example = case.inputs(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing may be left unsupported
        analysis = analyze_full(model, example)
    spec = analysis.spec
    got = sorted((g.size, g.blocks) for g in spec.free_groups())
    assert spec.permutable_units == case.units and got == sorted(case.groups), (
        f"{case.name}: {spec.permutable_units} units {got}; expected {case.units} {sorted(case.groups)} ({case.note})"
    )
    spec.check(model, example)
    twin = spec.apply_permutation(model, spec.random_permutation(seed=7))
    batches = [case.inputs(8, seed) for seed in (1, 2)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, twin)]
    prepared = prepare([model, twin], data=batches, example_inputs=example, reset_bn=case.reset_bn)
    ref = _flat_outputs(call(model, example))
    for mode, repair in (("zip", False), ("align", False), ("zip", True)):  # REPAIR leaves a merge that is already right as it is
        result = prepared.merge(method="mudsc", mode=mode, alpha=0.5, max_iter=1, repair=repair)
        assert type(result.model) is type(model)
        out = _flat_outputs(call(result.model, example))
        for a, b in zip(ref, out):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.detach().abs().max()) + 1e-6)
    for m, old in zip((model, twin), before):  # the merge read the models (not copied when nothing would change them)
        assert not m.training and all(torch.equal(v, old[k]) for k, v in m.state_dict().items()), f"{case.name}: an input model changed"


def _need(package: str):
    """The optional package: CI installs it (missing there is a failure), elsewhere the test skips."""
    if os.environ.get("CI"):
        return importlib.import_module(package)
    return pytest.importorskip(package)


# --------------------------------------------------------------------------- Hugging Face transformers


def _hf(model: str, config: str, **options) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        T = _need("transformers")
        return getattr(T, model)(getattr(T, config)(**options))

    return build


def _bert(model: str, **extra):
    return _hf(model, "BertConfig", vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
               max_position_embeddings=20, **extra)


ATTN = [(16, 2), (16, 2)]  # Q/K and V/O of hidden 16 in 2 heads of 8
HF_CASES = [
    Real("BertModel", _bert("BertModel"), tokens(), 2 * (16 + 16 + 24), (ATTN + [(24, 1)]) * 2,
         "last_hidden_state and pooler_output are outputs: residual and pooler fixed; per layer Q/K 16 + V/O 16 + FFN 24"),
    Real("BertForSequenceClassification", _bert("BertForSequenceClassification", num_labels=3), tokens(),
         16 + 2 * (16 + 16 + 24) + 16, [(16, 1), (16, 1)] + (ATTN + [(24, 1)]) * 2,
         "residual 16 (read by the pooler) + 2 layers x 56 + pooler 16 (read by the classifier)"),
    Real("GPT2LMHeadModel", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=20),
         tokens(), 16 + 2 * (16 + 16 + 64), [(16, 1)] + (ATTN + [(64, 1)]) * 2,
         "residual 16: lm_head is tied to wte and reads it; per layer Q/K 16 + V/O 16 (c_attn rows sum(QK, QK, V)) + MLP 4*16"),
    Real("LlamaForCausalLM", _hf(
        "LlamaForCausalLM", "LlamaConfig", vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=20), tokens(), 16 + 2 * (2 + 16 + 24), [(16, 1)] + [(2, 2), (16, 2), (24, 1)] * 2,
         "residual 16; per layer: RoPE (inv_freq is not in the state_dict) fixes the head dimensions, so Q/K move as 2 whole "
         "heads (a 2-unit group coupled to V/O), V/O 16 in 2 heads, SwiGLU MLP 24"),
    Real("ViTForImageClassification", _hf(
        "ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=24, num_labels=3),
         pixels(32), 16 + 2 * (16 + 16 + 24), [(16, 1)] + (ATTN + [(24, 1)]) * 2,
         "residual 16 (cls token, position embeddings, patch projection rows; the classifier reads it) + 2 layers x 56"),
    Real("CLIPVisionModel", _hf(
        "CLIPVisionModel", "CLIPVisionConfig", image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=24),
         pixels(32), 2 * (16 + 16 + 24), (ATTN + [(24, 1)]) * 2, "last_hidden_state is an output: residual fixed; 2 layers x 56"),
    Real("ConvNextForImageClassification", _hf(
        "ConvNextForImageClassification", "ConvNextConfig", num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
        num_labels=3), pixels(32), 8 + 4 * 8 + 16 + 4 * 16,
         [(8, 1), (32, 1), (16, 1), (64, 1)],
         "stage streams 8 and 16 (depthwise convs pass them through), MLP hidden 4x each"),
    Real("SwinForImageClassification", _hf(
        "SwinForImageClassification", "SwinConfig", image_size=32, patch_size=4, embed_dim=8, depths=[2, 2], num_heads=[2, 2],
        window_size=4, num_labels=3), pixels(32),
         8 + 2 * (8 + 8 + 32 + 2) + 16 + 2 * (16 + 16 + 64 + 2),
         [(8, 1), (16, 1)] + [(8, 2), (8, 2), (32, 1), (2, 2)] * 2 + [(16, 2), (16, 2), (64, 1), (2, 2)] * 2,
         "stage 0: stream 8, per block Q/K 8 + V/O 8 + MLP 32 + the relative-position bias table's 2 heads; patch merging "
         "(strided slices of the spatial axes) -> stream 16, per block 16 + 16 + 64 + 2 (shifted windows: the mask is per window, not per head)"),
    Real("DistilBertModel", _hf(
        "DistilBertModel", "DistilBertConfig", vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=24, max_position_embeddings=20), tokens(),
         2 * (16 + 16 + 24), (ATTN + [(24, 1)]) * 2, "last_hidden_state is an output: residual fixed; 2 layers x 56"),
    Real("T5EncoderModel", _hf(
        "T5EncoderModel", "T5Config", vocab_size=50, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2),
         tokens(), 2 * (16 + 16 + 24) + 2, [(2, 2)] + (ATTN + [(24, 1)]) * 2,
         "residual fixed (output); 2 layers x (Q/K 16 + V/O 16 + FFN 24); the relative attention bias, computed once and added "
         "in every layer, is one 2-head group that couples the heads of both layers"),
    Real("ResNetForImageClassification", _hf(
        "ResNetForImageClassification", "ResNetConfig", num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
        layer_type="basic", num_labels=3, downsample_in_first_stage=False), pixels(32), 8 + 8 + 16 + 16, [(8, 1), (8, 1), (16, 1), (16, 1)],
         "stem 8 = stage 0 stream (no shortcut conv), its inner conv 8; stage 1 stream 16 (shortcut conv), inner 16", reset_bn=False),
]


@pytest.mark.parametrize("case", HF_CASES, ids=repr)
def test_hugging_face_models(case):
    _check_and_merge_back(case)


# --------------------------------------------------------------------------- timm


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: _need("timm").create_model(name, pretrained=False, num_classes=5, **kw)


def _efficientnet_b0() -> tuple[int, list]:
    """Stem 32, MBConv blocks (expanded width, squeeze-excite width = block input / 4, output), head 1280."""
    sizes = [32, 8, 16]  # stem (the depthwise block passes it through), its SE 32/4, its projection 16
    width = 16
    for expand, out, repeats in ((6, 24, 2), (6, 40, 2), (6, 80, 3), (6, 112, 3), (6, 192, 4), (6, 320, 1)):
        for r in range(repeats):
            sizes += [width * expand, width // 4]  # expansion, SE reduction (a residual block keeps the stream)
            if r == 0:
                sizes.append(out)  # a new stream
            width = out
    sizes.append(1280)
    return sum(sizes), [(s, 1) for s in sizes]


def _mobilenetv3_small() -> tuple[int, list]:
    """Stem 16; blocks (expanded width, SE width = expanded / 4 rounded up to 8, output); 576 conv; head 1024."""
    se = lambda c: max(8, int(c / 4 + 4) // 8 * 8)  # noqa: E731  timm's make_divisible(c * 0.25, 8)
    sizes = [16, se(16), 16]  # stem (depthwise-separable block passes it), SE 8, projection 16 (stride 2: a new stream)
    for exp, out, has_se, new_stream in ((72, 24, False, True), (88, 24, False, False), (96, 40, True, True), (240, 40, True, False),
                                         (240, 40, True, False), (120, 48, True, True), (144, 48, True, False), (288, 96, True, True),
                                         (576, 96, True, False), (576, 96, True, False)):
        sizes += [exp] + ([se(exp)] if has_se else []) + ([out] if new_stream else [])
    sizes += [576, 1024]
    return sum(sizes), [(s, 1) for s in sizes]


def _regnetx_002() -> tuple[int, list]:
    """Stem 32; stages of widths 24/56/152/368 and depths 1/1/4/7, groups of 8 channels: per stage a stream
    (its first block's shortcut conv) and per block two grouped widths (conv1 and conv2 outputs, in w/8 blocks)."""
    sizes = [(32, 1)]
    for w, d in ((24, 1), (56, 1), (152, 4), (368, 7)):
        sizes += [(w, 1)] + [(w, w // 8)] * (2 * d)
    return sum(s for s, _ in sizes), sizes


EFF, EFF_GROUPS = _efficientnet_b0()
MBV3, MBV3_GROUPS = _mobilenetv3_small()
REGNET, REGNET_GROUPS = _regnetx_002()
TIMM_CASES = [
    Real("resnet18", _timm("resnet18"), pixels(64, key=None), 3 * (64 + 128 + 256 + 512),
         [(c, 1) for c in (64, 128, 256, 512) for _ in range(3)], "per stage the stream + 2 blocks' inner convs"),
    Real("vit_tiny", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), pixels(32, key=None),
         192 + 2 * (192 + 192 + 768), [(192, 1)] + [(192, 3), (192, 3), (768, 1)] * 2, "stream 192; 2 blocks x (Q/K, V/O in 3 heads, MLP 768)"),
    Real("convnext_atto", _timm("convnext_atto"), pixels(64, key=None), (40 + 80 + 160 + 320) + 4 * (2 * 40 + 2 * 80 + 6 * 160 + 2 * 320),
         [(40, 1), (80, 1), (160, 1), (320, 1)] + [(160, 1)] * 2 + [(320, 1)] * 2 + [(640, 1)] * 6 + [(1280, 1)] * 2,
         "4 stage streams 40..320 (LayerNorm2d normalises the channel axis: traced through, not taken for nn.LayerNorm); "
         "MLP 4x per block, depths 2/2/6/2"),
    Real("efficientnet_b0", _timm("efficientnet_b0"), pixels(64, key=None), EFF, EFF_GROUPS, _efficientnet_b0.__doc__),
    Real("mobilenetv3_small_100", _timm("mobilenetv3_small_100"), pixels(64, key=None), MBV3, MBV3_GROUPS, _mobilenetv3_small.__doc__),
    Real("swin_tiny", _timm("swin_tiny_patch4_window7_224", img_size=56, depths=(2, 2), num_heads=(3, 6), embed_dim=48),
         pixels(56, key=None), 48 + 2 * (48 + 48 + 192 + 3) + 96 + 2 * (96 + 96 + 384 + 6),
         [(48, 1), (96, 1)] + [(48, 3), (48, 3), (192, 1), (3, 3)] * 2 + [(96, 6), (96, 6), (384, 1), (6, 6)] * 2,
         "swin_tiny's blocks at width 48, 2+2 blocks, 7x7 windows on 14x14 patches (shifted every other block): streams 48 and 96, "
         "per block Q/K, V/O, MLP 4x and the bias table's heads; x[:, :H, :W] with computed bounds fixes only the spatial axes"),
    Real("regnetx_002", _timm("regnetx_002"), pixels(64, key=None), REGNET, REGNET_GROUPS, _regnetx_002.__doc__),
]


@pytest.mark.parametrize("case", TIMM_CASES, ids=repr)
def test_timm_models(case):
    _check_and_merge_back(case)


# --------------------------------------------------------------------------- torch's composite modules


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)))


def _seq(b: int, seed: int = 0) -> tuple:
    return (torch.randn(b, 5, 4, generator=_gen(seed)),)


COMPOSITE_CASES = [
    Real("TransformerEncoder", Encoder, _seq, 8 + 2 * (8 + 8 + 12), [(8, 1)] + [(8, 2), (8, 2), (12, 1)] * 2,
         "fx keeps the layers as opaque leaves; torch.export traces through them (batch and heads share one axis in "
         "torch's attention): stream 8 + 2 layers x (Q/K 8, V/O 8 in 2 heads, FFN 12)"),
]


@pytest.mark.parametrize("case", COMPOSITE_CASES, ids=repr)
def test_torch_composites(case):
    _check_and_merge_back(case)


# --------------------------------------------------------------------------- no silent drop


def assert_every_axis_accounted_for(model: nn.Module, spec) -> None:
    """Every state-dict tensor is in the spec, and every axis of more than one position is in a group
    (free, or fixed with the reason the user sees) or fixed with a recorded reason (``spec.fixed``)."""
    from mudsc_graph.spec.axes import group_ids

    groups = {g.id: g for g in spec.groups}
    for name, t in model.state_dict().items():
        if t.dim() == 0 or not t.is_floating_point():
            continue
        assert name in spec.axes, f"{name} is in no group and not reported"
        for axis, e in enumerate(spec.axes[name]):
            if t.shape[axis] == 1:
                continue
            ids = group_ids(e)
            if ids:
                assert all(not groups[g].fixed or groups[g].reason for g in ids), f"{name}[{axis}]: a fixed group without a reason"
            else:
                assert spec.fixed.get(name, {}).get(axis), f"{name}[{axis}] is fixed without a reason"


@pytest.mark.parametrize("case", HF_CASES + TIMM_CASES + COMPOSITE_CASES, ids=repr)
def test_no_parameter_axis_is_dropped_silently(case):
    torch.manual_seed(0)
    model = randomize_(case.build().eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = analyze_full(model, case.inputs(2)).spec
    assert_every_axis_accounted_for(model, spec)


# --------------------------------------------------------------------------- soundness on more families


SOUNDNESS_CASES = [
    # blocks indexed by units that are themselves in blocks (channel-multiplying grouped convs): a
    # 'valid' permutation changed fastvit_t8's output by 133 % of its scale before they moved together
    Real("fastvit_t8", _timm("fastvit_t8"), pixels(64, key=None), 0, [], "timm FastViT: MobileOne and RepMixer blocks"),
    # a state-space model written with einsums over (batch, chunk, heads, ...) letters: the einsum rule's
    # letters that depend on another (experts) must leave it as sound as before
    Real("Mamba2ForCausalLM", _hf("Mamba2ForCausalLM", "Mamba2Config", vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2,
                                  expand=2, conv_kernel=3, n_groups=1, num_heads=4, head_dim=8, chunk_size=4), tokens(length=8), 0, [],
         "SSD chunked scan in einsums"),
]


@pytest.mark.parametrize("case", SOUNDNESS_CASES, ids=repr)
def test_more_families_are_analysed_soundly(case):
    """No hand count here: three random valid permutations leave the output as it was."""
    torch.manual_seed(0)
    model, example = randomize_(case.build().eval()), case.inputs(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = analyze_full(model, example).spec
    assert spec.permutable_units > 0
    for seed in range(3):
        spec.check(model, example, seed=seed)
