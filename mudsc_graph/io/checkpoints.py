"""Checkpoint formats: ``.safetensors`` and ``.pt``/``.pth``/``.bin``/``.ckpt``, read safely and written reproducibly.

Loading never runs pickled code unless asked: ``torch.load(..., weights_only=True)`` refuses
pickled Python objects (a whole ``nn.Module``, a custom class) with a :class:`CheckpointError`
that names the offending global and points at ``--trust-pickle`` (``trust_pickle=True``). A file
is read once, into memory (:func:`~.paths.read_file`: regular files only), and both hashed and
loaded from those bytes (so the recorded SHA-256 is that of what was loaded); its format comes
from its content (a zip archive, a legacy pickle or safetensors), except that a ``.safetensors``
name must hold safetensors, so ``--trust-pickle`` never unpickles it. Truncated and corrupt files
(zip checksums are verified), sparse, quantized, nested and meta tensors are refused with one line
that says what is wrong. Fitting what was read into a model is :mod:`.fitting`'s concern.

Saving is reproducible (through a file object, so that the zip archive inside a ``.pt`` has the
fixed root ``archive/`` and the same state gives the same bytes) and atomic: the output path is
checked first (:func:`~.paths.check_output_file`), then written by :func:`~.atomic.write_atomically`.

    >>> state, meta = load_checkpoint("a.pt")        # flat, {"state_dict": ...}, {"model": ...}, ...
    >>> ck = read_checkpoint("a.pt")                 # the same, with the SHA-256 of the bytes loaded
    >>> save_checkpoint("merged.safetensors", model.state_dict(), {"method": "mudsc"}, inputs=["a.pt"])
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .atomic import write_atomically
from .paths import FORMATS, CheckpointError, check_output_file, read_file

#: Keys under which other tools nest a state dict, tried in this order.
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
#: The metadata key of our own files (a dict in ``.pt``, a JSON string in ``.safetensors``).
META_KEY = "mudsc"
#: safetensors refuses headers larger than this; a larger "length" is not a safetensors file.
_MAX_SAFETENSORS_HEADER = 100_000_000


# --------------------------------------------------------------------------- reading


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


def _serialise(writer: Any, suffix: str, state: Mapping[str, Tensor], meta_json: str) -> None:
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

    write_atomically(p, lambda writer: _serialise(writer, suffix, state, meta_json), force=force)
    return p
