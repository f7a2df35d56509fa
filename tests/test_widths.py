"""Width budgets (merging/widths.py, ``merge(..., width=...)``) against exact oracles: at width N
the merge keeps every unit of every model and computes the ensemble's average; a model merged with
a permuted copy of itself at any width comes back (a unit left unmerged is a Net2Net duplicate whose
outgoing weights are split); models written by others (timm, transformers, torch's encoder layer)
are rebuilt with the new sizes or keep a group at one model's width with a warning."""

from __future__ import annotations

import importlib
import json
import os
import warnings

import pytest
import torch
from torch import nn

from mudsc_graph import MergeError, analyze, get_registry, merge
from mudsc_graph.merging.matching import match_align, match_zip
from mudsc_graph.merging.widths import resize_module

from test_merge import _data, _model, _permuted


def _optional(name: str):
    """CI installs timm and transformers: missing there is a failure, elsewhere the test skips."""
    return importlib.import_module(name) if os.environ.get("CI") else pytest.importorskip(name)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    err = float((got - want).abs().max() / want.abs().max())
    assert err < tol, f"relative difference {err}"


# -- matchers -----------------------------------------------------------------------------------------
def _sim(n_models: int, units: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n_models * units, 12, generator=g)
    return torch.corrcoef(f)


@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize("match", [match_zip, match_align], ids=["zip", "align"])
def test_a_matcher_gives_the_merged_width_asked_for(match, n_models):
    o = 6
    for merged in range(1 if match is match_zip else o, n_models * o + 1):  # zip narrows too
        m = match([_sim(n_models, o)], n_models, merged=[merged])[0]
        assert m.merged_units == merged
        assert sorted(set(m.labels.tolist())) == list(range(merged))  # every merged unit has a member
        for i in range(n_models):  # a model's units never share a merged unit in align; all are kept somewhere
            assert m.unmerge_block(i).sum(1).eq(1).all()
    with pytest.raises(ValueError, match=f"between {1 if match is match_zip else o} and"):
        match([_sim(n_models, o)], n_models, merged=[n_models * o + 1])


def test_align_leaves_the_least_similar_pairs_unmerged():
    """Model 1 = model 0 with one unit replaced by noise: at one extra unit, that pair is the one split."""
    g = torch.Generator().manual_seed(3)
    f0 = torch.randn(5, 40, generator=g)
    f1 = f0.clone()
    f1[2] = torch.randn(40, generator=g)
    m = match_align([torch.corrcoef(torch.cat([f0, f1]))], 2, merged=[6])[0]
    assert m.labels[:5].tolist() == [0, 1, 2, 3, 4] and m.labels[5:].tolist() == [0, 1, 5, 3, 4]


@pytest.mark.parametrize("match", [match_zip, match_align], ids=["zip", "align"])
def test_block_matchers_keep_whole_blocks_and_coupled_groups_agree(match):
    blocks, d, n = 4, 3, 2
    sims = [_sim(n, blocks * d, seed) for seed in (1, 2)]
    ms = match(sims, n, blocks, merged=[6 * d, 6 * d])
    for m in ms:
        assert m.merged_units == 6 * d
        for i in range(n):  # every unit of a model's block goes to one merged block, in order of its position
            lab = m.labels[i * blocks * d:(i + 1) * blocks * d].reshape(blocks, d)
            assert (lab // d == (lab // d)[:, :1]).all()
    detached = [set((m.labels[blocks * d:].reshape(blocks, d)[:, 0] // d).tolist()) - set(range(blocks)) for m in ms]
    assert detached[0] == detached[1] and len(detached[0]) == 2  # one block pairing for coupled groups
    with pytest.raises(ValueError, match="whole number of blocks"):
        match(sims, n, blocks, merged=[6 * d + 1, 6 * d + 1])


# -- width N is the ensemble ------------------------------------------------------------------------
@pytest.mark.parametrize("how", [dict(method="mudsc", mode="zip"), dict(method="zipit"), dict(method="weight_matching")],
                         ids=["mudsc-zip", "zipit", "weight-matching"])
@pytest.mark.parametrize("name, n", [("mlp", 2), ("resnet20", 2), ("resnet20", 3)])
def test_width_n_keeps_every_unit_and_gives_the_ensembles_average(name, n, how):
    arch, _ = _model(name)
    models = [_model(name, seed=s)[1] for s in range(n)]
    data = _data(arch)
    r = merge(models, data=data, width=n, reset_bn=False, max_iter=3, **how)
    assert r.widths and all(u == n * r.spec.groups[g].size for g, u in r.widths.items())
    x = _data(arch, 1, seed=9)[0]
    with torch.no_grad():
        _close(r.model(x), sum(m(x) for m in models) / n)


# -- permuted copies come back at any width -------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "resnet20", "resnet20_gn", "vgg11_bn", "mixer_tiny"])
@pytest.mark.parametrize("how", [dict(method="mudsc", mode="zip"), dict(method="mudsc", mode="align"),
                                 dict(method="mudsc", mode="zip", refit=True), dict(method="mudsc", mode="zip", repair=True)],
                         ids=["zip", "align", "refit", "repair"])
def test_a_permuted_copy_merged_at_width_one_and_a_half_comes_back(name, how):
    arch, a = _model(name)
    data = _data(arch)
    b = _permuted(a, (data[0],))
    spec = analyze(a, (data[0],))
    # a LayerNorm over a widened space sees duplicates: the exact oracle widens what no LayerNorm reads
    width = {g.id: 1.5 for g in spec.free_groups() if not any("norm" in n for n, _ in g.members)} if name == "mixer_tiny" else 1.5
    r = merge([a, b], data=data, width=width, reset_bn=False, max_iter=10, **how)
    assert r.widths
    x = _data(arch, 1, seed=9)[0]
    with torch.no_grad():
        _close(r.model(x), a(x))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_partial_zip_at_a_width_returns_each_models_output(tracer):
    arch, a = _model("resnet20_gn")
    data = _data(arch)
    b = _permuted(a, (data[0],))
    r = merge([a, b], data=data, width=1.5, stop_at="layer2", reset_bn=False, max_iter=5, tracer=tracer)
    assert r.widths and r.model.trunk.get_parameter("layer1.0.conv1.weight").shape[0] == 24
    x = _data(arch, 1, seed=9)[0]
    with torch.no_grad():
        for out in r.model(x):
            _close(out, a(x))


def test_width_one_is_todays_merge():
    arch, a = _model("resnet20")
    _, b = _model("resnet20", seed=1)
    data = _data(arch)
    plain, same = merge([a, b], data=data, max_iter=5), merge([a, b], data=data, max_iter=5, width=1.0)
    assert not same.widths
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, same.model.state_dict()[k]), k


@pytest.mark.parametrize("width, needle", [(0, "above 0"), (2.5, "at most 2"), ({"nowhere": 1.5}, "produces no merge group"),
                                           ({999: 1.5}, "names group 999"), ("wide", "above 0")])
def test_a_bad_width_is_one_clear_error(width, needle):
    arch, a = _model("mlp")
    with pytest.raises(MergeError, match=needle):
        merge([a, _model("mlp", seed=1)[1]], data=_data(arch), width=width)


def test_a_matcher_without_widths_is_refused():
    arch, a = _model("mlp")
    with pytest.raises(MergeError, match="cannot merge wider"):
        merge([a, _model("mlp", seed=1)[1]], data=_data(arch), method="average", width=1.5)
    with pytest.raises(MergeError, match="cannot merge narrower"):
        merge([a, _model("mlp", seed=1)[1]], data=_data(arch), method="weight_matching", width=0.5)


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_zip_narrower_than_one_model_gives_back_what_two_wide_copies_share(name):
    """Two permuted copies of a Net2Net-doubled model, zipped at width 0.5, are the original model:
    every unit's four copies fuse into one (no decay)."""
    from mudsc_graph.merging.widths import net2net

    arch, a = _model(name)
    data = _data(arch)
    spec = analyze(a, (data[0],))
    wide = net2net(a, spec, {g.id: 2 * g.size for g in spec.free_groups()}, seed=2)
    r = merge([wide, _permuted(wide, (data[0],), seed=6)], data=data, width=0.5, reset_bn=False, max_iter=5,
              matcher_options={"a": 1.0})
    first = next(iter(a.state_dict()))
    assert r.model.state_dict()[first].shape == a.state_dict()[first].shape
    with torch.no_grad():
        x = _data(arch, 1, seed=9)[0]
        _close(r.model(x), a(x))


def test_width_by_module_name_widens_the_groups_it_produces():
    arch, a = _model("mlp")
    _, b = _model("mlp", seed=1)
    spec = analyze(a, (_data(arch)[0],))
    first = next(n for n, _ in spec.groups[spec.free_groups()[0].id].members).rpartition(".")[0]
    r = merge([a, b], data=_data(arch), width={first: 2.0})
    assert list(r.widths) == [spec.free_groups()[0].id]


# -- rebuilding modules ------------------------------------------------------------------------------------
def test_resize_module_updates_torchs_size_attributes_and_keeps_ties():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.conv = nn.Conv1d(4, 4, 3, groups=4, padding=1)
            self.gn = nn.GroupNorm(2, 4)
            self.ln = nn.LayerNorm(4)
            self.head = nn.Linear(4, 10)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids).transpose(1, 2)
            h = self.gn(self.conv(h)).transpose(1, 2)
            return self.head(self.ln(h))

    net = Net()
    shapes = {"emb.weight": (10, 6), "conv.weight": (6, 1, 3), "conv.bias": (6,), "gn.weight": (6,), "gn.bias": (6,),
              "ln.weight": (6,), "ln.bias": (6,), "head.bias": (10,)}
    resize_module(net, shapes)
    assert net.head.weight is net.emb.weight and net.emb.embedding_dim == 6
    assert (net.conv.in_channels, net.conv.out_channels, net.conv.groups) == (6, 6, 6)
    assert (net.gn.num_channels, net.gn.num_groups) == (6, 3) and net.ln.normalized_shape == (6,)
    assert net(torch.randint(0, 10, (2, 5))).shape == (2, 5, 10)


# -- models written by others ----------------------------------------------------------------------------
def _caught(fn):
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in ws if "width" in str(w.message)]


def test_torchs_multihead_attention_keeps_its_heads_and_says_why():
    """nn.MultiheadAttention's inner width is its embed_dim: its heads cannot widen (a warning);
    the feed-forward units can, and a permuted copy comes back."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    for m in layer.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(8, 5, 16)
    spec = analyze(layer, (x[:2],))
    twin = spec.apply_permutation(layer, spec.random_permutation(1))
    width = {g.id: 1.5 for g in spec.free_groups() if not any("norm" in n for n, _ in g.members)}
    r, said = _caught(lambda: merge([layer, twin], data=[x[:4], x[4:]], width=width))
    assert any("stay at one model's width" in s for s in said), said
    assert r.model.linear1.out_features == 48
    with torch.no_grad():
        _close(r.model(x), layer(x))


def timm_vit() -> tuple[nn.Module, torch.Tensor]:
    """timm's ViT (2 blocks, 3 heads of 64) with its zero head and 1/0 LayerNorms made non-constant, and 12 images."""
    timm = _optional("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.2, generator=g)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return model, torch.randn(12, 3, 32, 32, generator=g)


def test_timms_vit_widens_its_mlps_and_its_heads():
    model, x = timm_vit()
    spec = analyze(model, (x[:2],))
    twin = spec.apply_permutation(model, spec.random_permutation(2))
    width = {g.id: 1.5 for g in spec.free_groups() if not any("norm" in n for n, _ in g.members)}
    r, said = _caught(lambda: merge([model, twin], data=[x[:6], x[6:]], width=width))
    assert r.model.blocks[0].mlp.fc1.out_features == int(1.5 * model.blocks[0].mlp.fc1.out_features)
    assert not said and r.model.blocks[0].attn.num_heads == 5  # 3 heads at 1.5: 2 more, whole
    fitted = merge([model, twin], data=[x[:6], x[6:]], width=width, refit=True)  # its walk runs the widened heads
    with torch.no_grad():
        _close(r.model(x), model(x))
        _close(fitted.model(x), model(x))


def test_a_hugging_face_llama_widens_heads_and_mlp_and_its_config_says_so(tmp_path):
    transformers = _optional("transformers")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(cfg).eval()
    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, 40, (8, 12))
    spec = analyze(model, {"input_ids": ids[:2]})
    twin = spec.apply_permutation(model, spec.random_permutation(2))
    residual = max(spec.free_groups(), key=lambda g: len(g.members)).id
    r = merge([model, twin], data=[{"input_ids": ids[:4]}, {"input_ids": ids[4:]}], method="mudsc", mode="zip",
              width={g.id: 2.0 for g in spec.free_groups() if g.id != residual})
    c = r.model.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (48, 64, 8, 2)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        _close(r.model(input_ids=ids).logits, ref)
    r.model.save_pretrained(tmp_path)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        _close(back(input_ids=ids).logits, ref)


def test_a_hugging_face_config_that_cannot_say_a_width_keeps_it():
    """BERT's config has one intermediate_size: widening one layer's MLP alone cannot be written."""
    transformers = _optional("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 40, (8, 10))
    twin = analyze(model, {"input_ids": ids[:2]})
    twin = twin.apply_permutation(model, twin.random_permutation(1))
    r, said = _caught(lambda: merge([model, twin], data=[{"input_ids": ids}], method="zipit",
                                    width={"encoder.layer.0.intermediate": 1.5}))
    assert not r.widths and any("config cannot say" in s for s in said), said
    r = merge([model, twin], data=[{"input_ids": ids}], method="zipit", width={"encoder.layer.0.intermediate": 1.5,
                                                                              "encoder.layer.1.intermediate": 1.5})
    assert r.model.config.intermediate_size == 36 and len(r.widths) == 2


# -- the command line ---------------------------------------------------------------------------------------
def test_a_width_checkpoint_survives_save_and_eval(tmp_path):
    from typer.testing import CliRunner

    from mudsc_cli.app import app
    from mudsc_graph.io.checkpoints import load_checkpoint

    torch.manual_seed(0)
    a = get_registry().architecture("mlp").build(hidden=(24, 16), bias=True).eval()
    spec = analyze(a, (torch.randn(2, 1, 28, 28),))
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(spec.apply_permutation(a, spec.random_permutation(5)).state_dict(), tmp_path / "b.pt")
    run = lambda *args: CliRunner().invoke(app, [str(x) for x in args])  # noqa: E731
    arch = ("--arch", "mlp", "--arch-opt", "hidden=(24, 16)", "--arch-opt", "bias=True")
    out = tmp_path / "wide.safetensors"
    r = run("merge", tmp_path / "a.pt", tmp_path / "b.pt", *arch, "--data", "digits", "--samples", "100", "--width", "1.5",
            "--out", out, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["widened_groups"] == 2
    state, meta = load_checkpoint(out)
    assert state["layers.0.weight"].shape[0] == 36 and meta["widths"]["shapes"]["layers.0.weight"] == [36, 784]
    evals = [json.loads(run("eval", path, *arch, "--data", "digits", "--json").output) for path in (out, tmp_path / "a.pt")]
    assert evals[0]["accuracy"] == evals[1]["accuracy"]  # the merge with a permuted copy is the model, at 1.5x its width
    bad = run("merge", tmp_path / "a.pt", tmp_path / "b.pt", *arch, "--data", "digits", "--width", "1.5", "--stop-at", "layers.0",
              "--out", tmp_path / "x.pt")
    assert bad.exit_code == 1 and "--width with --stop-at" in bad.output and not (tmp_path / "x.pt").exists()


def test_a_groupnorm_without_weights_keeps_its_groups_at_one_models_width():
    """No tensor says such a GroupNorm's channels, so its group count could not follow a widening."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8, affine=False), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(8, 3, 9, 9)
    spec = analyze(net, (x[:2],))
    twin = spec.apply_permutation(net, spec.random_permutation(1))
    r, said = _caught(lambda: merge([net, twin], data=[x], width=1.5))
    assert any("GroupNorm without affine" in s for s in said), said
    with torch.no_grad():
        _close(r.model(x), net(x))


def test_eval_refuses_width_metadata_it_cannot_read(tmp_path):
    from typer.testing import CliRunner

    from mudsc_cli.app import app
    from mudsc_graph.io.checkpoints import save_checkpoint

    a = get_registry().architecture("mlp").build(hidden=(24, 16), bias=True).eval()
    save_checkpoint(tmp_path / "m.safetensors", a.state_dict(), metadata={"widths": {"shapes": "wide"}})
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "m.safetensors"), "--arch", "mlp", "--arch-opt", "hidden=(24, 16)",
                                 "--arch-opt", "bias=True", "--data", "digits"])
    assert r.exit_code == 1 and "width metadata" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("name", ["mlp", "resnet20", "resnet20_gn", "vgg11_bn", "mixer_tiny", "timm_vit_tiny"])
def test_net2net_copies_compute_the_same_function(name):
    """The oracle generator of heterogeneous merges: a wider copy (units duplicated, consumers split)."""
    from mudsc_graph.merging.widths import expressible, net2net, target_units

    arch, a = _model(name)
    x = _data(arch, 1, seed=9)[0]
    spec = analyze(a, (x[:2],))
    gids = [g.id for g in spec.free_groups() if not any("norm" in n for n, _ in g.members)]  # what no LayerNorm reads
    units, _ = expressible(a, spec, target_units(spec, gids, 1.5, 2), (x[:2],))
    assert units
    wide = net2net(a, spec, units, seed=3)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in a.parameters())
    with torch.no_grad():
        _close(wide(x), a(x))
