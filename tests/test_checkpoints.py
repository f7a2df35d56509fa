"""Checkpoint I/O: layouts, safe loading, atomic saving, and fit_state_dict's error messages."""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from mudsc_graph.checks import first_non_finite
from mudsc_graph.io import atomic, checkpoints, paths
from mudsc_graph.io.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from mudsc_graph.io.fitting import fit_state_dict
from mudsc_graph.io.paths import check_output_file, file_sha256
from mudsc_graph.errors import MudscError


def tiny(out: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, out))


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def only_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("name", ["m.pt", "m.pth", "m.safetensors"])
def test_round_trip(tmp_path, name):
    state = tiny().state_dict()
    meta = {"method": "mudsc", "alpha": 0.5, "models": ["a.pt", "b.pt"]}
    out = save_checkpoint(tmp_path / name, state, meta)
    assert out == tmp_path / name and only_files(tmp_path) == [name]
    loaded, got = load_checkpoint(out)
    assert_same(loaded, state)
    assert got == meta
    assert all(t.device.type == "cpu" for t in loaded.values())
    fit_state_dict(tiny(), loaded, source=name)


def test_safetensors_breaks_shared_storage_and_non_contiguous(tmp_path):
    w = torch.randn(5, 4)
    state = {"a": w, "b": w, "c": w.t()}  # shared storage and a non-contiguous view
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "s.safetensors", state, {}))
    assert_same(loaded, {k: v.contiguous() for k, v in state.items()})


def test_safetensors_foreign_metadata_kept(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "f.safetensors"), metadata={"format": "pt"})
    _, meta = load_checkpoint(tmp_path / "f.safetensors")
    assert meta == {"format": "pt"}


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "module"])
def test_nested_layouts(tmp_path, key):
    state = tiny().state_dict()
    torch.save({key: state, "epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "n.ckpt")
    loaded, meta = load_checkpoint(tmp_path / "n.ckpt")
    assert_same(loaded, state)
    assert meta == {}


def test_first_nested_dict_of_tensors_wins(tmp_path):
    state = tiny().state_dict()
    torch.save({"model": {"name": "resnet20"}, "state_dict": state}, tmp_path / "n.pt")
    assert_same(load_checkpoint(tmp_path / "n.pt")[0], state)


def test_dataparallel_prefix_stripped(tmp_path):
    state = tiny().state_dict()
    torch.save(OrderedDict((f"module.{k}", v) for k, v in state.items()), tmp_path / "dp.bin")
    assert_same(load_checkpoint(tmp_path / "dp.bin")[0], state)


def test_partial_module_prefix_kept(tmp_path):
    torch.save({"module.a": torch.ones(1), "b": torch.ones(1)}, tmp_path / "p.pt")
    assert set(load_checkpoint(tmp_path / "p.pt")[0]) == {"module.a", "b"}


def test_full_pickled_module_needs_trust(tmp_path):
    model = tiny()
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "full.pt")
    msg = str(err.value)
    assert "--trust-pickle" in msg and "trust_pickle=True" in msg and "full.pt" in msg
    assert "torch.nn.modules.container.Sequential" in msg and "\n" not in msg
    loaded, _ = load_checkpoint(tmp_path / "full.pt", trust_pickle=True)
    assert_same(loaded, model.state_dict())


def test_error_is_a_mudsc_error():
    assert issubclass(CheckpointError, MudscError)


@pytest.mark.parametrize("payload", [b"", b"this is not a checkpoint" * 20, b"PK\x03\x04" + bytes(100)])
@pytest.mark.parametrize("name", ["g.pt", "g.safetensors"])
def test_garbage_file(tmp_path, payload, name):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"^cannot read .*g\.\w+ as a checkpoint: ") as err:
        load_checkpoint(tmp_path / name)
    assert "\n" not in str(err.value)


def test_garbage_file_with_trust_pickle(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"this is not a checkpoint" * 20)
    with pytest.raises(CheckpointError, match="cannot read .* as a checkpoint"):
        load_checkpoint(tmp_path / "g.pt", trust_pickle=True)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file: .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no such file: .*directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        file_sha256(tmp_path / "nope.pt")


def test_non_tensor_entry_named(tmp_path):
    torch.save({"w": torch.ones(2), "epoch": 3}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="'epoch' is a int, not a tensor"):
        load_checkpoint(tmp_path / "x.pt")


def test_not_a_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "l.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_checkpoint(tmp_path / "l.pt")


def test_wrong_extension(tmp_path):
    with pytest.raises(CheckpointError, match=r"'\.bin'.*\.safetensors or \.pt"):
        save_checkpoint(tmp_path / "m.bin", tiny().state_dict(), {})
    assert only_files(tmp_path) == []


def test_missing_parent_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "m.pt", tiny().state_dict(), {})


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="not JSON"):
        save_checkpoint(tmp_path / "m.pt", tiny().state_dict(), {"x": object()})
    assert only_files(tmp_path) == []


@pytest.mark.parametrize("name", ["m.pt", "m.safetensors"])
def test_existing_output_needs_force(tmp_path, name):
    target = tmp_path / name
    target.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="exists; pass --force to overwrite"):
        save_checkpoint(target, tiny().state_dict(), {})
    assert target.read_bytes() == b"precious"
    save_checkpoint(target, tiny().state_dict(), {"v": 2}, force=True)
    assert load_checkpoint(target)[1] == {"v": 2}
    assert only_files(tmp_path) == [name]


@pytest.mark.parametrize(
    ("name", "attr", "exc", "expected"),
    [
        ("m.pt", "torch.save", RuntimeError("boom"), RuntimeError),
        ("m.pt", "torch.save", OSError(28, "No space left on device"), CheckpointError),
        ("m.safetensors", "safetensors.torch.save", RuntimeError("boom"), RuntimeError),
        ("m.safetensors", "safetensors.torch.save", OSError(28, "No space left on device"), CheckpointError),
    ],
)
@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_save_leaves_nothing(tmp_path, monkeypatch, name, attr, exc, expected, existing):
    target = tmp_path / name
    if existing:
        target.write_bytes(b"old")

    def failing(obj, f=None, *args, **kwargs):
        if hasattr(f, "write"):  # torch.save gets the temp file's writer
            f.write(b"partial")
        raise exc

    monkeypatch.setattr(attr, failing)
    with pytest.raises(expected):
        save_checkpoint(target, tiny().state_dict(), {}, force=True)
    assert only_files(tmp_path) == ([name] if existing else [])
    if existing:
        assert target.read_bytes() == b"old"


def test_fit_missing_and_unexpected_keys():
    model = tiny()
    state = {f"extra{i}": torch.ones(1) for i in range(5)}
    state.update({k: v for k, v in model.state_dict().items() if not k.startswith("3.")})
    with pytest.raises(CheckpointError) as err:
        fit_state_dict(model, state, source="a.pt")
    msg = str(err.value)
    assert msg.startswith("a.pt does not fit the architecture: missing keys [3.weight, 3.bias] (2)")
    assert "unexpected keys [extra0, extra1, extra2, ...] (5)" in msg
    assert msg.endswith("check --arch / --arch-opt")


def test_fit_only_missing():
    state = dict(tiny().state_dict())
    del state["0.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \[0.weight\] \(1\); check") as err:
        fit_state_dict(tiny(), state)
    assert "unexpected" not in str(err.value)


def test_fit_shape_mismatch():
    with pytest.raises(
        CheckpointError,
        match=r"^b.pt: 3.weight has shape \(10, 5\) but the architecture expects \(3, 5\); check --arch-opt \(e.g. num_classes\)$",
    ):
        fit_state_dict(tiny(3), tiny(10).state_dict(), source="b.pt")


def test_fit_rejects_non_finite():
    model = tiny()
    for bad in (float("nan"), float("inf")):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["1.running_var"][2] = bad
        with pytest.raises(CheckpointError, match=r"^c.pt: 1.running_var contains NaN or inf values"):
            fit_state_dict(tiny(), state, source="c.pt")


def test_fit_loads_values():
    src, dst = tiny(), nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    fit_state_dict(dst, src.state_dict())
    assert_same(dst.state_dict(), src.state_dict())


def test_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CHUNK", 7)  # exercise the streaming loop
    data = bytes(range(256)) * 3
    (tmp_path / "f.bin").write_bytes(data)
    assert file_sha256(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
    (tmp_path / "e.bin").write_bytes(b"")
    assert file_sha256(tmp_path / "e.bin") == hashlib.sha256(b"").hexdigest()


# --------------------------------------------------------------------------- dtypes (issue 5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_fit_refuses_a_non_float_tensor_where_the_model_has_floats(dtype):
    state = {k: v.clone() for k, v in tiny().state_dict().items()}
    state["0.weight"] = state["0.weight"].to(dtype)
    with pytest.raises(CheckpointError, match=rf"^c\.pt: 0\.weight is {dtype} .*torch\.float32") as err:
        fit_state_dict(tiny(), state, source="c.pt")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float32, torch.bool])
def test_fit_refuses_another_kind_for_an_integer_buffer(dtype):
    state = {k: v.clone() for k, v in tiny().state_dict().items()}
    state["1.num_batches_tracked"] = state["1.num_batches_tracked"].to(dtype)
    with pytest.raises(CheckpointError, match=rf"1\.num_batches_tracked is {dtype} .*torch\.int64"):
        fit_state_dict(tiny(), state, source="c.pt")


class _WithIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("position_ids", torch.arange(4, dtype=torch.int32))


def test_fit_keeps_integer_buffers_and_half_precision():
    src = _WithIds()
    src.bn.num_batches_tracked.fill_(7)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["bn.num_batches_tracked"] = state["bn.num_batches_tracked"].to(torch.int32)  # another int width: fine
    state["position_ids"] = state["position_ids"].to(torch.int64)
    state["fc.weight"] = state["fc.weight"].half()  # another float width: fine
    dst = _WithIds()
    fit_state_dict(dst, state)
    assert int(dst.bn.num_batches_tracked) == 7 and dst.position_ids.dtype == torch.int32
    assert torch.equal(dst.position_ids, torch.arange(4, dtype=torch.int32))
    torch.testing.assert_close(dst.fc.weight, src.fc.weight.half().float())


def test_fit_refuses_floats_that_overflow_the_models_dtype():
    state = {k: v.clone() for k, v in tiny().state_dict().items()}
    state["0.bias"] = state["0.bias"].double()
    state["0.bias"][1] = 1e300  # finite in float64, inf in float32
    with pytest.raises(CheckpointError, match=r"^c\.pt: 0\.bias .*too large for torch\.float32"):
        fit_state_dict(tiny(), state, source="c.pt")


def test_fit_refuses_integers_out_of_the_buffers_range():
    state = {k: v.clone() for k, v in _WithIds().state_dict().items()}
    state["position_ids"] = torch.tensor([0, 1, 2, 2**40])
    with pytest.raises(CheckpointError, match=r"position_ids .*out of the range of torch\.int32"):
        fit_state_dict(_WithIds(), state, source="c.pt")


def _edit_safetensors_header(path, old: bytes, new: bytes) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n]
    assert old in header and len(old) == len(new)
    path.write_bytes(raw[:8] + header.replace(old, new) + raw[8 + n :])


def test_safetensors_header_with_an_edited_dtype_is_refused(tmp_path):
    """F32 -> I32 keeps the byte size, so the file is valid; the weights would be ~1e9 integers."""
    from safetensors.torch import save_file

    p = tmp_path / "w.safetensors"
    save_file(dict(tiny().state_dict()), str(p))
    _edit_safetensors_header(p, b'"F32"', b'"I32"')
    state, _ = load_checkpoint(p)
    with pytest.raises(CheckpointError, match=r"w\.safetensors: 0\.weight is torch\.int32 .*torch\.float32"):
        fit_state_dict(tiny(), state, source="w.safetensors")


# --------------------------------------------------------------------------- layouts (issue 19)


def _odd_tensor(kind: str) -> torch.Tensor:
    import warnings

    w = torch.randn(5, 4)
    with warnings.catch_warnings():  # beta / prototype / deprecation warnings of the odd layouts
        warnings.simplefilter("ignore")
        return {
            "sparse_coo": lambda: w.to_sparse(),
            "sparse_csr": lambda: w.to_sparse_csr(),
            "meta": lambda: torch.empty(5, 4, device="meta"),
            "quantized": lambda: torch.quantize_per_tensor(w, 0.1, 0, torch.qint8),
            "nested": lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
        }[kind]()


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "meta", "quantized", "nested"])
def test_load_refuses_tensors_that_are_not_dense(tmp_path, kind):
    state = dict(tiny().state_dict())
    state["0.weight"] = _odd_tensor(kind)
    torch.save(state, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=r"s\.pt: 0\.weight is a .*; ") as err:
        load_checkpoint(tmp_path / "s.pt")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- reading (issues 8, 24)


def test_read_checkpoint_hashes_exactly_the_bytes_it_loaded(tmp_path, monkeypatch):
    """The file is read once; replacing it after that changes neither the state nor the hash."""
    p = tmp_path / "a.pt"
    torch.save(tiny().state_dict(), p)
    original = p.read_bytes()
    real_load = torch.load

    def load_then_replace(f, *args, **kwargs):
        p.write_bytes(b"replaced while loading")
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load_then_replace)
    ck = checkpoints.read_checkpoint(p)
    assert ck.sha256 == hashlib.sha256(original).hexdigest() and ck.size == len(original)
    assert_same(ck.state, tiny().state_dict())


def _zip_cut(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def _zip_flip(raw: bytes) -> bytes:
    """Flip bytes inside the first tensor's data (not a zip header): only the checksum can tell."""
    import io
    import struct
    import zipfile

    info = next(i for i in zipfile.ZipFile(io.BytesIO(raw)).infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return raw[:start] + bytes(b ^ 0xFF for b in raw[start : start + 16]) + raw[start + 16 :]


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        ("text", ["not a checkpoint file", "torch.save", "safetensors"]),
        ("zip_cut", ["truncated or corrupt"]),
        ("zip_flip", ["truncated or corrupt", "checksum"]),
        ("legacy_cut", ["truncated or corrupt"]),
        ("st_cut", ["truncated or corrupt"]),
        ("st_header", ["truncated or corrupt", "header"]),
        ("empty", ["empty"]),
    ],
)
def test_unreadable_files_say_what_is_wrong(tmp_path, make, needles):
    state = tiny().state_dict()
    name = "f.safetensors" if make.startswith("st_") else "f.pt"
    p = tmp_path / name
    if make == "text":
        p.write_text("hello world, this is a text file\n")
    elif make == "empty":
        p.write_bytes(b"")
    elif make.startswith("zip_"):
        torch.save(state, p)
        p.write_bytes((_zip_cut if make == "zip_cut" else _zip_flip)(p.read_bytes()))
    elif make == "legacy_cut":
        torch.save(state, p, _use_new_zipfile_serialization=False)
        p.write_bytes(_zip_cut(p.read_bytes()))
    else:
        from safetensors.torch import save_file

        save_file(dict(state), str(p))
        if make == "st_cut":
            p.write_bytes(_zip_cut(p.read_bytes()))
        else:
            _edit_safetensors_header(p, b'"shape"', b'"shape!')
    with pytest.raises(CheckpointError, match=rf"^cannot read .*{name} as a checkpoint: ") as err:
        load_checkpoint(p)
    msg = str(err.value)
    assert "\n" not in msg and "Errno" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_a_safetensors_name_must_hold_safetensors(tmp_path):
    """--trust-pickle must never unpickle a file that calls itself .safetensors."""
    torch.save(tiny().state_dict(), tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=r"x\.safetensors as a checkpoint: it is not a safetensors file but a zip archive \(torch\.save\).*rename it to \.pt"):
        load_checkpoint(tmp_path / "x.safetensors", trust_pickle=True)


def test_safetensors_content_under_a_pt_name_loads(tmp_path):
    from safetensors.torch import save_file

    save_file(dict(tiny().state_dict()), str(tmp_path / "renamed.pt"))
    assert_same(load_checkpoint(tmp_path / "renamed.pt")[0], tiny().state_dict())


def test_special_files_are_refused_without_blocking(tmp_path):
    import os
    import time

    os.mkfifo(tmp_path / "fifo.pt")
    os.symlink("loop.pt", tmp_path / "loop.pt")
    os.symlink("nowhere.pt", tmp_path / "dangling.pt")
    cases = {
        "fifo.pt": "not a regular file",
        "loop.pt": "loop of symbolic links",
        "dangling.pt": "symbolic link to nowhere.pt, which does not exist",
    }
    for name, needle in cases.items():
        start = time.monotonic()
        with pytest.raises(CheckpointError, match=needle):
            load_checkpoint(tmp_path / name)
        assert time.monotonic() - start < 2
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint("/dev/zero")


# --------------------------------------------------------------------------- the output path (issues 1, 24)


def _out_is_input_cases(tmp_path, monkeypatch):
    import os

    src = tmp_path / "b.pt"
    torch.save(tiny().state_dict(), src)
    os.symlink(src, tmp_path / "link.pt")
    os.link(src, tmp_path / "hard.pt")
    monkeypatch.chdir(tmp_path)
    return src, {"same": src, "dot": Path("./b.pt"), "dotdot": tmp_path / "x" / ".." / "b.pt", "symlink": tmp_path / "link.pt", "hardlink": tmp_path / "hard.pt"}


@pytest.mark.parametrize("case", ["same", "dot", "dotdot", "symlink", "hardlink"])
def test_output_that_is_an_input_is_refused_even_with_force(tmp_path, monkeypatch, case):
    (tmp_path / "x").mkdir()
    src, outs = _out_is_input_cases(tmp_path, monkeypatch)
    before = src.read_bytes()
    with pytest.raises(CheckpointError, match=r"is the input .*b\.pt.*somewhere else"):
        check_output_file(outs[case], force=True, inputs=[src])
    with pytest.raises(CheckpointError, match=r"is the input"):
        save_checkpoint(outs[case], tiny(10).state_dict(), {}, force=True, inputs=[src])
    assert src.read_bytes() == before


@pytest.mark.parametrize(
    ("out", "needle"),
    [
        ("a.pt/m.pt", "a.pt is a file, not a directory"),
        ("a.pt/sub/m.pt", "a.pt is a file, not a directory"),
        ("missing/m.pt", "directory missing does not exist; create it first"),
        ("x" * 300 + ".pt", "longer than the 255 bytes"),
        ("adir.pt", "is a directory"),
        ("fifo.pt", "not a regular file"),
        ("m.bin", "'.bin'"),
    ],
)
def test_bad_output_paths_are_refused_up_front(tmp_path, monkeypatch, out, needle):
    import os

    monkeypatch.chdir(tmp_path)
    torch.save(tiny().state_dict(), "a.pt")
    os.mkdir("adir.pt")
    os.mkfifo("fifo.pt")
    before = only_files(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(needle)) as err:
        check_output_file(Path(out), force=True)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        save_checkpoint(Path(out), tiny().state_dict(), {}, force=True)
    assert only_files(tmp_path) == before


def test_unwritable_directory_is_refused_up_front(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="cannot write into"):
            check_output_file(d / "m.pt")
    finally:
        d.chmod(0o755)


def test_a_long_file_name_that_the_file_system_allows_is_saved(tmp_path):
    """The temp name must not be what fails: 251 + '.pt' = 254 bytes fits NAME_MAX (255)."""
    name = "x" * 251 + ".pt"
    save_checkpoint(tmp_path / name, tiny().state_dict(), {})
    assert only_files(tmp_path) == [name]


# --------------------------------------------------------------------------- saving (issues 12, 23, 26, 4)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_saving_is_byte_reproducible(tmp_path, suffix):
    import zipfile

    state = tiny().state_dict()
    meta = {"b": 1, "a": [0.5, 0.25], "nested": {"z": None, "y": "s"}}
    one = save_checkpoint(tmp_path / f"one{suffix}", state, meta)
    two = save_checkpoint(tmp_path / f"two{suffix}", dict(state), dict(meta))
    assert one.read_bytes() == two.read_bytes()
    if suffix == ".pt":
        assert {n.split("/")[0] for n in zipfile.ZipFile(one).namelist()} == {"archive"}


@pytest.mark.parametrize("name", ["m.pt", "m.safetensors"])
@pytest.mark.parametrize("code", [28, 27, 122])  # ENOSPC, EFBIG, EDQUOT
def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path, monkeypatch, name, code):
    import errno as errno_mod
    import os

    target = tmp_path / name
    target.write_bytes(b"old")
    real_write = os.write
    written = [0]

    def write(fd, data):
        if written[0] > 100:
            raise OSError(code, os.strerror(code))
        written[0] += 50
        return real_write(fd, data[:50])  # short writes too

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(CheckpointError, match=rf"^cannot write .*{name}: {os.strerror(code)}") as err:
        save_checkpoint(target, tiny().state_dict(), {}, force=True)
    assert errno_mod.errorcode[code] in str(err.value) or "space" in str(err.value) or "limit" in str(err.value)
    assert only_files(tmp_path) == [name] and target.read_bytes() == b"old"


def test_sigterm_during_the_save_cleans_up_and_restores_the_handler(tmp_path, monkeypatch):
    import os
    import signal

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by someone else here")
    died = []

    class Died(Exception):
        pass

    def fake_die(signum):
        died.append((signum, signal.getsignal(signum)))
        raise Died

    monkeypatch.setattr(atomic, "_die_by_signal", fake_die)

    def save_then_terminated(obj, f, *args, **kwargs):
        f.write(b"partial")
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs at the next bytecode
            pass
        raise AssertionError("SIGTERM did not interrupt the save")

    monkeypatch.setattr(torch, "save", save_then_terminated)
    target = tmp_path / "m.pt"
    target.write_bytes(b"old")
    with pytest.raises(Died):
        save_checkpoint(target, tiny().state_dict(), {}, force=True)
    assert died == [(signal.SIGTERM, signal.SIG_DFL)]  # the default is back before it is re-delivered
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert only_files(tmp_path) == ["m.pt"] and target.read_bytes() == b"old"


def test_check_finite_names_the_first_bad_key():
    state = {k: v.clone() for k, v in tiny().state_dict().items()}
    assert first_non_finite(state) is None
    state["3.bias"][0] = float("inf")
    state["1.running_var"][0] = float("nan")
    assert first_non_finite(state) == "1.running_var"
