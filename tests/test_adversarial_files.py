"""Adversarial inputs for every command that reads a checkpoint file (``mudsc merge``, ``mudsc eval``).

Every case must end in one ``error:`` line and exit code 1 (no traceback), within a few seconds,
with the inputs byte for byte unchanged and nothing written next to the output: malicious
pickles (their code must not run without ``--trust-pickle``), corrupt and truncated files of each
format, empty files, directories, FIFOs (never waited on), symlink loops and dangling links,
integer/boolean/complex/sparse/meta tensors, NaN/inf weights, an output that is an input. A full
disk (``RLIMIT_FSIZE``) and SIGTERM/SIGINT during the save run in subprocesses, started together
because each one pays for importing torch.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mudsc_cli.app import app
from mudsc_graph import get_registry

ARCH = ["--arch", "mlp", "--arch-opt", "hidden=(24, 16)", "--arch-opt", "bias=True"]
FAST = ["--method", "weight_matching", "--no-reset-bn", "--quiet"]
SECONDS = 10  # "a few seconds", with room for a loaded machine
runner = CliRunner()


class Evil:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _mlp(seed: int):
    torch.manual_seed(seed)
    return get_registry().architecture("mlp").build(hidden=(24, 16), bias=True).eval()


def _safetensors_bytes(state) -> bytes:
    from safetensors.torch import save

    return save(dict(state))


def _edit_header(raw: bytes, old: bytes, new: bytes) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n]
    assert old in header and len(old) == len(new)
    return raw[:8] + header.replace(old, new, 1) + raw[8 + n :]


def _flip_tensor_data(raw: bytes) -> bytes:
    info = next(i for i in zipfile.ZipFile(io.BytesIO(raw)).infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return raw[:start] + bytes(b ^ 0xFF for b in raw[start : start + 16]) + raw[start + 16 :]


def _npz_bytes() -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(3))
    return buf.getvalue()


def _torchscript_bytes() -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(_mlp(0)), buf)
    return buf.getvalue()


def _pt_bytes(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _with(state, key, value):
    out = {k: v.clone() for k, v in state.items()}
    out[key] = value
    return out


@pytest.fixture(scope="module")
def adv(tmp_path_factory):
    """The inputs directory: good a.pt/b.pt, a tiny labelled data file, and every bad file."""
    import warnings

    d = tmp_path_factory.mktemp("inputs")
    marker = tmp_path_factory.mktemp("marker") / "PWNED"
    good = _mlp(0).state_dict()
    w = "layers.0.weight"
    torch.save(good, d / "a.pt")
    torch.save(_mlp(1).state_dict(), d / "b.pt")
    torch.save({"x": torch.rand(8, 1, 28, 28), "y": torch.arange(8)}, d / "data.pt")
    zip_pt = (d / "a.pt").read_bytes()
    legacy = _pt_bytes(good, _use_new_zipfile_serialization=False)
    st = _safetensors_bytes(good)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = {
            "evil_raw.pt": pickle.dumps(Evil(marker)),  # pickle.dump output, protocol 4
            "evil_raw2.pt": pickle.dumps({w: Evil(marker)}, protocol=2),
            "evil_zip.pt": _pt_bytes({**good, "extra": Evil(marker)}),
            "evil_legacy.pth": _pt_bytes({**good, "extra": Evil(marker)}, _use_new_zipfile_serialization=False),
            "evil_nested.ckpt": _pt_bytes({"state_dict": good, "optimizer": Evil(marker)}),
            "text.pt": b"hello world, this is not a checkpoint\n" * 3,
            "zip_cut.pt": zip_pt[: len(zip_pt) // 2],
            "zip_flip.pt": _flip_tensor_data(zip_pt),
            "zip_head.pt": zip_pt[:4] + bytes(60) + zip_pt[64:],
            "legacy_cut.pt": legacy[: len(legacy) // 2],
            "legacy_head.pt": legacy[:2] + b"\xff" * 20 + legacy[22:],
            "st_cut.safetensors": st[: len(st) // 2],
            "st_header.safetensors": _edit_header(st, b'"shape"', b'"shape!'),
            "st_offsets.safetensors": _edit_header(st, b'"data_offsets":[0,', b'"data_offsets":[1,'),
            "st_hugelen.safetensors": (2**60).to_bytes(8, "little") + st[8:],
            "st_i32.safetensors": _edit_header(st, b'"F32"', b'"I32"'),
            "empty.pt": b"",
            "npz.pt": _npz_bytes(),
            "torchscript.pt": _torchscript_bytes(),
            "pt_as.safetensors": zip_pt,
            "int.pt": _pt_bytes(_with(good, w, good[w].to(torch.int32))),
            "bool.pt": _pt_bytes(_with(good, w, good[w] > 0)),
            "complex.pt": _pt_bytes(_with(good, w, good[w].to(torch.complex64))),
            "sparse.pt": _pt_bytes(_with(good, w, good[w].to_sparse())),
            "csr.pt": _pt_bytes(_with(good, w, good[w].to_sparse_csr())),
            "meta.pt": _pt_bytes(_with(good, w, torch.empty(good[w].shape, device="meta"))),
            "nan.pt": _pt_bytes(_with(good, w, torch.full_like(good[w], float("nan")))),
            "inf.pt": _pt_bytes(_with(good, "head.bias", torch.full_like(good["head.bias"], float("-inf")))),
            "f64_huge.pt": _pt_bytes(_with(good, w, torch.full(good[w].shape, 1e300, dtype=torch.float64))),
            "shape.pt": _pt_bytes(_with(good, w, torch.zeros(3, 3))),
            "a_list.pt": _pt_bytes([good[w]]),
            "no_tensors.pt": _pt_bytes({}),
            "bad_meta.pt": _pt_bytes({"state_dict": good, "mudsc": {"stop_at": "layers.0", "n_models": 10**6}}),
        }
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "adir.pt").mkdir()
    os.mkfifo(d / "fifo.pt")
    os.symlink("loop.pt", d / "loop.pt")
    os.symlink("nowhere.pt", d / "dangling.pt")
    return d, marker


def _snapshot(directory: Path) -> dict:
    """Every entry of a directory: the bytes of a regular file, else what it is (a FIFO is never read)."""
    out = {}
    for p in sorted(directory.iterdir()):
        st = os.lstat(p)
        if p.is_symlink():
            out[p.name] = ("link", os.readlink(p))
        elif p.is_file() and not p.is_fifo():
            out[p.name] = p.read_bytes()
        else:
            out[p.name] = ("other", st.st_mode)
    return out


@contextmanager
def _fifo_unblocker(fifo: Path, after: float = SECONDS):
    """If a reader is still blocked on ``fifo`` after ``after`` seconds, open it for writing so the test fails instead of hanging."""
    stop = threading.Event()

    def poke():
        if stop.wait(after):
            return
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only when a reader waits
            os.write(fd, b"x")
            os.close(fd)
        except OSError:
            pass

    t = threading.Thread(target=poke, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def _refused(args, dirs, *needles):
    """Run the CLI; assert one error line with ``needles``, exit 1, no traceback, fast, ``dirs`` unchanged."""
    before = [_snapshot(d) for d in dirs]
    start = time.monotonic()
    fifo = dirs[0] / "fifo.pt"
    with _fifo_unblocker(fifo) if fifo.exists() else nullcontext():
        r = runner.invoke(app, [str(a) for a in args])
    elapsed = time.monotonic() - start
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # not an exception the app did not turn into a line
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    assert [_snapshot(d) for d in dirs] == before
    return errors[0]


CASES = {
    "evil_raw.pt": ["--trust-pickle"],
    "evil_raw2.pt": ["--trust-pickle", "exec"],
    "evil_zip.pt": ["--trust-pickle", "exec"],
    "evil_legacy.pth": ["--trust-pickle", "exec"],
    "evil_nested.ckpt": ["--trust-pickle", "exec"],
    "text.pt": ["not a checkpoint file", "torch.save", ".safetensors"],
    "zip_cut.pt": ["truncated or corrupt", "cut short"],
    "zip_flip.pt": ["truncated or corrupt", "checksum"],
    "zip_head.pt": ["truncated or corrupt"],
    "legacy_cut.pt": ["truncated or corrupt"],
    "legacy_head.pt": ["legacy_head.pt"],
    "st_cut.safetensors": ["truncated or corrupt"],
    "st_header.safetensors": ["truncated or corrupt", "header"],
    "st_offsets.safetensors": ["truncated or corrupt"],
    "st_hugelen.safetensors": ["not a safetensors file"],
    "st_i32.safetensors": ["head.bias", "torch.int32", "torch.float32"],  # the first tensor in the file
    "empty.pt": ["empty"],
    "npz.pt": ["zip archive but not one torch.save writes"],
    "torchscript.pt": ["TorchScript", "state_dict"],
    "pt_as.safetensors": ["not a safetensors file", "rename it to .pt"],
    "int.pt": ["layers.0.weight", "torch.int32", "torch.float32"],
    "bool.pt": ["layers.0.weight", "torch.bool", "torch.float32"],
    "complex.pt": ["layers.0.weight", "torch.complex64", "torch.float32"],
    "sparse.pt": ["layers.0.weight", "sparse", "to_dense"],
    "csr.pt": ["layers.0.weight", "sparse", "to_dense"],
    "meta.pt": ["layers.0.weight", "meta tensor"],
    "nan.pt": ["layers.0.weight", "NaN or inf"],
    "inf.pt": ["head.bias", "NaN or inf"],
    "f64_huge.pt": ["layers.0.weight", "too large for torch.float32"],
    "shape.pt": ["layers.0.weight", "shape"],
    "a_list.pt": ["not a state dict"],
    "no_tensors.pt": ["no tensors"],
    "bad_meta.pt": ["metadata is corrupt", "n_models"],
    "adir.pt": ["adir.pt"],
    "fifo.pt": ["FIFO", "not a regular file"],
    "loop.pt": ["loop of symbolic links"],
    "dangling.pt": ["symbolic link to nowhere.pt", "does not exist"],
    "/dev/zero": ["character device", "not a regular file"],
    "missing.pt": ["no such file"],
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("command", ["merge", "eval"])
def test_a_bad_checkpoint_is_one_error_line(adv, tmp_path, command, name):
    d, marker = adv
    bad = Path(name) if name.startswith("/") else d / name
    if command == "merge":
        args = ["merge", bad, d / "b.pt", *ARCH, *FAST, "--out", tmp_path / "out.pt"]
    else:
        args = ["eval", bad, *ARCH, "--data", d / "data.pt"]
    needles = CASES[name]
    if name == "adir.pt":  # a directory beside a file, or a directory with --arch: both say so
        needles = ["adir.pt" if command == "merge" else "--arch"]
    _refused(args, [d, tmp_path], *needles)
    assert not marker.exists(), "a pickle's code ran without --trust-pickle"


def test_trust_pickle_never_unpickles_a_safetensors_name(adv, tmp_path):
    """--trust-pickle is for the whole command; a file that calls itself .safetensors must still not run code."""
    d, marker = adv
    (tmp_path / "evil.safetensors").write_bytes((d / "evil_zip.pt").read_bytes())
    args = ["merge", tmp_path / "evil.safetensors", d / "b.pt", *ARCH, *FAST, "--trust-pickle", "--out", tmp_path / "out.pt"]
    _refused(args, [d, tmp_path], "not a safetensors file")
    assert not marker.exists()


def test_malicious_calibration_data_does_not_run(adv, tmp_path):
    d, marker = adv
    (tmp_path / "calib.pt").write_bytes((d / "evil_zip.pt").read_bytes())
    _refused(["merge", d / "a.pt", d / "b.pt", *ARCH, "--data", tmp_path / "calib.pt", "--quiet", "--out", tmp_path / "o.pt"], [d, tmp_path])
    assert not marker.exists()


@pytest.mark.parametrize("out", ["b.pt", "./b.pt", "hard.pt", "link.pt", "data.pt"])
def test_an_output_that_is_an_input_is_refused(adv, tmp_path, monkeypatch, out):
    d, _ = adv
    work = tmp_path / "work"
    work.mkdir()
    for name in ("a.pt", "b.pt", "data.pt"):
        (work / name).write_bytes((d / name).read_bytes())
    os.link(work / "b.pt", work / "hard.pt")
    os.symlink("b.pt", work / "link.pt")
    monkeypatch.chdir(work)
    _refused(["merge", "a.pt", "b.pt", *ARCH, "--method", "zipit", "--data", "data.pt", "--quiet", "--force", "--out", out], [work],
             "is the input", "somewhere else")


def test_eval_of_a_partial_checkpoint_that_does_not_fit(adv, tmp_path):
    """Metadata that calls a whole model's state a partial zip: one line, not load_state_dict's RuntimeError."""
    d, _ = adv
    good = torch.load(d / "a.pt")
    torch.save({"state_dict": good, "mudsc": {"stop_at": "layers.0", "n_models": 2}}, tmp_path / "p.pt")
    _refused(["eval", tmp_path / "p.pt", *ARCH, "--data", d / "data.pt", "--tasks", "0-4/5-9"], [tmp_path, d], "p.pt")


# --------------------------------------------------------------------------- a full disk and signals, in subprocesses

DRIVER = r"""
import os, signal, sys, time

signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
signal.signal(signal.SIGTERM, signal.SIG_DFL)
mode = sys.argv[1]
if mode == "full":
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))  # a full disk for any file past 40 kB
elif mode == "slow":
    import safetensors.torch
    import torch

    real_pt, real_st = torch.save, safetensors.torch.save

    def slow_pt(obj, f, *args, **kwargs):
        f.write(b"partial" * 1000)
        f.flush()
        time.sleep(60)
        return real_pt(obj, f, *args, **kwargs)

    def slow_st(*args, **kwargs):
        time.sleep(60)
        return real_st(*args, **kwargs)

    torch.save, safetensors.torch.save = slow_pt, slow_st
from mudsc_cli.app import main

main(sys.argv[2:])
"""

#: name: (driver mode, output name, an existing --force target?, signal to send once the temp file exists)
SCENARIOS = {
    "full-pt": ("full", "out.pt", True, None),
    "full-safetensors": ("full", "out.safetensors", False, None),
    "sigterm-pt": ("slow", "out.pt", True, signal.SIGTERM),
    "sigint-safetensors": ("slow", "out.safetensors", False, signal.SIGINT),
}


@pytest.fixture(scope="module")
def processes(adv, tmp_path_factory):
    """Start every scenario at once; signal each slow one when its temp file appears; collect the results."""
    d, _ = adv
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "MUDSC_DEBUG": ""}
    inputs_before = _snapshot(d)
    running = {}
    logs = tmp_path_factory.mktemp("logs")  # files, not pipes: nothing can block on a full pipe
    for name, (mode, out_name, existing, sig) in SCENARIOS.items():
        out_dir = tmp_path_factory.mktemp(name)
        if existing:
            (out_dir / out_name).write_bytes(b"the old model")
        args = ["merge", d / "a.pt", d / "b.pt", *ARCH, *FAST, "--force", "--out", out_dir / out_name]
        with open(logs / f"{name}.out", "w") as stdout, open(logs / f"{name}.err", "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-c", DRIVER, mode, *map(str, args)], env=env, stdout=stdout, stderr=stderr)
        running[name] = {"proc": proc, "dir": out_dir, "out": out_dir / out_name, "existing": existing, "sig": sig,
                         "signalled": None, "log": logs / name}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(r["proc"].poll() is None for r in running.values()):
        for r in running.values():
            waiting = r["sig"] is not None and r["signalled"] is None and r["proc"].poll() is None
            if waiting and any(p.name.endswith(".tmp") for p in r["dir"].iterdir()):
                time.sleep(0.2)  # let the writer get into its sleep
                r["proc"].send_signal(r["sig"])
                r["signalled"] = time.monotonic()
        time.sleep(0.05)
    for r in running.values():
        if r["proc"].poll() is None:
            r["proc"].kill()
        r["rc"] = r["proc"].wait()
        r["stdout"] = r["log"].with_suffix(".out").read_text()
        r["stderr"] = r["log"].with_suffix(".err").read_text()
        r["after_signal"] = time.monotonic() - r["signalled"] if r["signalled"] else None
    assert _snapshot(d) == inputs_before
    return running


def _left_clean(r) -> None:
    left = sorted(p.name for p in r["dir"].iterdir())
    if r["existing"]:
        assert left == [r["out"].name] and r["out"].read_bytes() == b"the old model", left
    else:
        assert left == [], left


@pytest.mark.parametrize("name", ["full-pt", "full-safetensors"])
def test_a_full_disk_is_one_error_line_and_leaves_nothing(processes, name):
    r = processes[name]
    assert r["rc"] == 1, (r["rc"], r["stderr"])
    errors = [ln for ln in r["stderr"].splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r["stderr"], r["stderr"]
    assert "File too large (EFBIG)" in errors[0] and "ulimit -f" in errors[0], errors[0]
    _left_clean(r)


def test_sigterm_during_the_save_leaves_no_temp_file(processes):
    r = processes["sigterm-pt"]
    assert r["signalled"] is not None, ("the save never started", r["stderr"])
    assert r["rc"] == -signal.SIGTERM, (r["rc"], r["stderr"])  # still dies of the signal, after cleaning up
    assert "Traceback" not in r["stderr"], r["stderr"]
    assert r["after_signal"] < SECONDS
    _left_clean(r)


def test_sigint_during_the_save_leaves_no_temp_file(processes):
    r = processes["sigint-safetensors"]
    assert r["signalled"] is not None, ("the save never started", r["stderr"])
    assert r["rc"] == 130, (r["rc"], r["stderr"])  # typer's exit code for Ctrl-C
    assert "Traceback" not in r["stderr"], r["stderr"]
    assert r["after_signal"] < SECONDS
    _left_clean(r)
