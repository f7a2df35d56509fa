"""Hugging Face model directories on the command line: `mudsc merge DIR DIR --out DIR`, `mudsc eval DIR`,
`mudsc inspect DIR`, and every error path (one line, exit 1, nothing written).

Tiny BERT classifiers with random weights and a WordPiece tokenizer built here: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import mudsc_graph  # noqa: E402  (first: it makes a torchvision without compiled ops importable)
from mudsc_cli.app import app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog sat on mat ran fast slow big small red blue bird sang loud quiet".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELLED = [
    "0\tthe cat sat on the mat", "1\ta dog ran fast", "0\tthe big red cat", "1\ta small blue dog sat",
    "0\tthe cat sang", "1\ta loud dog ran on the big mat", "0\tquiet cat", "1\ta bird sang loud and fast",
]
FAST = ["--max-iter", "3", "--quiet"]


def _runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def _run(*args):
    return _runner().invoke(app, [str(a) for a in args])


def _one_line_error(result, *needles):
    assert result.exit_code == 1, (result.stdout, result.stderr)
    text = result.stdout + result.stderr
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def _config(**changes):
    from transformers import BertConfig

    options = dict(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=64, num_labels=2,
    )
    return BertConfig(**{**options, **changes})


def _bert(seed, **changes):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(_config(**changes)).eval()


def _save(model, path, tokenizer=None):
    from mudsc_graph.io.hf import quiet_transformers

    with quiet_transformers():
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    return path


def _inputs(n=4):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, len(SPECIAL) + len(WORDS), (n, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _load(path):
    from transformers import AutoModelForSequenceClassification

    from mudsc_graph.io.hf import quiet_transformers

    with quiet_transformers():
        return AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Directories a (seed 0), a_perm (a with every group permuted), b (seed 1), plus data files."""
    d = tmp_path_factory.mktemp("hf")
    tok = _tokenizer()
    a = _bert(0)
    spec = mudsc_graph.analyze(a, _inputs(2))
    twin = spec.apply_permutation(a, spec.random_permutation(seed=1))
    _save(a, d / "a", tok)
    _save(twin, d / "a_perm", tok)
    _save(_bert(1), d / "b", tok)
    (d / "lines.txt").write_text("\n".join(LABELLED) + "\n", encoding="utf-8")
    (d / "unlabelled.txt").write_text("\n".join(line.split("\t", 1)[1] for line in LABELLED) + "\n", encoding="utf-8")
    ids = _inputs(6)
    torch.save({**ids, "labels": torch.tensor([0, 1, 0, 1, 1, 0])}, d / "tokens.pt")
    return d


def test_merge_a_permuted_copy_gives_it_back_with_tokenizer_and_hashes(hf, tmp_path):
    out = tmp_path / "m"
    r = _run("merge", hf / "a", hf / "a_perm", "--data", hf / "lines.txt", "--out", out, "--method", "mudsc", "--mode", "zip",
             "--samples", "6", "--batch-size", "4", "--json", *FAST)
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["method"] == "mudsc" and summary["mode"] == "zip" and summary["groups_merged"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp directory left beside it
    merged, a = _load(out), _load(hf / "a")
    assert type(merged).__name__ == "BertForSequenceClassification"
    x = _inputs()
    torch.testing.assert_close(merged(**x).logits, a(**x).logits, rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out, local_files_only=True)("the cat")["input_ids"] == [2, 5, 7, 3]
    meta = json.loads((out / "mudsc.json").read_text())
    assert meta["method"] == "mudsc" and meta["mode"] == "zip" and meta["alpha"] == 0.5 and meta["n_models"] == 2
    assert meta["samples"] == 6 and meta["groups_merged"] == 8 and meta["arch"] == "BertForSequenceClassification"
    expected = [hashlib.sha256((hf / name / "model.safetensors").read_bytes()).hexdigest() for name in ("a", "a_perm")]
    assert [s["sha256"] for s in meta["sources"]] == expected and [s["dir"] for s in meta["sources"]] == ["a", "a_perm"]

    ev = _run("eval", out, "--data", hf / "lines.txt", "--json")
    assert ev.exit_code == 0, ev.stderr
    got = json.loads(ev.stdout)
    assert got["samples"] == len(LABELLED) and 0.0 <= got["accuracy"] <= 1.0
    labels = torch.tensor([int(line.split("\t")[0]) for line in LABELLED])
    from mudsc_graph.io.hf import load_text_file

    data = load_text_file(AutoTokenizer.from_pretrained(out, local_files_only=True), hf / "lines.txt")
    with torch.no_grad():
        want = float((merged(**data.inputs).logits.argmax(1) == labels).float().mean())
    assert got["accuracy"] == pytest.approx(want)
    table = _run("eval", out, "--data", hf / "lines.txt", "--tasks", "0/1")
    assert table.exit_code == 0 and "joint" in table.stdout and "mean per task" in table.stdout


def test_merge_other_methods_force_and_token_files(hf, tmp_path):
    out = tmp_path / "m"
    r = _run("merge", hf / "a", hf / "b", "--data", hf / "lines.txt", "--out", out, "--method", "zipit", *FAST)
    assert r.exit_code == 0, r.stderr
    assert "groups merged" in r.stdout and "written" in r.stdout
    assert type(_load(out)).__name__ == "BertForSequenceClassification"
    first = (out / "model.safetensors").read_bytes()
    # no data: weight matching needs none, and BERT has no BatchNorm to reset; --force replaces the merge
    r = _run("merge", hf / "a", hf / "b", "--out", out, "--method", "weight_matching", "--force", *FAST)
    assert r.exit_code == 0, r.stderr
    assert (out / "model.safetensors").read_bytes() != first
    assert json.loads((out / "mudsc.json").read_text())["method"] == "weight_matching"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the replaced directory is gone too
    ev = _run("eval", out, "--data", hf / "tokens.pt", "--json")
    assert ev.exit_code == 0, ev.stderr
    assert json.loads(ev.stdout)["samples"] == 6


def test_inspect_a_directory(hf):
    r = _run("inspect", hf / "a", "--check")
    assert r.exit_code == 0, r.stderr
    assert "merge groups of BertForSequenceClassification" in r.stdout
    assert "9 groups (8 permutable, 1 fixed)" in r.stdout and "self-check passed" in r.stdout
    j = _run("inspect", hf / "a", "--json")
    assert j.exit_code == 0, j.stderr
    spec = json.loads(j.stdout)
    assert len(spec["groups"]) == 9 and any(["classifier.weight", 1] in g["members"] for g in spec["groups"])


@pytest.fixture(scope="module")
def bad(hf, tmp_path_factory):
    """Directories that must be refused, and a checkpoint file to mix with directories."""
    d = tmp_path_factory.mktemp("bad")
    (d / "noconfig").mkdir()
    shutil.copy(hf / "a" / "model.safetensors", d / "noconfig")
    _save(_bert(2, intermediate_size=32), d / "wide", _tokenizer())
    _save(_bert(4, intermediate_size=32, num_hidden_layers=3), d / "deep", _tokenizer())
    _save(_bert(2, num_attention_heads=4), d / "heads4", _tokenizer())
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    roberta = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=64, num_labels=2,
    ))
    _save(roberta, d / "roberta")
    _save(_bert(3), d / "notok")  # no tokenizer files
    torch.save(_bert(0).state_dict(), d / "a.pt")
    return d


@pytest.mark.parametrize(
    "args, needles",
    [
        (["merge", "{h}/a", "bert-base-uncased", "--data", "{h}/lines.txt"], ["bert-base-uncased is not a local directory", "never downloads", "save_pretrained"]),
        (["merge", "{h}/a", "google/bert_uncased_L-2_H-128", "--data", "{h}/lines.txt"], ["google/bert_uncased_L-2_H-128 is not a local directory"]),
        (["eval", "org/name", "--data", "{h}/lines.txt"], ["org/name is not a local directory", "never downloads"]),
        (["inspect", "bert-base-uncased"], ["bert-base-uncased is not a local directory"]),
        (["merge", "{h}/a", "{b}/noconfig", "--data", "{h}/lines.txt"], ["without config.json"]),
        (["inspect", "{b}/noconfig"], ["without config.json"]),
        (["merge", "{h}/a", "{b}/heads4", "--data", "{h}/lines.txt"], ["different architectures", "num_attention_heads"]),
        (["merge", "{h}/a", "{b}/roberta", "--data", "{h}/lines.txt"], ["different architectures", "bert", "roberta"]),
        (["merge", "{h}/a", "{b}/a.pt", "--data", "{h}/lines.txt"], ["mix Hugging Face model directories", "checkpoint files"]),
        (["merge", "{h}/a", "{h}/b", "--data", "{h}/lines.txt", "--stop-at", "bert.encoder"], ["--stop-at", "save_pretrained"]),
        (["merge", "{h}/a", "{h}/b", "--data", "{h}/lines.txt", "--arch", "mlp"], ["--arch does not apply"]),
        (["merge", "{b}/notok", "{h}/a", "--data", "{h}/lines.txt"], ["no tokenizer files", ".pt/.npz"]),
        (["merge", "{h}/a", "{h}/b"], ["needs calibration data", "--data"]),
        (["merge", "{h}/a", "{h}/b", "--data", "{h}/missing.txt"], ["no such file", "text file"]),
        (["merge", "{b}/a.pt", "{b}/a.pt", "--data", "digits"], ["--arch is required"]),
        (["eval", "{h}/a", "--data", "{h}/unlabelled.txt"], ["no labels", "line 1", "LABEL<TAB>"]),
    ],
    ids=[
        "hub-id", "hub-org-name", "eval-hub-id", "inspect-hub-id", "no-config", "inspect-no-config", "other-heads",
        "other-type", "mixed", "stop-at", "arch-with-dirs", "no-tokenizer", "no-data", "missing-data", "files-need-arch", "eval-no-labels",
    ],
)
def test_errors_are_one_line_and_write_nothing(hf, bad, tmp_path, args, needles):
    args = [a.format(h=hf, b=bad) for a in args]
    extra = ["--out", tmp_path / "m", "--quiet"] if args[0] == "merge" else []
    _one_line_error(_run(*args, *extra), *needles)
    assert list(tmp_path.iterdir()) == []  # no output, no temp directory


@pytest.mark.parametrize("other", ["wide", "deep"])
def test_directories_of_other_sizes_and_depths_merge_at_the_first_ones(hf, bad, tmp_path, other):
    """Models of different widths (and depths: 3 layers and a wider MLP against 2): the merged
    directory has the first model's sizes and depth, loads and evaluates."""
    from transformers import AutoConfig

    out = tmp_path / "m"
    r = _run("merge", hf / "a", bad / other, "--data", hf / "lines.txt", "--out", out, "--quiet", "--json")
    assert r.exit_code == 0, r.stderr
    merged, first = AutoConfig.from_pretrained(out), AutoConfig.from_pretrained(hf / "a")
    assert (merged.intermediate_size, merged.num_hidden_layers) == (first.intermediate_size, first.num_hidden_layers) == (24, 2)
    ev = _run("eval", out, "--data", hf / "tokens.pt", "--json")
    assert ev.exit_code == 0, ev.stderr


def test_transformers_missing_is_one_line(hf, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    line = _one_line_error(_run("merge", hf / "a", hf / "b", "--data", hf / "lines.txt", "--out", tmp_path / "m"))
    assert "is a Hugging Face model directory: install transformers (pip install 'mudsc[hf]')" in line
    _one_line_error(_run("inspect", hf / "a"), "install transformers")
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_an_input_or_exists(hf, tmp_path):
    a_files = sorted(p.name for p in (hf / "a").iterdir())
    _one_line_error(_run("merge", hf / "a", hf / "b", "--out", hf / "a", "--force", "--data", hf / "lines.txt"), "is the input")
    link = tmp_path / "link"
    link.symlink_to(hf / "b", target_is_directory=True)
    _one_line_error(_run("merge", hf / "a", hf / "b", "--out", link, "--force", "--data", hf / "lines.txt"), "is the input")
    _one_line_error(_run("merge", hf / "a", hf / "b", "--out", hf, "--force", "--data", hf / "lines.txt"), "contains the input")
    assert sorted(p.name for p in (hf / "a").iterdir()) == a_files
    existing = tmp_path / "m"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    _one_line_error(_run("merge", hf / "a", hf / "b", "--out", existing, "--data", hf / "lines.txt"), "exists", "--force")
    assert [p.name for p in existing.iterdir()] == ["config.json"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    _one_line_error(_run("merge", hf / "a", hf / "b", "--out", other, "--force", "--data", hf / "lines.txt"), "holds no model")
    assert (other / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "m", "notes"]


def test_failed_save_leaves_nothing_and_keeps_the_old_directory(hf, tmp_path, monkeypatch):
    from transformers import BertForSequenceClassification

    from mudsc_graph.io.hf import HFError, save_model_dir

    model = _load(hf / "a")

    def broken(self, path, **kwargs):
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BertForSequenceClassification, "save_pretrained", broken)
    with pytest.raises(HFError, match="No space left"):
        save_model_dir(model, tmp_path / "m", metadata={"method": "average"})
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(HFError):
        save_model_dir(model, old, metadata={}, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "config.json").read_text() == "{}"


def test_text_file_is_padded_to_its_longest_line_and_sampled_by_seed(hf):
    from mudsc_graph.io.hf import load_model_dir, load_model_data

    model = load_model_dir(hf / "a")
    data = load_model_data(model, str(hf / "lines.txt"), max_length=128)
    longest = max(len(line.split("\t")[1].split()) for line in LABELLED) + 2  # a token per word, [CLS] and [SEP]
    assert data.inputs["input_ids"].shape == (len(LABELLED), longest) and data.inputs["input_ids"].dtype == torch.long
    assert int(data.inputs["attention_mask"][0].sum()) == len(LABELLED[0].split("\t")[1].split()) + 2
    assert data.labels.tolist() == [int(line[0]) for line in LABELLED]
    short = load_model_data(model, str(hf / "lines.txt"), max_length=4)
    assert short.inputs["input_ids"].shape[1] == 4
    one = load_model_data(model, str(hf / "lines.txt"), limit=3, seed=1).labels.tolist()
    assert one == load_model_data(model, str(hf / "lines.txt"), limit=3, seed=1).labels.tolist() and len(one) == 3
    batches = data.batches(3)
    assert [len(b["input_ids"]) for b in batches] == [3, 3, 2] and {b["input_ids"].shape[1] for b in batches} == {longest}


def _shell_blocks(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return re.findall(r"^```shell\n(.*?)^```", text, flags=re.S | re.M)


def _run_block(block: str) -> int:
    ran = 0
    for line in block.splitlines():
        words = shlex.split(line.split("#", 1)[0])
        if words[:1] != ["mudsc"]:
            continue
        extra = FAST if words[1] == "merge" else []
        r = _run(*words[1:], *extra)
        assert r.exit_code == 0, (words, r.stderr)
        ran += 1
    return ran


def _prepare_commands_folder(hf: Path, folder: Path) -> None:
    """What the documented commands expect in the current directory: two BERT directories, text and token data."""
    for name in ("a", "b"):
        shutil.copytree(hf / name, folder / f"bert-{name}")
    shutil.copy(hf / "lines.txt", folder / "calib.txt")
    shutil.copy(hf / "lines.txt", folder / "test.txt")
    shutil.copy(hf / "tokens.pt", folder / "tokens.pt")


def test_readme_hugging_face_commands_run(hf, tmp_path, monkeypatch):
    """The README's `shell` block of Hugging Face commands runs as written, on two tiny BERTs."""
    blocks = [b for b in _shell_blocks(ROOT / "README.md") if "mudsc merge" in b]
    assert blocks, "README.md has no shell block of Hugging Face commands"
    _prepare_commands_folder(hf, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert _run_block(blocks[0]) >= 3 and (tmp_path / "bert-merged" / "mudsc.json").is_file()


def test_the_real_models_page_commands_run(hf, tmp_path, monkeypatch):
    """Every command of docs/real-models.md runs as written: Hugging Face directories, then timm checkpoints."""
    timm = pytest.importorskip("timm")
    blocks = _shell_blocks(ROOT / "docs" / "real-models.md")
    assert len(blocks) == 2
    _prepare_commands_folder(hf, tmp_path)
    for seed, name in ((0, "r18-a.pt"), (1, "r18-b.pt")):
        torch.manual_seed(seed)
        torch.save(timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict(), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert sum(_run_block(b) for b in blocks) == 7
    assert _load(tmp_path / "bert-merged") is not None and (tmp_path / "bert-zipit" / "mudsc.json").is_file()
    assert (tmp_path / "r18-merged.pt").is_file()


def test_the_real_models_page_code_runs():
    """The page's Python blocks run as written (a Hugging Face BERT merged with a permuted copy; an LSTM tagger)."""
    text = (ROOT / "docs" / "real-models.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "real-models.md", "exec"), {"__name__": "docs"})
