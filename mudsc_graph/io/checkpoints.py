"""Reading and writing model checkpoints safely: ``.safetensors`` and ``.pt``/``.pth``/``.bin``/``.ckpt``.

Loading never runs pickled code unless asked: ``torch.load(..., weights_only=True)`` refuses
pickled Python objects (a whole ``nn.Module``, a custom class) with a :class:`CheckpointError`
that names the offending global and points at ``--trust-pickle`` (``trust_pickle=True``). A file
is read once, into memory, and both hashed and loaded from those bytes (so the recorded SHA-256 is
that of what was loaded); its format comes from its content (a zip archive, a legacy pickle or
safetensors), except that a ``.safetensors`` name must hold safetensors, so ``--trust-pickle`` never
unpickles it. FIFOs, devices, symlink loops, truncated and corrupt files (zip checksums are
verified), sparse, quantized, nested and meta tensors are refused with one line that says what is
wrong. :func:`fit_state_dict` also refuses a tensor of another dtype kind than the model's (an
integer, boolean or complex tensor where the model has floats, ...), and values that a cast to the
model's dtype would turn into inf.

Saving is atomic and reproducible: the output path is checked first (:func:`check_output_file`:
extension, never one of the inputs, the directory exists and is writable, the name fits the file
system); the data go to a temp file in the target directory (through a file object, so that the
zip archive inside a ``.pt`` has the fixed root ``archive/`` and the same state gives the same
bytes), ``fsync``, ``os.replace``. A failure (a full disk, a quota, ``ulimit -f``), Ctrl-C, SIGTERM or
SIGHUP leaves neither a partial output nor the temp file behind, and an existing target untouched.

    >>> state, meta = load_checkpoint("a.pt")        # flat, {"state_dict": ...}, {"model": ...}, ...
    >>> ck = read_checkpoint("a.pt")                 # the same, with the SHA-256 of the bytes loaded
    >>> fit_state_dict(model, state, source="a.pt")  # strict, with a readable error on mismatch
    >>> save_checkpoint("merged.safetensors", model.state_dict(), {"method": "mudsc"}, inputs=["a.pt"])
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import secrets
import signal
import stat
import threading
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import first_non_finite  # noqa: F401  (re-exported: checkpoints are checked with it)
from ..errors import MudscError

#: Keys under which other tools nest a state dict, tried in this order.
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
#: The metadata key of our own files (a dict in ``.pt``, a JSON string in ``.safetensors``).
META_KEY = "mudsc"
SAVE_SUFFIXES = (".safetensors", ".pt", ".pth")
#: What a checkpoint file may be, for the messages.
FORMATS = "a torch.save file (.pt, .pth, .bin, .ckpt) or a .safetensors file"
_CHUNK = 1 << 20
#: safetensors refuses headers larger than this; a larger "length" is not a safetensors file.
_MAX_SAFETENSORS_HEADER = 100_000_000


class CheckpointError(MudscError):
    """A checkpoint file is missing, unreadable, unsafe to unpickle, or does not fit the model."""


# --------------------------------------------------------------------------- reading


def _describe_mode(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a special file"


def _stat_error(p: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return f"cannot read {p}: it is a loop of symbolic links; pass the checkpoint file itself"
    if exc.errno == errno.ENOENT and os.path.islink(p):
        return f"no such file: {p} is a symbolic link to {os.readlink(p)}, which does not exist; fix the link or pass the file itself"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"no such file: {p}; check the path"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot read {p}: permission denied; check the file's permissions"
    return f"cannot read {p}: {exc.strerror or exc}"


def _check_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as an existing regular file (symbolic links followed), else one clear error; it is not opened."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise CheckpointError(_stat_error(p, exc)) from exc
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"no such file: {p} (it is a directory); pass the checkpoint file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"cannot read {p}: it is {_describe_mode(st.st_mode)}, not a regular file; pass {FORMATS}")
    return p


def read_file(path: str | os.PathLike[str]) -> tuple[Path, bytes]:
    """The whole content of a regular file. Opened non-blocking and checked again after opening,
    so a FIFO or device (even one swapped in after the first check) is refused, never waited on."""
    p = _check_file(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(_stat_error(p, exc)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"cannot read {p}: it is {_describe_mode(st.st_mode)}, not a regular file; pass {FORMATS}")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    except MemoryError as exc:
        raise CheckpointError(f"cannot read {p}: it is too large ({st.st_size} bytes) to load into memory") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {p}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return p, data


def _sniff(data: bytes) -> str | None:
    """``"zip"`` (torch.save), ``"safetensors"``, ``"pickle"`` (legacy torch.save) or ``None``."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(data) > 8 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= _MAX_SAFETENSORS_HEADER:
        return "safetensors"
    if data[:1] == b"\x80":
        return "pickle"
    return None


_WHAT = {"zip": "a zip archive (torch.save)", "pickle": "a pickle (a legacy torch.save file)", "safetensors": "safetensors data"}
_SHORT = {"zip": "torch.save zip archive", "pickle": "legacy torch.save pickle"}


def _one_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, without ANSI codes or newlines."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    text = " ".join(text.split())
    first = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0].rstrip(".")
    return first or type(exc).__name__


def _unreadable(p: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"cannot read {p} as a checkpoint: {reason}")


def _corrupt(p: Path, detail: str) -> CheckpointError:
    return _unreadable(p, f"the file is truncated or corrupt ({detail}); download or save it again")


def _zip_problem(data: bytes) -> tuple[str | None, list[str]]:
    """What is wrong with a zip archive (Python's zipfile: the end record, every member's CRC), or
    None; and the names of its members."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        if "not a zip file" in str(exc):
            return "its zip archive has no end record: it was cut short", []
        return f"its zip archive is damaged: {_one_line(exc)}", []
    except Exception as exc:  # zlib.error, EOFError, NotImplementedError, ...: damaged either way
        return f"its zip archive is damaged: {_one_line(exc)}", []
    if bad is not None:
        return f"the checksum of {bad} in its zip archive does not match", names
    return None, names


def _torch_load(data: bytes, p: Path, kind: str | None, trust_pickle: bool) -> Any:
    if kind == "zip":
        problem, names = _zip_problem(data)
        if problem:
            raise _corrupt(p, problem)
        base = {n.rsplit("/", 1)[-1] for n in names}
        if "constants.pkl" in base and not trust_pickle:
            raise CheckpointError(
                f"{p} is a TorchScript archive (torch.jit.save), which a safe load cannot read; save the model's "
                "state_dict with torch.save, or pass --trust-pickle (library: trust_pickle=True) for a file from a trusted source"
            )
        if "data.pkl" not in base:
            raise _unreadable(p, f"it is a zip archive but not one torch.save writes (no data.pkl inside; an .npz?); pass {FORMATS}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # third-party parsing of arbitrary bytes: any failure is the file's fault
        msg = str(exc)
        found = re.search(r"GLOBAL (\S+) was not an allowed global", msg)
        if not trust_pickle and found:
            raise CheckpointError(
                f"{p} contains pickled Python objects ({found.group(1)}) that a safe load refuses; pass --trust-pickle "
                "(library: trust_pickle=True) to load it, which executes its code: only for files from a trusted source"
            ) from exc
        if kind is None:
            raise _unreadable(
                p, f"it is not a checkpoint file (neither a torch.save zip archive or pickle nor safetensors); pass {FORMATS}"
            ) from exc
        if not trust_pickle and "Unsupported operand" in msg:
            raise CheckpointError(
                f"{p} is a pickle that a safe load cannot read (pickle.dump output or pickled Python objects: "
                f"{_weights_only_reason(exc)}); pass --trust-pickle (library: trust_pickle=True) to load it, which executes "
                "its code: only for files from a trusted source; or save a state_dict with torch.save"
            ) from exc
        detail = "it ends early" if isinstance(exc, EOFError) else _weights_only_reason(exc)
        raise _corrupt(p, f"{_SHORT[kind]}: {detail}") from exc


def _weights_only_reason(exc: BaseException) -> str:
    """The unpickler's own reason inside torch's long "Weights only load failed" message."""
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
    return found.group(1).strip().rstrip(".") if found else _one_line(exc)


def _decode_meta(raw: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    meta: dict[str, Any] = {k: v for k, v in raw.items() if k != META_KEY}
    ours = None
    if META_KEY in raw:
        try:
            decoded = json.loads(raw[META_KEY])
        except json.JSONDecodeError:
            decoded = None
        if isinstance(decoded, dict):
            meta.update(decoded)
            ours = decoded
        else:
            meta[META_KEY] = raw[META_KEY]
    return meta, ours


def _load_safetensors(data: bytes, p: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any] | None]:
    import safetensors.torch

    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise _corrupt(p, f"its safetensors header says {n} bytes but only {len(data) - 8} follow")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(p, f"its safetensors header is not valid JSON: {_one_line(exc)}") from exc
    raw = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(raw or {}, dict) or not all(isinstance(v, str) for v in (raw or {}).values()):
        raise _corrupt(p, "its safetensors header is not a table of tensors and string metadata")
    try:
        state = safetensors.torch.load(data)
    except Exception as exc:  # SafetensorError: offsets, sizes, dtypes that do not add up
        raise _corrupt(p, f"safetensors: {_one_line(exc)}") from exc
    meta, ours = _decode_meta(raw or {})
    return state, meta, ours


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _extract_state(obj: Any, p: Path) -> tuple[Any, dict[str, Any]]:
    """Find the state dict inside whatever ``torch.load`` returned; also our metadata."""
    if isinstance(obj, nn.Module):
        return obj.state_dict(), {}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead")
    meta = dict(obj[META_KEY]) if isinstance(obj.get(META_KEY), Mapping) else {}
    candidates = [obj[k] for k in NESTED_KEYS if k in obj and isinstance(obj[k], (Mapping, nn.Module))]
    for cand in candidates:
        if isinstance(cand, nn.Module):
            return cand.state_dict(), meta
        if _is_tensor_dict(cand):
            return cand, meta
    if candidates and not _is_tensor_dict(obj):
        return candidates[0], meta
    return obj, meta


def _not_dense(value: Tensor) -> str | None:
    """Why a tensor cannot be merged as a weight (sparse, quantized, nested, meta), or None."""
    if value.is_nested:
        return "nested tensor; mudsc merges dense weights: save the model's regular (strided) parameters"
    if value.layout != torch.strided:
        layout = str(value.layout).replace("torch.", "")
        return (
            f"{layout} (sparse) tensor; mudsc merges dense weights: convert it with .to_dense() before saving "
            "(not done here: a sparse tensor can stand for a dense one far larger than the file)"
        )
    if value.is_quantized:
        return f"quantized tensor ({value.dtype}); mudsc merges float weights: save the model before quantizing, or .dequantize() it"
    if value.is_meta:
        return "meta tensor, which holds no data; save the model after its weights are materialised"
    return None


def _check_tensors(state: Mapping[Any, Any], p: Path) -> None:
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"{p}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a state dict "
                f"(flat, or under one of {', '.join(NESTED_KEYS)})"
            )
        why = _not_dense(value)
        if why:
            raise CheckpointError(f"{p}: {key} is a {why}")


def _check_own_metadata(ours: Mapping[str, Any], n_tensors: int, p: Path) -> None:
    """Our own metadata drives how ``mudsc eval`` rebuilds a model: refuse values that make no sense."""
    def bad(field: str) -> CheckpointError:
        return CheckpointError(
            f"{p}: its mudsc metadata is corrupt ({field} is {ours[field]!r}); write the file again with mudsc merge"
        )

    n = ours.get("n_models")
    # a partial-zip file holds every model's own tail, so at least one tensor per model
    most = n_tensors if ours.get("stop_at") else None
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1 or (most is not None and n > most)):
        raise bad("n_models")
    for field in ("stop_at", "tracer", "arch"):
        if ours.get(field) is not None and not isinstance(ours[field], str):
            raise bad(field)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint as :func:`read_checkpoint` loaded it: ``sha256`` and ``size`` are those of the bytes the state came from."""

    path: Path
    state: dict[str, Tensor]
    metadata: dict[str, Any]
    sha256: str
    size: int
    format: str


def read_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> LoadedCheckpoint:
    """Read a checkpoint file once and load its state dict (on CPU) and metadata from those bytes.

    The format comes from the content: a zip archive or a pickle goes through
    ``torch.load(weights_only=True)`` (``weights_only=False`` with ``trust_pickle=True``, which
    executes the file's pickled code), safetensors through safetensors; a ``.safetensors`` name must
    hold safetensors. See :func:`load_checkpoint` for the accepted layouts.

    Raises:
        CheckpointError: a missing path, a directory, FIFO or device, a symlink loop; an empty,
            truncated or corrupt file; pickled objects without ``trust_pickle``; no tensors, a
            non-tensor entry, a sparse/quantized/nested/meta tensor; corrupt mudsc metadata.
    """
    p, data = read_file(path)
    digest, size = hashlib.sha256(data).hexdigest(), len(data)
    if not data:
        raise _unreadable(p, f"the file is empty (0 bytes); pass {FORMATS}")
    kind = _sniff(data)
    if p.suffix.lower() == ".safetensors" and kind != "safetensors":
        if kind is None:
            raise _unreadable(p, f"it is not a safetensors file (nor any other checkpoint format); pass {FORMATS}")
        raise _unreadable(p, f"it is not a safetensors file but {_WHAT[kind]}; if torch.save wrote it, rename it to .pt")
    ours: Mapping[str, Any] | None
    if kind == "safetensors":
        state, meta, ours = _load_safetensors(data, p)
    else:
        state, meta = _extract_state(_torch_load(data, p, kind, trust_pickle), p)
        ours = meta
    del data
    if not state:
        raise CheckpointError(f"{p} contains no tensors; pass a checkpoint with the model's weights")
    _check_tensors(state, p)
    out = {str(k): v for k, v in state.items()}
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    if ours:
        _check_own_metadata(ours, len(out), p)
    return LoadedCheckpoint(path=p, state=out, metadata=meta, sha256=digest, size=size, format=kind or "pickle")


def load_checkpoint(
    path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a checkpoint's state dict (on CPU) and its metadata (:func:`read_checkpoint` without the hash).

    ``.safetensors`` files are read with safetensors (metadata from the header, our ``"mudsc"``
    JSON entry merged in). Anything else goes through ``torch.load(weights_only=True)``, or
    ``weights_only=False`` with ``trust_pickle=True`` (which executes the file's pickled code).
    Accepted layouts: flat ``{name: tensor}``; nested under ``state_dict``/``model``/
    ``model_state_dict``/``module``; a whole ``nn.Module`` (only with ``trust_pickle``); our own
    ``{"state_dict": ..., "mudsc": metadata}``. A ``module.`` prefix on every key is stripped.

    Raises:
        CheckpointError: see :func:`read_checkpoint`.
    """
    ck = read_checkpoint(path, trust_pickle=trust_pickle)
    return ck.state, ck.metadata


def _fmt_shape(shape: torch.Size) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _fmt_keys(keys: list[str]) -> str:
    return "[" + ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "") + f"] ({len(keys)})"


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "int"


_KIND_WORDS = {"bool": "a boolean", "complex": "a complex", "float": "a floating-point", "int": "an integer"}


def fit_state_dict(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly, after checking keys, shapes, dtypes and finiteness.

    A tensor must be of the same dtype kind as the model's (floating point, integer, boolean,
    complex): another width is cast (a float16 checkpoint into a float32 model, int32 position ids
    into int64 ones), but never an integer, boolean or complex tensor into float weights (a
    safetensors header edited from F32 to I32 would otherwise merge as weights around 1e9), nor
    floats into an integer buffer; a cast must not overflow (float64 values beyond float32's range,
    integers beyond the buffer's).

    Raises:
        CheckpointError: naming up to three missing/unexpected keys (with counts), or the first key
            whose shape differs, whose dtype kind differs (with both dtypes), that is not a dense
            tensor, that has NaN or inf values, or whose values do not fit the model's dtype.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing keys {_fmt_keys(missing)}"] if missing else []) + (
            [f"unexpected keys {_fmt_keys(unexpected)}"] if unexpected else []
        )
        raise CheckpointError(f"{source} does not fit the architecture: {', '.join(parts)}; check --arch / --arch-opt")
    for key, ref in expected.items():
        value = state[key]
        why = _not_dense(value)
        if why:
            raise CheckpointError(f"{source}: {key} is a {why}")
        if value.shape != ref.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {_fmt_shape(value.shape)} but the architecture expects "
                f"{_fmt_shape(ref.shape)}; check --arch-opt (e.g. num_classes)"
            )
        kind, want = _kind(value.dtype), _kind(ref.dtype)
        if kind != want:
            raise CheckpointError(
                f"{source}: {key} is {value.dtype} ({_KIND_WORDS[kind]} tensor) but the architecture has {ref.dtype} there; "
                f"the file is corrupt (an edited header?) or not this model's: save it again with {ref.dtype} values"
            )
        if kind in ("float", "complex"):
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{source}: {key} contains NaN or inf values; use a checkpoint with finite weights")
            if value.dtype != ref.dtype and not bool(torch.isfinite(value.to(ref.dtype)).all()):
                raise CheckpointError(
                    f"{source}: {key} has values too large for {ref.dtype} (finite as {value.dtype}, inf once cast); "
                    "use a checkpoint whose weights fit the model's dtype"
                )
        elif kind == "int" and value.dtype != ref.dtype and value.numel():
            info = torch.iinfo(ref.dtype)
            low, high = int(value.min()), int(value.max())
            if low < info.min or high > info.max:
                raise CheckpointError(
                    f"{source}: {key} has values {low}..{high}, out of the range of {ref.dtype}; "
                    "use a checkpoint whose values fit the model's dtype"
                )
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not fit the architecture: {_one_line(exc)}; check --arch / --arch-opt") from exc


# --------------------------------------------------------------------------- the output path


def name_max(directory: str | os.PathLike[str]) -> int:
    """The longest file name (in bytes) that the file system of ``directory`` allows (255 when unknown)."""
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _path_max(directory: str | os.PathLike[str]) -> int:
    try:
        return int(os.pathconf(directory, "PC_PATH_MAX"))
    except (OSError, ValueError, AttributeError):
        return 4096


def _resolve(p: Path) -> Path:
    """``p.resolve()``, or the absolute path where it cannot be resolved (a symlink loop raises RuntimeError on Python < 3.13)."""
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(p))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_not_an_input(
    out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]], *, contains: bool = False
) -> None:
    """Refuse an output that is one of ``inputs``: the same path, or the same file through another
    path, a symbolic link or a hard link (``os.path.samefile``: same device and inode), or anything
    inside an input directory (a model directory's ``config.json``, a new ``merged/`` in it); with
    ``contains`` (an output directory), also one that holds an input. ``--force`` does not matter."""
    p = Path(out).expanduser()
    target = _resolve(p)
    for source in inputs:
        src = Path(source).expanduser()
        if _resolve(src) == target or _same_file(p, src):
            how = "" if os.path.abspath(p) == os.path.abspath(src) else " (the same file through another path or a link)"
            raise CheckpointError(
                f"{p} is the input {source}{how}; write the merged model somewhere else (--force never overwrites an input)"
            )
        if src.is_dir() and _inside(target, _resolve(src)):
            raise CheckpointError(f"{p} is inside the input directory {source}; write the merged model somewhere else "
                                  "(--force never writes into an input)")
        if contains and _inside(_resolve(src), target):
            raise CheckpointError(f"{p} contains the input {source}; write the merged model somewhere else")


def check_output_parent(out: str | os.PathLike[str]) -> Path:
    """Refuse an output whose directory is missing, not a directory (``a.pt/m.pt``) or not writable,
    or whose name or path is longer than the file system allows; return the path."""
    p = Path(out).expanduser()
    parent = p.parent
    if not parent.is_dir():
        for anc in [*reversed(parent.parents), parent]:
            if os.path.lexists(anc) and not anc.is_dir():
                raise CheckpointError(f"cannot write {p}: {anc} is a file, not a directory; choose another path")
        raise CheckpointError(f"cannot write {p}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"cannot write into {parent}: permission denied (or a read-only file system); choose another directory"
        )
    length, limit = len(os.fsencode(p.name)), name_max(parent)
    if length > limit:
        raise CheckpointError(
            f"cannot write {p.name[:40]}...: its name is {length} bytes, longer than the {limit} bytes this file system "
            "allows; choose a shorter name"
        )
    if len(os.fsencode(str(temp_path(p)))) >= _path_max(parent):
        raise CheckpointError(f"cannot write {p}: the path is longer than this system allows; choose a shorter path")
    return p


def check_output_file(
    path: str | os.PathLike[str], *, force: bool = False, inputs: Sequence[str | os.PathLike[str]] = ()
) -> Path:
    """Refuse a bad output file before any work (``save_checkpoint`` checks again): an unknown
    extension, one of ``inputs`` (even with ``force``), a bad directory or name
    (:func:`check_output_parent`), an existing directory, an existing file without ``force``, or
    an existing FIFO/device (even with ``force``)."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    check_not_an_input(p, inputs)
    try:
        mode: int | None = os.stat(p).st_mode
    except OSError:  # missing, or a dangling symbolic link or a loop: replacing the link itself is fine
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        example = p / ("merged" + (suffix if suffix in SAVE_SUFFIXES else ".pt"))
        raise CheckpointError(f"cannot write {p}: it is a directory; pass a file name (e.g. {example})")
    if suffix not in SAVE_SUFFIXES:
        raise CheckpointError(f"cannot write {p}: unknown extension {suffix or '(none)'!r}; use .safetensors or .pt/.pth")
    check_output_parent(p)
    if os.path.lexists(p):
        if not force:
            raise CheckpointError(f"{p} exists; pass --force to overwrite")
        if mode is not None and not stat.S_ISREG(mode):
            raise CheckpointError(
                f"cannot write {p}: it is {_describe_mode(mode)}, not a regular file; mudsc replaces only regular files, even with --force"
            )
    return p


# --------------------------------------------------------------------------- saving


def temp_path(p: Path) -> Path:
    """A hidden, unique temp name beside ``p``; a shorter one when ``p``'s name leaves no room for it."""
    token = secrets.token_hex(8)
    name = f".{p.name}.{token}.tmp"
    if len(os.fsencode(name)) > name_max(p.parent if p.parent.is_dir() else "."):
        name = f".mudsc.{token}.tmp"
    return p.with_name(name)


class _FdWriter:
    """The file object ``torch.save`` writes to (a file object, not a path, so the archive's root
    folder is ``archive/`` rather than the random temp name): buffered, short writes retried, and
    the first ``OSError`` kept in case the caller's C++ wraps it into another exception."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.error: OSError | None = None
        self._buf = bytearray()

    def _write_all(self, view: memoryview) -> None:
        try:
            while len(view):
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            self.error = self.error or exc
            raise

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if len(self._buf) + n < _CHUNK:
            self._buf += view
            return n
        self.flush()
        if n >= _CHUNK:
            self._write_all(view)
        else:
            self._buf += view
        return n

    def flush(self) -> None:
        if self._buf:
            with memoryview(self._buf) as view:
                self._write_all(view)
            del self._buf[:]


def _write_error(p: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0)
    if code:
        reason += f" ({code})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free some space (or raise the quota or the file-size limit, ulimit -f) or write somewhere else"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "check the directory's permissions"
    elif exc.errno == errno.ENAMETOOLONG:
        hint = "choose a shorter name"
    else:
        hint = "check disk space and permissions"
    old = " (the existing file is untouched)" if p.exists() else ""
    return f"cannot write {p}: {reason}; {hint}{old}"


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while saving (a BaseException, like KeyboardInterrupt: nothing may swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


_CLEANUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _die_by_signal(signum: int) -> None:
    """Die of ``signum`` as if it had arrived after the cleanup (its default action is restored by now)."""
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


@contextmanager
def cleanup_on_termination() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM and SIGHUP, where nobody else handles them
    (default action), raise :class:`_Terminated` so that the block's cleanup runs; afterwards the
    default handlers are back, and a signal that came is re-delivered: the process still dies of it,
    only without a temp file left behind. A handler someone installed (or SIG_IGN) is left alone."""
    installed: list[int] = []
    pending: list[int] = []
    closing = False

    def handler(signum: int, frame: Any) -> None:
        pending.append(signum)
        if len(pending) == 1 and not closing:
            raise _Terminated(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in _CLEANUP_SIGNALS:
            try:
                if signal.getsignal(sig) == signal.SIG_DFL:
                    signal.signal(sig, handler)
                    installed.append(sig)
            except (ValueError, OSError):
                pass
    try:
        yield
    finally:
        closing = True
        for sig in installed:
            signal.signal(sig, signal.SIG_DFL)
        if pending:
            _die_by_signal(pending[0])
            raise SystemExit(128 + pending[0])  # only if the signal did not end the process


def _serialise(writer: _FdWriter, suffix: str, state: Mapping[str, Tensor], meta_json: str) -> None:
    if suffix == ".safetensors":
        import safetensors.torch

        tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
        data = safetensors.torch.save(tensors, metadata={META_KEY: meta_json})
        del tensors
        writer.write(data)
    else:
        torch.save({"state_dict": dict(state), META_KEY: json.loads(meta_json)}, writer)


def save_checkpoint(
    path: str | os.PathLike[str],
    state: Mapping[str, Tensor],
    metadata: Mapping[str, Any],
    *,
    force: bool = False,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``state`` and JSON-serialisable ``metadata`` atomically and reproducibly; return the path written.

    ``.safetensors``: tensors made contiguous and unshared, metadata as ``{"mudsc": json}``.
    ``.pt``/``.pth``: ``torch.save({"state_dict": state, "mudsc": metadata})``, loadable with
    ``weights_only=True``. The same state and metadata give the same bytes. The path is checked
    first (:func:`check_output_file`: an existing file needs ``force``; one of ``inputs`` is refused
    even with it). A failure, Ctrl-C, SIGTERM or SIGHUP leaves no temp file and an existing file
    untouched.

    Raises:
        CheckpointError: a bad output path (see :func:`check_output_file`), metadata that is not
            JSON, a non-tensor entry, or an OS error while writing (a full disk, a quota, ...).
    """
    p = check_output_file(path, force=force, inputs=inputs)
    suffix = p.suffix.lower()
    try:
        meta_json = json.dumps(dict(metadata))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot save {p}: metadata is not JSON-serialisable ({exc}); pass plain values") from exc
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"cannot save {p}: entry {key!r} is a {type(value).__name__}, not a tensor")

    with cleanup_on_termination():
        tmp = temp_path(p)
        writer: _FdWriter | None = None
        try:
            # O_EXCL with mode 0o666 so the umask applies, unlike mkstemp's 0o600.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            writer = _FdWriter(fd)
            try:
                _serialise(writer, suffix, state, meta_json)
                writer.flush()
                os.fsync(fd)
            finally:
                os.close(fd)
            _place(tmp, p, force)
        except BaseException as exc:
            if writer is not None:  # the temp file is ours (O_EXCL): remove it, whatever happened
                tmp.unlink(missing_ok=True)
            cause = exc if isinstance(exc, OSError) else writer.error if writer is not None else None
            if cause is not None and isinstance(exc, Exception):
                raise CheckpointError(_write_error(p, cause)) from exc
            raise
        fsync_dir(p.parent)  # make the rename durable
    return p


def _place(tmp: Path, p: Path, force: bool) -> None:
    """Move the finished temp file to ``p``: replacing it with ``force``, else only if ``p`` still
    does not exist (a hard link fails if it does), so two merges racing to one new name cannot both
    report it written."""
    if force:
        os.replace(tmp, p)
        return
    try:
        os.link(tmp, p)
    except FileExistsError:
        raise CheckpointError(f"{p} was created by someone else while this merge ran; nothing was written (pass --force to replace it)") from None
    except OSError:  # a file system without hard links: check, then rename (a narrow race remains)
        if os.path.lexists(p):
            raise CheckpointError(f"{p} was created by someone else while this merge ran; nothing was written (pass --force to replace it)") from None
        os.replace(tmp, p)
        return
    tmp.unlink()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync`` a directory (after a rename into it); best effort: not every platform can open one."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    p = _check_file(path)
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
