"""The newer surfaces under hostile input (issue 28): Hugging Face model directories, text and token
data, output paths, concurrent writers. Every case is a one-line reproduction of a defect that was
found: each must end in one clear line (exit 1), write nothing and leave every input as it was, or
(for what is legal) give the right result.

Memory and time bombs run in a subprocess whose peak RSS is measured (no wall-clock assert: a
timeout only guards against a hang).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import mudsc_graph  # noqa: E402,F401  (first: torchvision compat)

try:
    from test_cli_hf import LABELLED, _bert, _inputs, _one_line_error, _run, _save, _tokenizer
except ImportError:  # tests/ collected as a package
    from tests.test_cli_hf import LABELLED, _bert, _inputs, _one_line_error, _run, _save, _tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _tree(path: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``path`` (to show that nothing changed)."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dirs")
    tok = _tokenizer()
    _save(_bert(0), d / "a", tok)
    _save(_bert(1), d / "b", tok)
    (d / "lines.txt").write_text("\n".join(LABELLED) + "\n", encoding="utf-8")
    return d


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_changes)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _rewrite_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    save_file(edit(state), path / "model.safetensors", metadata={"format": "pt"})


MERGE = ["--method", "weight_matching", "--max-iter", "2", "--quiet"]


# --------------------------------------------------------------------------- 1. an input is never written


@pytest.mark.parametrize("target", ["a/config.json", "b/tokenizer.json", "a/merged", "a/sub/merged"])
def test_an_output_inside_an_input_is_refused_even_with_force(dirs, target):
    before = {n: _tree(dirs / n) for n in ("a", "b")}
    r = _run("merge", dirs / "a", dirs / "b", "--data", dirs / "lines.txt", "--out", dirs / target, "--force", *MERGE)
    _one_line_error(r, "inside the input directory")
    assert {n: _tree(dirs / n) for n in ("a", "b")} == before


# --------------------------------------------------------------------------- 2, 3. memory bombs end in one line, quickly


#: Runs ``mudsc`` and reports its own peak memory (VmHWM, of this process image only: a child's
#: ru_maxrss would count the parent's pages it was forked with).
_CHILD = ("import atexit, runpy, sys\n"
          "def peak():\n"
          "    kb = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
          "    print('mudsc-peak-kb', kb, file=sys.stderr, flush=True)\n"
          "atexit.register(peak)\n"
          "sys.argv = ['mudsc', *sys.argv[1:]]\n"
          "runpy.run_module('mudsc_cli', run_name='__main__')\n")


def _peak(args: list, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``mudsc ARGS`` in a child; its result and its peak RSS in GiB. The timeout only guards
    against a hang, it asserts no speed."""
    r = subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    kb = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("mudsc-peak-kb")]
    return r, (kb[-1] if kb else float("inf")) / 2**20


@pytest.mark.parametrize("change, needle", [
    ({"num_hidden_layers": 1_000_000}, "more than"),
    ({"num_labels": 100_000_000}, "num_labels"),
    ({"hidden_size": 10**10, "num_attention_heads": 1}, "more than"),
    ({"vocab_size": 10**9}, "more than"),
])
def test_a_config_that_describes_a_huge_model_is_refused_before_it_is_built(dirs, tmp_path, change, needle):
    bomb = _copy(dirs / "a", tmp_path / "bomb", **change)
    r, gib = _peak(["inspect", bomb, "--check"])
    assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert gib < 1.5, f"refusing it took {gib:.1f} GiB"


def test_a_huge_line_of_text_is_cut_before_the_tokenizer(dirs, tmp_path):
    data = tmp_path / "huge.txt"
    with open(data, "w", encoding="utf-8") as f:
        f.write("0\t" + "cat " * 25_000_000 + "\n")  # one 100 MB line
        f.write("\n".join(LABELLED) + "\n")
    r, gib = _peak(["merge", dirs / "a", dirs / "b", "--data", data, "--out", tmp_path / "m", "--samples", "9", *MERGE])
    assert r.returncode == 0, r.stderr[-2000:]
    assert gib < 2.5, f"{gib:.1f} GiB"


def test_only_the_sampled_lines_are_read(dirs, tmp_path):
    from mudsc_graph.io.hf import read_text_file

    data = tmp_path / "many.txt"
    data.write_text("".join(f"{i % 2}\tline {i}\n" for i in range(2000)), encoding="utf-8")
    texts, labels, _ = read_text_file(data, limit=5, seed=3)
    order = torch.randperm(2000, generator=torch.Generator().manual_seed(3))[:5].tolist()
    assert texts == [f"line {i}" for i in order] and labels == [i % 2 for i in order]


# --------------------------------------------------------------------------- 4, 6. weights that do not fit are refused


def _add_layer(state):
    extra = {k.replace("layer.1.", "layer.2."): v.clone() for k, v in state.items() if "layer.1." in k}
    return {**state, **extra}


@pytest.mark.parametrize("case, needle", [
    ("extra tensors", "has no place for"),
    ("base class", "has no place for"),
    ("no layers", "has no place for"),
    ("negative layers", "disagree"),
    ("int32", "stored as I32"),
    ("inf", "NaN or inf"),
])
def test_weights_that_do_not_fit_are_refused(dirs, tmp_path, case, needle):
    bad = tmp_path / "bad"
    if case == "extra tensors":
        _rewrite_weights(_copy(dirs / "b", bad), _add_layer)
    elif case == "base class":
        _copy(dirs / "b", bad, architectures=["BertModel"])
    elif case in ("no layers", "negative layers"):
        _copy(dirs / "b", bad, num_hidden_layers=0 if case == "no layers" else -1)
    elif case == "int32":
        _rewrite_weights(_copy(dirs / "b", bad), lambda s: {k: (v * 100).to(torch.int32) if "query.weight" in k else v for k, v in s.items()})
    else:
        _rewrite_weights(_copy(dirs / "b", bad), lambda s: {k: v.clone().fill_(float("inf")) if "query.weight" in k else v for k, v in s.items()})
    r = _run("merge", dirs / "a", bad, "--data", dirs / "lines.txt", "--out", tmp_path / "m", *MERGE)
    _one_line_error(r, needle)
    assert not (tmp_path / "m").exists()
    r = _run("eval", bad, "--data", dirs / "lines.txt")
    _one_line_error(r, needle)


def test_a_shard_index_with_a_bad_weight_map_is_one_line(dirs, tmp_path):
    bad = _copy(dirs / "a", tmp_path / "sharded")
    (bad / "model.safetensors").rename(bad / "model-00001-of-00001.safetensors")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"bert.pooler.dense.bias": 7}}))
    _one_line_error(_run("inspect", bad), "weight_map")


# --------------------------------------------------------------------------- 7. models that differ are not merged silently


def test_configs_that_differ_are_refused(dirs, tmp_path):
    other = _copy(dirs / "b", tmp_path / "eps", layer_norm_eps=1e-3)
    r = _run("merge", dirs / "a", other, "--data", dirs / "lines.txt", "--out", tmp_path / "m", *MERGE)
    _one_line_error(r, "layer_norm_eps")


def test_the_library_refuses_models_whose_configs_differ():
    from mudsc_graph import merge
    from mudsc_graph.merging.options import MergeError

    for change in ({"num_attention_heads": 4}, {"hidden_act": "relu"}):
        with pytest.raises(MergeError, match="config"):
            merge([_bert(0), _bert(1, **change)], data=None, example_inputs=_inputs(2), method="weight_matching")


# --------------------------------------------------------------------------- 9, 12. data read as what it says


def test_labels_and_masks_are_read_as_written(dirs, tmp_path):
    arabic = tmp_path / "arabic.txt"
    arabic.write_text("\u0661\tthe cat\n0\ta dog\n", encoding="utf-8")  # '١' is not the label 1
    from mudsc_graph.io.hf import read_text_file

    assert read_text_file(arabic)[1] is None
    huge = tmp_path / "huge_label.txt"
    huge.write_text(f"{10**26}\tthe cat\n0\ta dog\n", encoding="utf-8")
    _one_line_error(_run("eval", dirs / "a", "--data", huge), "too large")
    ids = _inputs(2)["input_ids"]
    for labels, needle in (([10**26, 0], "within int64"), (torch.tensor([10**7, 0]), "too large")):
        torch.save({"input_ids": ids, "labels": labels}, tmp_path / "big.pt")
        _one_line_error(_run("eval", dirs / "a", "--data", tmp_path / "big.pt"), needle)
    ids = _inputs(4)
    for value in (5, -7):
        mask = ids["attention_mask"].clone()
        mask[0, 0] = value
        torch.save({"input_ids": ids["input_ids"], "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])}, tmp_path / "t.pt")
        _one_line_error(_run("eval", dirs / "a", "--data", tmp_path / "t.pt"), "attention_mask")


# --------------------------------------------------------------------------- 8. outputs: races, special files, other people's files


def test_a_second_writer_to_one_new_name_does_not_replace_the_first(dirs, tmp_path, monkeypatch):
    """The output appears (another merge's) while this one saves: this one fails, the other stays."""
    import mudsc_graph.io.checkpoints as ck
    import mudsc_graph.io.hf as hf

    out = tmp_path / "m"
    real = hf._fsync_tree

    def other_writer_first(root):
        real(root)
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(hf, "_fsync_tree", other_writer_first)
    _one_line_error(_run("merge", dirs / "a", dirs / "b", "--data", dirs / "lines.txt", "--out", out, *MERGE), "created by someone else")
    assert (out / "config.json").read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["m"]

    from mudsc_graph.io.checkpoints import save_checkpoint

    target = tmp_path / "m.pt"
    real_serialise = ck._serialise

    def other_file_first(writer, suffix, state, meta):
        real_serialise(writer, suffix, state, meta)
        target.write_bytes(b"theirs")

    monkeypatch.setattr(ck, "_serialise", other_file_first)
    with pytest.raises(ck.CheckpointError, match="created by someone else"):
        save_checkpoint(target, {"w": torch.zeros(2)}, {})
    assert target.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.pt"]


def test_force_never_replaces_special_files_or_other_peoples_files(dirs, tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _one_line_error(_run("merge", dirs / "a", dirs / "b", "--data", dirs / "lines.txt", "--out", fifo, "--force", *MERGE), "FIFO")
    assert fifo.exists() and not fifo.is_dir()
    old = _copy(dirs / "b", tmp_path / "old")
    (old / "notes.txt").write_text("mine")
    _one_line_error(_run("merge", dirs / "a", dirs / "b", "--data", dirs / "lines.txt", "--out", old, "--force", *MERGE), "notes.txt")
    assert (old / "notes.txt").read_text() == "mine"
    (old / "notes.txt").unlink()
    r = _run("merge", dirs / "a", dirs / "b", "--data", dirs / "lines.txt", "--out", old, "--force", *MERGE)
    assert r.exit_code == 0 and (old / "mudsc.json").is_file()


def test_models_without_values_are_refused_in_one_line():
    from mudsc_graph import merge
    from mudsc_graph.merging.options import MergeError

    with torch.device("meta"):
        ghosts = [torch.nn.Linear(4, 4) for _ in range(2)]
    with pytest.raises(MergeError, match="meta device"):
        merge(ghosts, data=None, example_inputs=(torch.randn(2, 4),), method="weight_matching")
