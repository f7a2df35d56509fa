"""A fresh set of architectures written by others, none named by another test, with hand counts that a
script verifies outside mudsc.

For every model the units a user would expect to merge are written down by hand as *spaces*: regular
expressions over state-dict names with the axis they index, and a role (a plain permutation; the
head blocks of attention, whole heads where RoPE fixes the head dimensions). The checks, none of
which use mudsc's analysis:

- permuting every space by hand leaves the output unchanged, and so does each space alone;
- each space matters: leaving out one tensor of it changes the output (so no space is a dead one);

and then mudsc's analysis reaches at least 95 % of the hand count, passes its own self-check under
three permutations, and a permuted copy merges back with MuDSC zip and align.
``benchmarks/investigations/fresh_set.py`` prints the table (mudsc's units against the hand count).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

try:
    from test_constructs import randomize_
    from test_real_models import _need, assert_every_axis_accounted_for, pixels, tokens
except ImportError:  # tests/ collected as a package
    from tests.test_constructs import randomize_
    from tests.test_real_models import _need, assert_every_axis_accounted_for, pixels, tokens

from mudsc_graph import analyze, prepare
from mudsc_graph.inputs import call
from mudsc_graph.spec.permute import _flat_outputs


def _derangement(n: int, g: torch.Generator) -> torch.Tensor:
    """A random permutation that moves every unit (so that leaving a tensor out always shows)."""
    while True:
        p = torch.randperm(n, generator=g)
        if n < 2 or bool((p != torch.arange(n)).all()):
            return p


@dataclass(frozen=True)
class Space:
    """Units claimed by hand: ``moves`` are ``(regex over state-dict names, axis, role)``; an axis
    ``(e, a)`` is axis ``a`` inside block ``e`` of axis 0 (an expert's own units in a 3-D tensor).

    Roles: ``p`` the permutation; ``p2`` it twice (``cat(x, x)`` read by one layer); for attention
    (``heads`` > 0, head dimension ``dim``): ``qk`` the Q and K rows (whole heads when ``rope``), ``vo``
    the V rows and O columns (heads with their insides permuted), ``h`` the head axis of a per-head
    table. ``size`` is what mudsc counts: the units of the space, for attention ``heads`` (``rope``)
    or ``heads * dim`` for Q/K plus ``heads * dim`` for V/O."""

    label: str
    n: int
    moves: tuple
    heads: int = 0
    rope: bool = False
    tie: str | None = None  # spaces with one tie share their head permutation (a bias table shared by layers)
    count: int | None = None  # what mudsc counts, where it is not the rule above

    @property
    def size(self) -> int:
        if self.count is not None:
            return self.count
        if not self.heads:
            return self.n
        return (self.heads if self.rope else self.n) + self.n

    def indices(self, g: torch.Generator, ties: dict) -> dict[str, torch.Tensor]:
        if not self.heads:
            p = _derangement(self.n, g)
            return {"p": p, "p2": torch.cat([p, self.n + p])}
        d = self.n // self.heads
        b = _derangement(self.heads, g)
        b = ties.setdefault(self.tie, b) if self.tie else b
        inner = lambda keep: [torch.arange(d) if keep else _derangement(d, g) for _ in range(self.heads)]  # noqa: E731
        qk_in, vo_in = inner(self.rope), inner(False)
        return {"qk": torch.cat([int(b[j]) * d + qk_in[int(b[j])] for j in range(self.heads)]),
                "vo": torch.cat([int(b[j]) * d + vo_in[int(b[j])] for j in range(self.heads)]), "h": b}


def _moves(state: dict, space: Space, g: torch.Generator, ties: dict, skip: int | None = None) -> dict:
    """``{name: [(axis, index)]}`` of one space (``skip``: leave out the tensors of that move). A role
    may be a function of the space's index arrays (a fused axis: ``cat(qk, 16 + qk, 32 + vo)``)."""
    idx = space.indices(g, ties)
    out: dict[str, list] = {}
    for k, (pattern, axis, role) in enumerate(space.moves):
        names = [n for n in state if re.fullmatch(pattern, n)]
        assert names, f"{space.label}: no tensor matches {pattern!r}"
        if k != skip:
            for n in names:
                out.setdefault(n, []).append((axis, role(idx) if callable(role) else idx[role]))
    return out


def _permuted(model: nn.Module, spaces: list[Space], seed: int, skip: tuple[int, int] | None = None) -> nn.Module:
    import copy

    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    ties: dict = {}
    for s, space in enumerate(spaces):
        for name, steps in _moves(state, space, g, ties, skip[1] if skip and skip[0] == s else None).items():
            for axis, index in steps:
                if isinstance(axis, tuple):  # (block, axis): one expert's own units, along ``axis`` inside block ``block`` of axis 0
                    block, inner = axis
                    t = state[name].clone()
                    t[block] = t[block].index_select(inner - 1, index)
                    state[name] = t
                else:
                    state[name] = state[name].index_select(axis, index)
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    return twin


def _change(model: nn.Module, other: nn.Module, x) -> float:
    with torch.no_grad():
        a, b = _flat_outputs(call(model, x)), _flat_outputs(call(other, x))
    scale = max(float(t.abs().max()) for t in a if t.is_floating_point())
    return max(float((p - q).abs().max()) for p, q in zip(a, b) if p.is_floating_point()) / scale


@dataclass(frozen=True)
class Fresh:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[..., object]
    spaces: Callable[[], list[Space]]
    note: str = ""
    family: str = ""

    def __repr__(self) -> str:
        return self.name


# --------------------------------------------------------------------------- hand-written spaces

L = 2  # every transformer below has 2 layers, hidden 16, 2 heads of 8


def _res(label: str, moves: list, n: int = 16) -> Space:
    return Space(label, n, tuple(moves))


def _layers(fn) -> list[Space]:
    return [s for layer in range(L) for s in fn(layer)]


def llama_like(prefix: str = "model", bias: bool = False, mlp=("gate_proj", "up_proj", "down_proj"), norms=("input_layernorm", "post_attention_layernorm"),
               norm_bias: bool = False, rope: bool = True, inter: int = 24) -> Callable[[], list[Space]]:
    """Decoders written like Llama: RoPE fixes the head dimensions of Q/K (they move as whole heads)."""
    def spaces() -> list[Space]:
        w = r"(weight|bias)" if norm_bias else "weight"
        up, down = mlp[:-1], mlp[-1]
        L_ = rf"{prefix}\.layers\.\d+\."
        res = [(rf"{prefix}\.embed_tokens\.weight", 1, "p"), (rf"{prefix}\.norm\.{w}", 0, "p")]
        res += [(L_ + rf"{n}\.{w}", 0, "p") for n in norms]
        res += [(L_ + rf"self_attn\.{q}_proj\.weight", 1, "p") for q in "qkv"]
        res += [(L_ + r"self_attn\.o_proj\." + ("(weight|bias)" if bias else "weight"), 0, "p")]
        res += [(L_ + rf"mlp\.{u}\.weight", 1, "p") for u in up] + [(L_ + rf"mlp\.{down}\." + ("(weight|bias)" if bias else "weight"), 0, "p")]
        res += [(r"lm_head\.weight", 1, "p")]

        def layer(i: int) -> list[Space]:
            p = rf"{prefix}\.layers\.{i}\."
            b = r"(weight|bias)" if bias else "weight"
            attn = Space(f"attention {i}", 16, ((p + rf"self_attn\.q_proj\.{b}", 0, "qk"), (p + rf"self_attn\.k_proj\.{b}", 0, "qk"),
                                                (p + rf"self_attn\.v_proj\.{b}", 0, "vo"), (p + r"self_attn\.o_proj\.weight", 1, "vo")), heads=2, rope=rope)
            ffn = Space(f"mlp {i}", inter, tuple((p + rf"mlp\.{u}\.{b}", 0, "p") for u in up) + ((p + rf"mlp\.{down}\.weight", 1, "p"),))
            return [attn, ffn]

        return [_res("residual", res)] + _layers(layer)

    return spaces


def encoder_like(base: str, names: dict, inter: int = 24, head: list | None = None, extra_res: list | None = None,
                 res_out: bool = False, bias_table: str | None = None) -> Callable[[], list[Space]]:
    """BERT/ViT-style encoders: ``names`` maps roles (q, k, v, o, up, down, norms) to module names inside a layer."""
    def spaces() -> list[Space]:
        lay = rf"{base}\.\d+\."
        res = list(extra_res or [])
        res += [(lay + rf"{names[r]}\.weight", 1, "p") for r in ("q", "k", "v", "up")]
        res += [(lay + rf"{names[r]}\.(weight|bias)", 0, "p") for r in ("o", "down")]
        res += [(lay + rf"{n}\.(weight|bias)", 0, "p") for n in names["norms"]]
        res += [(lay + rf"{n}", 0, "p") for n in names.get("scales", ())]
        out = [] if res_out else [_res("residual", res)]

        def layer(i: int) -> list[Space]:
            p = rf"{base}\.{i}\."
            moves = [(p + rf"{names['q']}\.(weight|bias)", 0, "qk"), (p + rf"{names['k']}\.(weight|bias)", 0, "qk"),
                     (p + rf"{names['v']}\.(weight|bias)", 0, "vo"), (p + rf"{names['o']}\.weight", 1, "vo")]
            if "table" in names:  # a per-layer relative-position bias table: its head axis moves with the heads
                moves.append((p + names["table"], 1, "h"))
            ffn = Space(f"mlp {i}", inter, ((p + rf"{names['up']}\.(weight|bias)", 0, "p"), (p + rf"{names['down']}\.weight", 1, "p")))
            count = 16 + 16 + 2 if "table" in names else None
            return [Space(f"attention {i}", 16, tuple(moves), heads=2, tie="shared" if bias_table else None, count=count), ffn]

        out += _layers(layer) + list(head or [])
        if bias_table:  # one table for every layer: it ties their heads
            out.append(Space("relative bias heads", 16, ((bias_table, 1, "h"),), heads=2, tie="shared", count=2))
        return out

    return spaces


BERT_NAMES = {"q": r"attention\.self\.query", "k": r"attention\.self\.key", "v": r"attention\.self\.value", "o": r"attention\.output\.dense",
              "up": r"intermediate\.dense", "down": r"output\.dense", "norms": (r"attention\.output\.LayerNorm", r"output\.LayerNorm")}
VIT_NAMES = {"q": r"attention\.q_proj", "k": r"attention\.k_proj", "v": r"attention\.v_proj", "o": r"attention\.o_proj",
             "up": r"mlp\.fc1", "down": r"mlp\.fc2", "norms": (r"layernorm_before", r"layernorm_after")}


def _hf(model: str, config: str, **options) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        T = _need("transformers")
        return getattr(T, model)(getattr(T, config)(**options))

    return build


DEC = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
           max_position_embeddings=32)


def _pixels(size: int = 32):
    return pixels(size)


def _audio(key: str, shape: tuple) -> Callable[..., dict]:
    def make(b: int, seed: int = 0) -> dict:
        return {key: torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed))}

    return make


def _res_vit(prefix: str, tokens_: tuple = ("cls_token",)) -> list:
    e = rf"{prefix}\.embeddings\."
    return [(e + rf"{t}", 2, "p") for t in tokens_] + [(e + r"position_embeddings", 2, "p"),
                                                       (e + r"patch_embeddings\.projection\.(weight|bias)", 0, "p")]


FRESH = [
    Fresh("Qwen2ForCausalLM", _hf("Qwen2ForCausalLM", "Qwen2Config", **DEC), tokens(), llama_like(bias=True), family="decoder"),
    Fresh("Qwen3ForCausalLM", _hf("Qwen3ForCausalLM", "Qwen3Config", **DEC, head_dim=8), tokens(), llama_like(), family="decoder",
          note="per-head q_norm/k_norm (shared by heads) move with nothing: whole heads"),
    Fresh("MistralForCausalLM", _hf("MistralForCausalLM", "MistralConfig", **DEC), tokens(), llama_like(), family="decoder"),
    Fresh("GemmaForCausalLM", _hf("GemmaForCausalLM", "GemmaConfig", **DEC, head_dim=8), tokens(), llama_like(), family="decoder",
          note="lm_head tied to the embedding; RMSNorm (1 + w)"),
    Fresh("Gemma2ForCausalLM", _hf("Gemma2ForCausalLM", "Gemma2Config", **DEC, head_dim=8), tokens(),
          llama_like(norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")),
          family="decoder", note="four norms per layer, logit soft-capping"),
    Fresh("Starcoder2ForCausalLM", _hf("Starcoder2ForCausalLM", "Starcoder2Config", **DEC), tokens(),
          llama_like(bias=True, mlp=("c_fc", "c_proj"), norm_bias=True), family="decoder", note="LayerNorm with bias, GELU MLP with biases"),
    Fresh("Phi3ForCausalLM", _hf("Phi3ForCausalLM", "Phi3Config", **DEC, pad_token_id=0), tokens(),
          lambda: [_res("residual", [(r"model\.embed_tokens\.weight", 1, "p"), (r"model\.norm\.weight", 0, "p"), (r"lm_head\.weight", 1, "p"),
                                     (r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight", 0, "p"),
                                     (r"model\.layers\.\d+\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight", 1, "p"),
                                     (r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight", 0, "p")])] + _layers(lambda i: [
              Space(f"attention {i}", 16, ((rf"model\.layers\.{i}\.self_attn\.qkv_proj\.weight", 0, lambda ix: torch.cat([ix["qk"], 16 + ix["qk"], 32 + ix["vo"]])),
                                           (rf"model\.layers\.{i}\.self_attn\.o_proj\.weight", 1, "vo")), heads=2, rope=True),
              Space(f"mlp {i}", 24, ((rf"model\.layers\.{i}\.mlp\.gate_up_proj\.weight", 0, "p2"), (rf"model\.layers\.{i}\.mlp\.down_proj\.weight", 1, "p")))]),
          family="decoder", note="fused qkv_proj cut by slices, fused gate_up_proj cut by chunk"),
    Fresh("OPTForCausalLM", _hf("OPTForCausalLM", "OPTConfig", vocab_size=50, hidden_size=16, ffn_dim=24, num_hidden_layers=2, num_attention_heads=2,
                                max_position_embeddings=32, word_embed_proj_dim=16), tokens(),
          encoder_like(r"model\.decoder\.layers", {"q": r"self_attn\.q_proj", "k": r"self_attn\.k_proj", "v": r"self_attn\.v_proj",
                                                   "o": r"self_attn\.out_proj", "up": "fc1", "down": "fc2",
                                                   "norms": ("self_attn_layer_norm", "final_layer_norm")},
                       extra_res=[(r"model\.decoder\.embed_tokens\.weight", 1, "p"), (r"model\.decoder\.embed_positions\.weight", 1, "p"),
                                  (r"model\.decoder\.final_layer_norm\.(weight|bias)", 0, "p"), (r"lm_head\.weight", 1, "p")]),
          family="decoder", note="learned positions, no RoPE: Q/K heads keep their insides free"),
    Fresh("ElectraForSequenceClassification", _hf(
        "ElectraForSequenceClassification", "ElectraConfig", vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=24, max_position_embeddings=32, num_labels=3), tokens(),
        encoder_like(r"electra\.encoder\.layer", BERT_NAMES, extra_res=[(r"electra\.embeddings_project\.(weight|bias)", 0, "p"),
                                                                       (r"classifier\.dense\.weight", 1, "p")],
                     head=[Space("embedding 8", 8, ((r"electra\.embeddings\.(word|position|token_type)_embeddings\.weight", 1, "p"),
                                                    (r"electra\.embeddings\.LayerNorm\.(weight|bias)", 0, "p"),
                                                    (r"electra\.embeddings_project\.weight", 1, "p"))),
                           Space("classifier dense", 16, ((r"classifier\.dense\.(weight|bias)", 0, "p"), (r"classifier\.out_proj\.weight", 1, "p")))]),
        family="encoder", note="factorised embedding 8 -> projection to 16"),
    Fresh("AlbertModel", _hf("AlbertModel", "AlbertConfig", vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=24, max_position_embeddings=32), tokens(),
          lambda: [Space("embedding 8", 8, ((r"embeddings\.(word|position|token_type)_embeddings\.weight", 1, "p"),
                                            (r"embeddings\.LayerNorm\.(weight|bias)", 0, "p"), (r"encoder\.embedding_hidden_mapping_in\.weight", 1, "p"))),
                   Space("shared attention", 16, tuple((rf"encoder\.albert_layer_groups\.0\.albert_layers\.0\.attention\.{n}\.(weight|bias)", 0, r)
                                                       for n, r in (("query", "qk"), ("key", "qk"), ("value", "vo")))
                         + ((r"encoder\.albert_layer_groups\.0\.albert_layers\.0\.attention\.dense\.weight", 1, "vo"),), heads=2),
                   Space("shared ffn", 24, ((r"encoder\.albert_layer_groups\.0\.albert_layers\.0\.ffn\.(weight|bias)", 0, "p"),
                                            (r"encoder\.albert_layer_groups\.0\.albert_layers\.0\.ffn_output\.weight", 1, "p")))],
          family="encoder", note="one layer shared by both: its units are one space each; last_hidden_state fixes the residual"),
    Fresh("MPNetForSequenceClassification", _hf(
        "MPNetForSequenceClassification", "MPNetConfig", vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=32, num_labels=3), tokens(),
        lambda: encoder_like(r"mpnet\.encoder\.layer", {"q": r"attention\.attn\.q", "k": r"attention\.attn\.k", "v": r"attention\.attn\.v",
                                                        "o": r"attention\.attn\.o", "up": r"intermediate\.dense", "down": r"output\.dense",
                                                        "norms": (r"attention\.LayerNorm", r"output\.LayerNorm")},
                             extra_res=[(r"mpnet\.embeddings\.(word|position)_embeddings\.weight", 1, "p"), (r"mpnet\.embeddings\.LayerNorm\.(weight|bias)", 0, "p"),
                                        (r"classifier\.dense\.weight", 1, "p")],
                             head=[Space("classifier dense", 16, ((r"classifier\.dense\.(weight|bias)", 0, "p"), (r"classifier\.out_proj\.weight", 1, "p")))],
                             bias_table=r"mpnet\.encoder\.relative_attention_bias\.weight")(),
        family="encoder", note="one relative attention bias (buckets x heads) for both layers: it ties their heads, a 2-unit group of whole heads"),
    Fresh("DeiTForImageClassification", _hf(
        "DeiTForImageClassification", "DeiTConfig", image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, num_labels=3), _pixels(),
        encoder_like(r"deit\.layers", VIT_NAMES, extra_res=_res_vit("deit", ("cls_token", "distillation_token")) +
                     [(r"deit\.layernorm\.(weight|bias)", 0, "p"), (r"classifier\.weight", 1, "p")]), family="vision", note="cls and distillation tokens"),
    Fresh("Dinov2ForImageClassification", _hf(
        "Dinov2ForImageClassification", "Dinov2Config", image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        mlp_ratio=2, num_labels=3), _pixels(),
        encoder_like(r"dinov2\.encoder\.layer", {**VIT_NAMES, "norms": ("norm1", "norm2"), "scales": (r"layer_scale1\.lambda1", r"layer_scale2\.lambda1")},
                     inter=32, extra_res=_res_vit("dinov2") + [(r"dinov2\.layernorm\.(weight|bias)", 0, "p"), (r"classifier\.weight", 1, "p2")]),
        family="vision", note="layer scale; the classifier reads cat(cls, mean of patches): its columns are the residual twice; mask_token unread"),
    Fresh("BeitForImageClassification", _hf(
        "BeitForImageClassification", "BeitConfig", image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, num_labels=3, use_relative_position_bias=True), _pixels(),
        encoder_like(r"beit\.layers", {**VIT_NAMES, "scales": (r"lambda_1", r"lambda_2"), "table": r"relative_position_bias\.relative_position_bias_table"},
                     extra_res=[(r"beit\.embeddings\.cls_token", 2, "p"), (r"beit\.embeddings\.patch_embeddings\.projection\.(weight|bias)", 0, "p"),
                                (r"beit\.pooler\.layernorm\.(weight|bias)", 0, "p"), (r"classifier\.weight", 1, "p")]),
        family="vision", note="per-layer relative position bias tables (their head axis moves with the heads), layer scale, mean pooling"),
    Fresh("ASTForAudioClassification", _hf(
        "ASTForAudioClassification", "ASTConfig", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, num_mel_bins=16,
        max_length=32, patch_size=8, frequency_stride=8, time_stride=8, num_labels=3), _audio("input_values", (32, 16)),
        encoder_like(r"audio_spectrogram_transformer\.layers", VIT_NAMES,
                     extra_res=_res_vit("audio_spectrogram_transformer", ("cls_token", "distillation_token")) +
                     [(r"audio_spectrogram_transformer\.layernorm\.(weight|bias)", 0, "p"), (r"classifier\.layernorm\.(weight|bias)", 0, "p"),
                      (r"classifier\.dense\.weight", 1, "p")]), family="audio", note="spectrogram patches"),
    Fresh("WhisperForAudioClassification", _hf(
        "WhisperForAudioClassification", "WhisperConfig", vocab_size=50, num_mel_bins=8, d_model=16, encoder_layers=2, encoder_attention_heads=2,
        encoder_ffn_dim=24, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=24, max_source_positions=10, num_labels=3,
        classifier_proj_size=8), _audio("input_features", (8, 20)),
        lambda: encoder_like(r"encoder\.layers", {"q": r"self_attn\.q_proj", "k": r"self_attn\.k_proj", "v": r"self_attn\.v_proj",
                                                  "o": r"self_attn\.out_proj", "up": "fc1", "down": "fc2", "norms": ("self_attn_layer_norm", "final_layer_norm")},
                             extra_res=[(r"encoder\.conv2\.(weight|bias)", 0, "p"), (r"encoder\.embed_positions\.weight", 1, "p"),
                                        (r"encoder\.layer_norm\.(weight|bias)", 0, "p"), (r"projector\.weight", 1, "p")],
                             head=[Space("conv1", 16, ((r"encoder\.conv1\.(weight|bias)", 0, "p"), (r"encoder\.conv2\.weight", 1, "p"))),
                                   Space("projector", 8, ((r"projector\.(weight|bias)", 0, "p"), (r"classifier\.weight", 1, "p")))])(),
        family="audio", note="two 1-d convolutions, sinusoidal positions in the state_dict, a projector before the classifier"),
    Fresh("MambaForCausalLM", _hf("MambaForCausalLM", "MambaConfig", vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
                                  conv_kernel=3, time_step_rank=4), tokens(),
          lambda: [_res("residual", [(r"backbone\.embeddings\.weight", 1, "p"), (r"backbone\.layers\.\d+\.norm\.weight", 0, "p"),
                                     (r"backbone\.layers\.\d+\.mixer\.in_proj\.weight", 1, "p"), (r"backbone\.layers\.\d+\.mixer\.out_proj\.weight", 0, "p"),
                                     (r"backbone\.norm_f\.weight", 0, "p"), (r"lm_head\.weight", 1, "p")])] + _layers(lambda i: [
              Space(f"inner {i}", 32, ((rf"backbone\.layers\.{i}\.mixer\.in_proj\.weight", 0, "p2"), (rf"backbone\.layers\.{i}\.mixer\.conv1d\.(weight|bias)", 0, "p"),
                                       (rf"backbone\.layers\.{i}\.mixer\.(A_log|D)", 0, "p"), (rf"backbone\.layers\.{i}\.mixer\.dt_proj\.(weight|bias)", 0, "p"),
                                       (rf"backbone\.layers\.{i}\.mixer\.x_proj\.weight", 1, "p"), (rf"backbone\.layers\.{i}\.mixer\.out_proj\.weight", 1, "p"))),
              Space(f"time-step rank {i}", 4, ((rf"backbone\.layers\.{i}\.mixer\.x_proj\.weight", 0, lambda ix: torch.cat([ix["p"], torch.arange(4, 12)])),
                                               (rf"backbone\.layers\.{i}\.mixer\.dt_proj\.weight", 1, "p"))),
              Space(f"state {i}", 4, ((rf"backbone\.layers\.{i}\.mixer\.x_proj\.weight", 0, lambda ix: torch.cat([torch.arange(4), 4 + ix["p"], 8 + ix["p"]])),
                                      (rf"backbone\.layers\.{i}\.mixer\.A_log", 1, "p"))),
          ]), family="state space", note="in_proj rows are [x; z] (the gate z multiplies x's units); x_proj rows [dt (4); B (4); C (4)]"),
    Fresh("torch.nn.Transformer", lambda: nn.Transformer(16, 2, 1, 1, 24, dropout=0.0, batch_first=True),
          lambda b, seed=0: (torch.randn(b, 5, 16, generator=torch.Generator().manual_seed(seed)), torch.randn(b, 4, 16, generator=torch.Generator().manual_seed(seed + 1))),
          lambda: [Space(name, 16, ((rf"{stack}\.layers\.0\.{attn}\.in_proj_(weight|bias)", 0, lambda ix: torch.cat([ix["qk"], 16 + ix["qk"], 32 + ix["vo"]])),
                                    (rf"{stack}\.layers\.0\.{attn}\.out_proj\.weight", 1, "vo")), heads=2)
                   for name, stack, attn in (("encoder self-attention", "encoder", "self_attn"), ("decoder self-attention", "decoder", "self_attn"),
                                             ("cross-attention", "decoder", "multihead_attn"))]
          + [Space(f"{stack} feed-forward", 24, ((rf"{stack}\.layers\.0\.linear1\.(weight|bias)", 0, "p"), (rf"{stack}\.layers\.0\.linear2\.weight", 1, "p")))
             for stack in ("encoder", "decoder")],
          family="torch", note="src and tgt are inputs and the decoder's output is the output: both residual streams fixed"),
    Fresh("torch.nn.MultiheadAttention(kdim, vdim)", lambda: nn.MultiheadAttention(16, 2, kdim=12, vdim=10, batch_first=True),
          lambda b, seed=0: tuple(torch.randn(b, t, c, generator=torch.Generator().manual_seed(seed + k)) for k, (t, c) in enumerate([(5, 16), (4, 12), (4, 10)])),
          lambda: [Space("attention", 16, ((r"q_proj_weight", 0, "qk"), (r"k_proj_weight", 0, "qk"),
                                            (r"in_proj_bias", 0, lambda ix: torch.cat([ix["qk"], 16 + ix["qk"], 32 + ix["vo"]])),
                                            (r"v_proj_weight", 0, "vo"), (r"out_proj\.weight", 1, "vo")), heads=2)], family="torch",
          note="separate q/k/v projections of different input widths"),
]


class _HeadMajor(nn.Module):
    """User code: q/k/v from one Linear in head-major order, ``view(B, N, H, 3 * d).chunk(3, -1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.qkv, self.o, self.out = nn.Linear(8, 16), nn.Linear(16, 48), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        B, N, _ = x.shape
        h = self.inp(x)
        q, k, v = [t.transpose(1, 2) for t in self.qkv(h).view(B, N, 2, 24).chunk(3, -1)]
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, 16)
        return self.out((h + self.o(a)).mean(1))


def _head_major_rows(ix: dict) -> torch.Tensor:
    """Rows [head j: q (8), k (8), v (8)]: new head j is old head b[j] with its q, k and v rows permuted."""
    qk, vo = ix["qk"].view(2, 8), ix["vo"].view(2, 8)
    old = lambda t: (t // 8) * 24  # noqa: E731  the old head's first row
    return torch.cat([torch.cat([old(qk[j]) + qk[j] % 8, old(qk[j]) + 8 + qk[j] % 8, old(vo[j]) + 16 + vo[j] % 8]) for j in range(2)])


def moe_like(bias: bool = False, router: str = "gate", transposed: bool = False, interleaved: bool = False,
             shared: int = 0, experts: int = 4, inter: int = 24) -> Callable[[], list[Space]]:
    """transformers' mixtures of experts: Llama-like attention, ``experts.gate_up_proj`` (experts, 2 * inter, d)
    and ``down_proj`` (experts, d, inter) (``transposed``: the last two axes swapped), gate and up rows
    concatenated or ``interleaved`` ([g0, u0, g1, u1, ...]); each expert's hidden units are its own."""
    E = r"model\.layers\.\d+\.mlp\.experts\."

    def spaces() -> list[Space]:
        b = r"(weight|bias)" if bias else "weight"
        L_ = r"model\.layers\.\d+\."
        res = [(r"model\.embed_tokens\.weight", 1, "p"), (r"model\.norm\.weight", 0, "p"), (r"lm_head\.weight", 1, "p"),
               (L_ + r"(input|post_attention)_layernorm\.weight", 0, "p"), (L_ + r"self_attn\.[qkv]_proj\.weight", 1, "p"),
               (L_ + r"self_attn\.o_proj\." + ("(weight|bias)" if router == "router" else "weight"), 0, "p"),
               (L_ + rf"mlp\.{router}\.weight", 1, "p"),
               (E + "gate_up_proj", 1 if transposed else 2, "p"), (E + "down_proj", 2 if transposed else 1, "p")]
        res += [(E + "down_proj_bias", 1, "p")] if bias and router == "router" else []
        if shared:
            res += [(L_ + r"mlp\.shared_expert\.(gate|up)_proj\.weight", 1, "p"), (L_ + r"mlp\.shared_expert\.down_proj\.weight", 0, "p"),
                    (L_ + r"mlp\.shared_expert_gate\.weight", 1, "p")]
        up = (lambda ix: torch.stack([2 * ix["p"], 2 * ix["p"] + 1], 1).flatten()) if interleaved else "p2"

        def layer(i: int) -> list[Space]:
            p, x = rf"model\.layers\.{i}\.self_attn\.", rf"model\.layers\.{i}\.mlp\.experts\."
            heads = ((p + rf"q_proj\.{b}", 0, "qk"), (p + rf"k_proj\.{b}", 0, "qk"), (p + rf"v_proj\.{b}", 0, "vo"), (p + r"o_proj\.weight", 1, "vo"))
            heads += ((p + "sinks", 0, "h"),) if router == "router" else ()
            out = [Space(f"attention {i}", 16, heads, heads=2, rope=True)]
            for e in range(experts):
                moves = ((x + "gate_up_proj", (e, 2 if transposed else 1), up), (x + "down_proj", (e, 1 if transposed else 2), "p"))
                moves += ((x + "gate_up_proj_bias", (e, 1), up),) if bias and router == "router" else ()
                out.append(Space(f"expert {e} of layer {i}", inter, moves))
            if shared:
                s_ = rf"model\.layers\.{i}\.mlp\.shared_expert\."
                out.append(Space(f"shared expert {i}", shared, ((s_ + r"(gate|up)_proj\.weight", 0, "p"), (s_ + r"down_proj\.weight", 1, "p"))))
            return out

        return [_res("residual", res)] + _layers(layer)

    return spaces


MOE = dict(DEC, num_experts_per_tok=2)


def _weight_norm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.utils.parametrizations.weight_norm(nn.Linear(16, 32)), nn.GELU(), nn.Linear(32, 4))


FRESH += [
    Fresh("GPTNeoXForCausalLM", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=32, rotary_pct=1.0), tokens(),
          lambda: [_res("residual", [(r"gpt_neox\.embed_in\.weight", 1, "p"), (r"lm_head\.weight", 1, "p"),
                                     (r"gpt_neox\.(final_layer_norm|layers\.\d+\.(input|post_attention)_layernorm)\.(weight|bias)", 0, "p"),
                                     (r"gpt_neox\.layers\.\d+\.(attention\.query_key_value|mlp\.dense_h_to_4h)\.weight", 1, "p"),
                                     (r"gpt_neox\.layers\.\d+\.(attention\.dense|mlp\.dense_4h_to_h)\.(weight|bias)", 0, "p")])] + _layers(lambda i: [
              Space(f"attention {i}", 16, ((rf"gpt_neox\.layers\.{i}\.attention\.query_key_value\.(weight|bias)", 0, _head_major_rows),
                                           (rf"gpt_neox\.layers\.{i}\.attention\.dense\.weight", 1, "vo")), heads=2, rope=True),
              Space(f"mlp {i}", 24, ((rf"gpt_neox\.layers\.{i}\.mlp\.dense_h_to_4h\.(weight|bias)", 0, "p"),
                                     (rf"gpt_neox\.layers\.{i}\.mlp\.dense_4h_to_h\.weight", 1, "p")))]),
          family="decoder", note="head-major fused query_key_value (per head [q, k, v]), RoPE on every head dimension, parallel residual"),
    Fresh("MixtralForCausalLM", _hf("MixtralForCausalLM", "MixtralConfig", **MOE, num_local_experts=4), tokens(), moe_like(), family="mixture of experts",
          note="experts as 3-D tensors behind transformers' grouped_mm dispatch; every expert's hidden units its own"),
    Fresh("GptOssForCausalLM", _hf("GptOssForCausalLM", "GptOssConfig", **dict(MOE, num_experts_per_tok=3), num_local_experts=4, head_dim=8), tokens(length=16),
          moe_like(bias=True, router="router", transposed=True, interleaved=True), family="mixture of experts",
          note="transposed experts with biases, gate and up rows interleaved, clamped gating; attention sinks per head"),
    Fresh("Qwen2MoeForCausalLM", _hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **MOE, num_experts=4, moe_intermediate_size=24,
                                     shared_expert_intermediate_size=20), tokens(), moe_like(bias=True, shared=20), family="mixture of experts",
          note="a shared expert beside the routed ones, gated by a sigmoid of the residual stream"),
    Fresh("user: head-major attention", _HeadMajor, lambda b, seed=0: (torch.randn(b, 5, 8, generator=torch.Generator().manual_seed(seed)),),
          lambda: [_res("residual", [(r"inp\.(weight|bias)", 0, "p"), (r"qkv\.weight", 1, "p"), (r"o\.(weight|bias)", 0, "p"), (r"out\.weight", 1, "p")]),
                   Space("attention", 16, ((r"qkv\.(weight|bias)", 0, _head_major_rows), (r"o\.weight", 1, "vo")), heads=2)],
          family="user code", note="rows interleaved per head"),
    Fresh("user: weight_norm MLP", _weight_norm_mlp, lambda b, seed=0: (torch.randn(b, 8, generator=torch.Generator().manual_seed(seed)),),
          lambda: [Space("hidden 16", 16, ((r"0\.(weight|bias)", 0, "p"), (r"1\.parametrizations\.weight\.original1", 1, "p"))),
                   Space("hidden 32", 32, ((r"1\.parametrizations\.weight\.original[01]", 0, "p"), (r"1\.bias", 0, "p"), (r"3\.weight", 1, "p")))],
          family="parametrized", note="weight_norm: direction v (original1) and magnitude g (original0) computed into the weight"),
]


def _model(case: Fresh) -> nn.Module:
    """The model with weights of unit gain (HF's 0.02 init leaves attention nearly uniform, where
    leaving Q or K unpermuted changes the output by 1e-7: nothing would show that a space matters)."""
    torch.manual_seed(0)
    model = randomize_(case.build().eval())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "parametrizations" not in name:
                fan_in = p[0].numel() if p.dim() > 2 or "embed" not in name else 1
                fan_in = min(p.shape[1:]) if "experts" in name and p.dim() == 3 else fan_in  # one matrix per expert
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("sinks"):  # attention sink logits: large enough that moving them shows
                p.copy_(3 * torch.randn(p.shape, generator=g))
    return model


def _ties(model: nn.Module) -> dict[str, int]:
    """``{state-dict name: storage}``: two names of one tensor (a tied lm_head) share it."""
    return {k: v.untyped_storage().data_ptr() for k, v in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("case", FRESH, ids=repr)
def test_hand_count_is_right(case):
    """Outside mudsc: every space together and each alone leave the output unchanged; each matters."""
    model, x = _model(case), case.inputs(2)
    spaces = case.spaces()
    for seed in range(2):
        assert _change(model, _permuted(model, spaces, seed), x) < 1e-4, "the hand-written spaces together"
    groups: dict = {}
    for i, space in enumerate(spaces):  # tied spaces move together
        groups.setdefault(space.tie or i, []).append(space)
    for members in groups.values():
        assert _change(model, _permuted(model, members, 3), x) < 1e-4, f"{members[0].label} alone"
    ties, state = _ties(model), model.state_dict()
    for i, space in enumerate(spaces):
        for k, (pattern, _, _) in enumerate(space.moves):
            names = [n for n in state if re.fullmatch(pattern, n)]
            others = {ties[n] for j, (q, _, _) in enumerate(space.moves) if j != k for n in state if re.fullmatch(q, n)}
            if all(ties[n] in others for n in names):
                continue  # another name of the same tensors (a tied lm_head): leaving one name out changes nothing
            change = _change(model, _permuted(model, spaces, 5, skip=(i, k)), x)
            assert change > 1e-3, f"{space.label}: leaving out {pattern} changes the output by only {change:.2e}"


@pytest.mark.parametrize("case", FRESH, ids=repr)
def test_mudsc_reaches_the_hand_count(case):
    model, x = _model(case), case.inputs(2)
    hand = sum(s.size for s in case.spaces())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = analyze(model, x)
    assert 0.95 * hand <= spec.permutable_units <= hand, f"{case.name}: {spec.permutable_units} of {hand} units ({case.note})"
    assert_every_axis_accounted_for(model, spec)
    unread = [g.id for g in spec.groups if not g.fixed and not g.probes]
    assert not unread, f"groups {unread} have no activation probe (they would be matched by weights alone)"
    for seed in range(3):
        spec.check(model, x, seed=seed)
    twin = spec.apply_permutation(model, spec.random_permutation(seed=7))
    prepared = prepare([model, twin], data=[case.inputs(4, 1), case.inputs(4, 2)], example_inputs=x, reset_bn=False,
                       inputs_from_batch=lambda batch: batch)
    ref = _flat_outputs(call(model, x))
    for mode in ("zip", "align"):
        out = _flat_outputs(call(prepared.merge(method="mudsc", mode=mode, alpha=0.5, max_iter=1).model, x))
        for a, b in zip(ref, out):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.detach().abs().max()) + 1e-6)
