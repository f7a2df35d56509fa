"""`mudsc merge` and `mudsc eval` end to end, and every error path: one line, exit 1, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mudsc_cli.app import app
from mudsc_graph import analyze, get_registry

ARCH = ["--arch", "mlp", "--arch-opt", "hidden=(24, 16)", "--arch-opt", "bias=True"]
runner = CliRunner()


def _mlp(seed):
    torch.manual_seed(seed)
    return get_registry().architecture("mlp").build(hidden=(24, 16), bias=True).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    a = _mlp(0)
    x = (torch.randn(2, 1, 28, 28),)
    spec = analyze(a, x)
    twin = spec.apply_permutation(a, spec.random_permutation(5))
    torch.save(a.state_dict(), d / "a.pt")
    torch.save({"state_dict": twin.state_dict()}, d / "a_perm.pt")  # a nested layout
    torch.save(_mlp(1).state_dict(), d / "b.pt")
    return d


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, *needles):
    """One ``error:`` line and nothing else wrong: exit 1 for a refused input, 2 for a usage error
    (fewer than two checkpoints is one, like a missing argument)."""
    usage = any("at least two" in n for n in needles)
    assert result.exit_code == (2 if usage else 1), result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for n in needles:
        assert n in errors[0], errors[0]


def test_merge_a_permuted_copy_and_evaluate(ckpts, tmp_path):
    out = tmp_path / "merged.pt"
    r = _run("merge", ckpts / "a.pt", ckpts / "a_perm.pt", *ARCH, "--data", "digits", "--samples", "200", "--out", out, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["method"] == "mudsc" and summary["groups_merged"] == 2 and out.exists()
    from mudsc_graph.io.checkpoints import load_checkpoint

    state, meta = load_checkpoint(out)
    assert meta["arch"] == "mlp" and meta["method"] == "mudsc" and meta["alpha"] == 0.5
    assert [s["file"] for s in meta["sources"]] == ["a.pt", "a_perm.pt"] and len(meta["sources"][0]["sha256"]) == 64
    # merging a model with a permuted copy gives it back (BatchNorm-free, so exactly)
    a = _mlp(0)
    merged = _mlp(0)
    merged.load_state_dict(state)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(merged(x), a(x), rtol=1e-4, atol=1e-4)
    ev = _run("eval", out, *ARCH, "--data", "digits", "--json")
    assert ev.exit_code == 0, ev.output
    assert 0.0 <= json.loads(ev.output)["accuracy"] <= 1.0


def test_merge_with_tasks_safetensors_and_table(ckpts, tmp_path):
    out = tmp_path / "merged.safetensors"
    r = _run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, "--data", "digits", "--method", "zipit", "--samples", "100", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert "groups merged" in r.output and "written" in r.output
    ev = _run("eval", out, *ARCH, "--data", "digits", "--tasks", "0-4/5-9", "--json")
    m = json.loads(ev.output)
    assert ev.exit_code == 0 and len(m["per_task"]) == 2 and 0 <= m["joint"] <= 1


def test_merge_with_repair_records_it_and_changes_the_merge(ckpts, tmp_path):
    from mudsc_graph.io.checkpoints import load_checkpoint

    outs = {}
    for flag in ("--repair", "--no-repair"):
        outs[flag] = tmp_path / f"{flag}.pt"
        r = _run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, "--data", "digits", "--method", "zipit", "--samples", "100",
                 flag, "--out", outs[flag], "--quiet", "--json")
        assert r.exit_code == 0, r.output
        ratio = json.loads(r.output)["repair_std_ratio"]
        assert (0 < ratio < 1) if flag == "--repair" else ratio is None  # merging lost variance; REPAIR measured it
    (repaired, meta), (plain, _) = load_checkpoint(outs["--repair"]), load_checkpoint(outs["--no-repair"])
    assert meta["repair"] is True and 0 < meta["repair_std_ratio"] < 1
    assert not torch.equal(repaired["layers.0.weight"], plain["layers.0.weight"])
    _one_line_error(_run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, "--method", "weight_matching", "--no-reset-bn", "--repair",
                         "--out", tmp_path / "x.pt"), "--repair needs calibration data")


@pytest.mark.parametrize("tracer", ["auto", "export"])
def test_partial_zip_checkpoint_evaluates_with_one_head_per_task(ckpts, tmp_path, tracer):
    """The partial model is rebuilt at eval time by the same analysis (same tracer, same node names)."""
    out = tmp_path / "partial.pt"
    r = _run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, "--data", "digits", "--stop-at", "layers.1", "--samples", "100",
             "--tracer", tracer, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    ev = _run("eval", out, *ARCH, "--data", "digits", "--tasks", "0-4/5-9", "--json")
    assert ev.exit_code == 0, ev.output
    assert len(json.loads(ev.output)["per_task"]) == 2
    _one_line_error(_run("eval", out, *ARCH, "--data", "digits"), "--tasks")


def test_existing_output_needs_force_and_is_untouched(ckpts, tmp_path):
    out = tmp_path / "merged.pt"
    out.write_bytes(b"keep me")
    _one_line_error(_run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, "--data", "digits", "--out", out), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    r = _run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, "--method", "weight_matching", "--no-reset-bn", "--out", out, "--force", "--quiet")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() != b"keep me"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["merge", "{d}/missing.pt", "{d}/b.pt", *ARCH, "--data", "digits"], ["no such file", "missing.pt"]),
        (["merge", "{d}/a.pt", "{d}/b.pt", "--arch", "mpl", "--data", "digits"], ["unknown architecture", "did you mean"]),
        (["merge", "{d}/a.pt", "{d}/b.pt", "--arch", "mlp", "--data", "digits"], ["does not fit", "missing keys"]),
        (["merge", "{d}/a.pt", "{d}/b.pt", "--arch", "resnet20", "--data", "digits"], ["does not fit"]),
        (["merge", "{d}/a.pt", "{d}/b.pt", *ARCH, "--data", "digitz"], ["unknown dataset", "digits"]),
        (["merge", "{d}/a.pt", "{d}/b.pt", *ARCH, "--data", "digits:0-12"], ["class"]),
        (["merge", "{d}/a.pt", "{d}/b.pt", *ARCH], ["needs calibration data", "--data"]),
        (["merge", "{d}/a.pt", *ARCH, "--data", "digits"], ["at least two"]),
        (["merge", "{d}/a.pt", "{d}/b.pt", *ARCH, "--data", "digits", "--method", "magic"], ["unknown --method"]),
        (["merge", "{d}/nan.pt", "{d}/b.pt", *ARCH, "--data", "digits"], ["NaN"]),
        (["merge", "{d}/pickled.pt", "{d}/b.pt", *ARCH, "--data", "digits"], ["--trust-pickle"]),
        (["merge", "{d}/untr.pt", "{d}/untr.pt", "--arch", "tests.test_cli_merge:untraceable", "--input-shape", "1,28,28", "--data", "digits"], ["cannot trace", "x.sum()"]),
        (["merge", "{d}/a.pt", "{d}/b.pt", *ARCH, "--data", "digits", "--stop-at", "layerz"], ["stop point"]),
    ],
    ids=["missing", "unknown-arch", "keys", "other-arch", "bad-data", "bad-classes", "no-data", "one-model", "method", "nan", "pickle", "untraceable", "stop-at"],
)
def test_merge_errors_are_one_line_and_write_nothing(ckpts, tmp_path, args, needles):
    bad = _mlp(2).state_dict()
    bad["layers.0.weight"][0, 0] = float("nan")
    torch.save(bad, ckpts / "nan.pt")
    torch.save(_mlp(3), ckpts / "pickled.pt")  # a whole pickled module
    torch.save(untraceable().state_dict(), ckpts / "untr.pt")
    out = tmp_path / "out.pt"
    _one_line_error(_run(*[a.format(d=ckpts) for a in args], "--out", out, "--quiet"), *needles)
    assert list(tmp_path.iterdir()) == []  # no partial output, no temp file


def test_trust_pickle_loads_a_pickled_module(ckpts, tmp_path):
    torch.save(_mlp(3), ckpts / "pickled.pt")
    out = tmp_path / "m.pt"
    r = _run("merge", ckpts / "pickled.pt", ckpts / "b.pt", *ARCH, "--method", "weight_matching", "--no-reset-bn", "--trust-pickle", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output


def test_debug_shows_the_traceback(ckpts, tmp_path, monkeypatch):
    monkeypatch.setenv("MUDSC_DEBUG", "1")
    r = _run("merge", ckpts / "missing.pt", ckpts / "b.pt", *ARCH, "--data", "digits", "--out", tmp_path / "o.pt")
    assert r.exit_code != 0 and r.exception is not None


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(784, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x.flatten(1))
        return self.fc(-x.flatten(1))


def untraceable():
    """Factory of a model that torch.fx cannot trace (used by the error test)."""
    return _Untraceable()


# --------------------------------------------------------------------------- the output path is checked before any work (issues 1, 24)

FAST = ["--method", "weight_matching", "--no-reset-bn", "--quiet"]


@pytest.fixture
def no_merge(monkeypatch):
    """Fail the test if the merge starts: the output path must be refused before any work."""
    import mudsc_graph

    def merge(*args, **kwargs):
        raise AssertionError("the merge ran before the output path was checked")

    monkeypatch.setattr(mudsc_graph, "merge", merge)


def _snapshot(directory):
    import os

    return {p.name: (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p) if p.is_symlink() else None)
            for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("case", ["same", "dot", "symlink", "hardlink", "data"])
def test_output_that_is_an_input_is_refused_even_with_force(ckpts, tmp_path, monkeypatch, no_merge, case):
    import os
    import shutil

    shutil.copy(ckpts / "a.pt", tmp_path / "a.pt")
    shutil.copy(ckpts / "b.pt", tmp_path / "b.pt")
    torch.save({"x": torch.rand(20, 1, 28, 28), "y": torch.arange(20) % 10}, tmp_path / "calib.pt")
    os.symlink("b.pt", tmp_path / "link.pt")
    os.link(tmp_path / "b.pt", tmp_path / "hard.pt")
    monkeypatch.chdir(tmp_path)
    out = {"same": "b.pt", "dot": "./b.pt", "symlink": "link.pt", "hardlink": "hard.pt", "data": "calib.pt"}[case]
    before = _snapshot(tmp_path)
    extra = ["--method", "zipit", "--data", "calib.pt", "--quiet"] if case == "data" else FAST
    r = _run("merge", "a.pt", "b.pt", *ARCH, *extra, "--force", "--out", out)
    _one_line_error(r, "--out", "is the input", "somewhere else")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("out", "needles"),
    [
        ("{d}/a.pt/m.pt", ["a.pt is a file, not a directory"]),
        ("{t}/missing/m.pt", ["does not exist", "create it first"]),
        ("{t}/" + "m" * 300 + ".pt", ["longer than the", "shorter name"]),
        ("{t}", ["is a directory"]),
        ("{t}/m.bin", [".safetensors", ".pt"]),
    ],
    ids=["parent-is-a-file", "no-parent", "name-too-long", "a-directory", "suffix"],
)
def test_bad_output_paths_are_refused_before_the_merge(ckpts, tmp_path, no_merge, out, needles):
    before = _snapshot(ckpts), _snapshot(tmp_path)
    r = _run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, *FAST, "--force", "--out", out.format(d=ckpts, t=tmp_path))
    _one_line_error(r, "--out", *needles)
    assert (_snapshot(ckpts), _snapshot(tmp_path)) == before


# --------------------------------------------------------------------------- what is recorded and written (issues 8, 26, 4)


def test_source_hashes_are_of_the_bytes_that_were_merged(ckpts, tmp_path, monkeypatch):
    """A source replaced during the merge must not be recorded with the new file's hash."""
    import hashlib
    import shutil

    import mudsc_graph

    shutil.copy(ckpts / "a.pt", tmp_path / "a.pt")
    original = (tmp_path / "a.pt").read_bytes()
    real_merge = mudsc_graph.merge

    def merge_while_replacing(*args, **kwargs):
        shutil.copy(ckpts / "b.pt", tmp_path / "a.pt")  # someone replaces the file during the merge
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(mudsc_graph, "merge", merge_while_replacing)
    out = tmp_path / "m.pt"
    r = _run("merge", tmp_path / "a.pt", ckpts / "b.pt", *ARCH, *FAST, "--out", out)
    assert r.exit_code == 0, r.output
    from mudsc_graph.io.checkpoints import load_checkpoint

    sources = load_checkpoint(out)[1]["sources"]
    assert sources[0]["sha256"] == hashlib.sha256(original).hexdigest()
    assert sources[1]["sha256"] == hashlib.sha256((ckpts / "b.pt").read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_the_same_merge_twice_gives_the_same_bytes(ckpts, tmp_path, suffix):
    outs = [tmp_path / f"one{suffix}", tmp_path / f"two{suffix}"]
    for out in outs:
        r = _run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, "--data", "digits", "--samples", "100", "--out", out, "--quiet")
        assert r.exit_code == 0, r.output
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_a_non_finite_merged_model_is_not_written(ckpts, tmp_path, monkeypatch):
    import mudsc_graph

    real_merge = mudsc_graph.merge

    def poisoned(*args, **kwargs):  # what NaN calibration data does to BatchNorm statistics
        result = real_merge(*args, **kwargs)
        with torch.no_grad():
            result.model.head.bias[0] = float("nan")
        return result

    monkeypatch.setattr(mudsc_graph, "merge", poisoned)
    r = _run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, *FAST, "--out", tmp_path / "m.pt")
    _one_line_error(r, "head.bias", "NaN or inf", "calibration data")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- what is loaded (issues 5, 19)


def test_an_edited_safetensors_dtype_is_refused(ckpts, tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "a.safetensors"
    save_file(torch.load(ckpts / "a.pt"), str(p))
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    p.write_bytes(raw[:8] + raw[8 : 8 + n].replace(b'"F32"', b'"I32"') + raw[8 + n :])
    out = tmp_path / "m.pt"
    _one_line_error(_run("merge", p, ckpts / "b.pt", *ARCH, *FAST, "--out", out), "a.safetensors", "torch.int32", "torch.float32")
    _one_line_error(_run("eval", p, *ARCH, "--data", "digits"), "a.safetensors", "torch.int32", "torch.float32")
    assert not out.exists()


def test_a_sparse_tensor_is_refused_at_load(ckpts, tmp_path):
    state = torch.load(ckpts / "a.pt")
    state["layers.0.weight"] = state["layers.0.weight"].to_sparse()
    torch.save(state, tmp_path / "sparse.pt")
    _one_line_error(_run("merge", tmp_path / "sparse.pt", ckpts / "b.pt", *ARCH, *FAST, "--out", tmp_path / "m.pt"), "layers.0.weight", "sparse", "to_dense")
    assert not (tmp_path / "m.pt").exists()


def test_the_seed_picks_the_calibration_samples(ckpts, tmp_path):
    """Defect 10: the same merge with another --seed reads other samples (so its merged weights differ)."""
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"m{seed}.safetensors"
        r = _run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, "--data", "digits", "--samples", "40", "--method", "zipit",
                 "--seed", str(seed), "--out", out, "--quiet")
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    assert outs[0] != outs[1]


# --------------------------------------------------------------------------- several inputs per sample (issue 27)


class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.m, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x, mem):
        return self.b(torch.relu(self.a(x) + self.m(mem)))


def two_inputs():
    """Factory of a model with two inputs, ``forward(x, mem)``."""
    return _TwoInputs()


@pytest.mark.parametrize("fmt", ["pt", "npz"])
def test_several_inputs_from_a_data_file(tmp_path, fmt):
    """A data file names each input after the forward's parameters (a dict under x, or x.NAME arrays):
    a merge of a model with a permuted copy of itself comes back, and eval reads the same file."""
    import numpy as np

    torch.manual_seed(0)
    a = two_inputs().eval()
    x, mem = torch.randn(40, 8), torch.randn(40, 8)
    spec = analyze(a, {"x": x[:2], "mem": mem[:2]})
    assert spec.permutable_units == 16
    twin = spec.apply_permutation(a, spec.random_permutation(3))
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(twin.state_dict(), tmp_path / "t.pt")
    y = torch.arange(40) % 4
    data = tmp_path / f"pairs.{fmt}"
    if fmt == "pt":
        torch.save({"x": {"x": x, "mem": mem}, "y": y}, data)
    else:
        np.savez(data, **{"x.x": x.numpy(), "x.mem": mem.numpy(), "y": y.numpy()})
    out = tmp_path / "m.pt"
    arch = ["--arch", "tests.test_cli_merge:two_inputs"]
    r = _run("merge", tmp_path / "a.pt", tmp_path / "t.pt", *arch, "--data", data, "--out", out, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    from mudsc_graph.io.checkpoints import load_checkpoint

    state, meta = load_checkpoint(out)
    assert meta["samples"] == 40 and json.loads(r.output)["groups_merged"] == 1
    merged = two_inputs().eval()
    merged.load_state_dict(state)
    torch.testing.assert_close(merged(x, mem), a(x, mem), rtol=1e-4, atol=1e-5)
    r = _run("eval", out, *arch, "--data", data, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["samples"] == 40


@pytest.mark.parametrize("content, needle", [
    ({"x": {"x": torch.randn(4, 8)}, "y": torch.zeros(5, dtype=torch.long)}, "x.x has 4 rows but y has 5 labels"),
    ({"x": {"x": torch.randn(4, 8)}}, "no 'y'"),
    ({"x": {}, "y": torch.zeros(4, dtype=torch.long)}, "empty dict"),
    ({"x": {"not a name": torch.randn(4, 8)}, "y": torch.zeros(4, dtype=torch.long)}, "not a Python identifier"),
    ({"x": {"x": torch.full((4, 8), float("nan"))}, "y": torch.zeros(4, dtype=torch.long)}, "x.x has NaN or inf"),
    ({"x": torch.randn(4, 8), "x.mem": torch.randn(4, 8), "y": torch.zeros(4, dtype=torch.long)}, "both 'x' and inputs named"),
])
def test_several_inputs_bad_files(tmp_path, content, needle):
    torch.save(two_inputs().state_dict(), tmp_path / "a.pt")
    torch.save(content, tmp_path / "bad.pt")
    r = _run("merge", tmp_path / "a.pt", tmp_path / "a.pt", "--arch", "tests.test_cli_merge:two_inputs", "--data", tmp_path / "bad.pt",
             "--out", tmp_path / "m.pt", "--quiet")
    _one_line_error(r, needle)
    assert not (tmp_path / "m.pt").exists()


def test_data_is_asked_for_only_when_the_merge_reads_it(ckpts, tmp_path):
    """One pipeline for files and directories: a data-free method merges a model without BatchNorm
    with no --data (the default --reset-bn has nothing to reset); a model with BatchNorm needs --data
    for the reset, said in one line before anything is written."""
    out = tmp_path / "m.pt"
    r = _run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, "--method", "weight_matching", "--out", out, "--quiet")
    assert r.exit_code == 0 and out.exists(), r.output
    torch.manual_seed(0)
    bn = [get_registry().architecture("resnet20").build(width=1, num_classes=10) for _ in range(2)]
    for k, m in enumerate(bn):
        torch.save(m.state_dict(), tmp_path / f"r{k}.pt")
    out_bn = tmp_path / "r.pt"
    _one_line_error(_run("merge", tmp_path / "r0.pt", tmp_path / "r1.pt", "--arch", "resnet20", "--arch-opt", "width=1",
                         "--method", "weight_matching", "--out", out_bn), "resetting BatchNorm statistics needs calibration data", "--no-reset-bn")
    assert not out_bn.exists()


def test_refit_is_recorded_and_reported(ckpts, tmp_path):
    from mudsc_graph.io.checkpoints import load_checkpoint

    out = tmp_path / "refit.pt"
    r = _run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, "--data", "digits", "--samples", "100", "--refit", "--out", out, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    before, after = json.loads(r.output)["refit_residual"]
    assert 0 <= after < before
    state, meta = load_checkpoint(out)
    assert meta["refit"] is True and meta["refit_residual"] == [before, after]
    _one_line_error(_run("merge", ckpts / "a.pt", ckpts / "b.pt", *ARCH, "--method", "weight_matching", "--no-reset-bn", "--refit",
                         "--out", tmp_path / "x.pt"), "--refit needs calibration data")
