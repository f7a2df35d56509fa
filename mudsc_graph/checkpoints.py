"""Reading and writing model checkpoints safely: ``.safetensors`` and ``.pt``/``.pth``/``.bin``/``.ckpt``.

Loading never runs pickled code unless asked: ``torch.load(..., weights_only=True)`` refuses
pickled Python objects (a whole ``nn.Module``, a custom class) with a :class:`CheckpointError`
that names the offending global and points at ``--trust-pickle`` (``trust_pickle=True``).
Saving is atomic: a temp file in the target directory, ``fsync``, ``os.replace``; a failure
leaves neither a partial output nor the temp file behind.

    >>> state, meta = load_checkpoint("a.pt")        # flat, {"state_dict": ...}, {"model": ...}, ...
    >>> fit_state_dict(model, state, source="a.pt")  # strict, with a readable error on mismatch
    >>> save_checkpoint("merged.safetensors", model.state_dict(), {"method": "mudsc"})
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import MudscError

#: Keys under which other tools nest a state dict, tried in this order.
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
#: The metadata key of our own files (a dict in ``.pt``, a JSON string in ``.safetensors``).
META_KEY = "mudsc"
SAVE_SUFFIXES = (".safetensors", ".pt", ".pth")
_CHUNK = 1 << 20


class CheckpointError(MudscError):
    """A checkpoint file is missing, unreadable, unsafe to unpickle, or does not fit the model."""


def _check_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"no such file: {p} (it is a directory); pass the checkpoint file inside it")
    if not p.is_file():
        raise CheckpointError(f"no such file: {p}; check the path")
    return p


def _one_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, without ANSI codes or newlines."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    text = " ".join(text.split())
    first = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0].rstrip(".")
    return first or type(exc).__name__


def _torch_load(p: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # third-party parsing of arbitrary bytes: any failure is the file's fault
        msg = str(exc)
        if not trust_pickle and "Weights only load failed" in msg and "Unsupported operand" not in msg:
            found = re.search(r"GLOBAL (\S+) was not an allowed global", msg)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{p} contains pickled Python objects{what} that a safe load refuses; pass --trust-pickle "
                "(library: trust_pickle=True) to load it, which executes its code: only for files from a trusted source"
            ) from exc
        if not trust_pickle and "Unsupported operand" in msg:
            reason = "not a torch checkpoint (unrecognised data); pass a file written by torch.save or safetensors"
        elif isinstance(exc, EOFError):
            reason = "the file is empty or truncated"
        else:
            reason = _one_line(exc)
        raise CheckpointError(f"cannot read {p} as a checkpoint: {reason}") from exc


def _load_safetensors(p: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(str(p), device="cpu")
        with safe_open(str(p), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
    except Exception as exc:  # SafetensorError, OSError, ...: the file is not valid safetensors
        raise CheckpointError(f"cannot read {p} as a checkpoint: {_one_line(exc)}") from exc
    meta: dict[str, Any] = {k: v for k, v in raw.items() if k != META_KEY}
    if META_KEY in raw:
        try:
            decoded = json.loads(raw[META_KEY])
        except json.JSONDecodeError:
            decoded = None
        if isinstance(decoded, dict):
            meta.update(decoded)
        else:
            meta[META_KEY] = raw[META_KEY]
    return state, meta


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


def load_checkpoint(
    path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a checkpoint's state dict (on CPU) and its metadata.

    ``.safetensors`` files are read with safetensors (metadata from the header, our ``"mudsc"``
    JSON entry merged in). Anything else goes through ``torch.load(weights_only=True)``, or
    ``weights_only=False`` with ``trust_pickle=True`` (which executes the file's pickled code).
    Accepted layouts: flat ``{name: tensor}``; nested under ``state_dict``/``model``/
    ``model_state_dict``/``module``; a whole ``nn.Module`` (only with ``trust_pickle``); our own
    ``{"state_dict": ..., "mudsc": metadata}``. A ``module.`` prefix on every key is stripped.

    Raises:
        CheckpointError: missing file, unreadable file, pickled objects without ``trust_pickle``,
            no tensors, or a non-tensor entry.
    """
    p = _check_file(path)
    if p.suffix.lower() == ".safetensors":
        state, meta = _load_safetensors(p)
    else:
        state, meta = _extract_state(_torch_load(p, trust_pickle), p)
    if not state:
        raise CheckpointError(f"{p} contains no tensors; pass a checkpoint with the model's weights")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"{p}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a state dict "
                f"(flat, or under one of {', '.join(NESTED_KEYS)})"
            )
    out = {str(k): v for k, v in state.items()}
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out, meta


def _fmt_shape(shape: torch.Size) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _fmt_keys(keys: list[str]) -> str:
    return "[" + ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "") + f"] ({len(keys)})"


def fit_state_dict(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly, after checking keys, shapes and finiteness.

    Raises:
        CheckpointError: naming up to three missing/unexpected keys (with counts), the first key
            whose shape differs, or the first floating tensor with NaN or inf values.
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
        if value.shape != ref.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {_fmt_shape(value.shape)} but the architecture expects "
                f"{_fmt_shape(ref.shape)}; check --arch-opt (e.g. num_classes)"
            )
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: {key} contains NaN or inf values; use a checkpoint with finite weights")
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not fit the architecture: {_one_line(exc)}; check --arch / --arch-opt") from exc


def save_checkpoint(
    path: str | os.PathLike[str], state: Mapping[str, Tensor], metadata: Mapping[str, Any], *, force: bool = False
) -> Path:
    """Write ``state`` and JSON-serialisable ``metadata`` atomically; return the path written.

    ``.safetensors``: tensors made contiguous and unshared, metadata as ``{"mudsc": json}``.
    ``.pt``/``.pth``: ``torch.save({"state_dict": state, "mudsc": metadata})``, loadable with
    ``weights_only=True``. An existing file is refused unless ``force``.

    Raises:
        CheckpointError: unknown extension, missing parent directory, existing file without
            ``force``, metadata that is not JSON, or an OS error while writing.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise CheckpointError(f"cannot save {p}: unknown extension {suffix or '(none)'!r}; use .safetensors or .pt/.pth")
    if not p.parent.is_dir():
        raise CheckpointError(f"cannot save {p}: directory {p.parent} does not exist; create it first")
    if p.is_dir():
        raise CheckpointError(f"cannot save {p}: it is a directory; pass a file name")
    if p.exists() and not force:
        raise CheckpointError(f"{p} exists; pass --force to overwrite")
    try:
        meta_json = json.dumps(dict(metadata))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot save {p}: metadata is not JSON-serialisable ({exc}); pass plain values") from exc
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"cannot save {p}: entry {key!r} is a {type(value).__name__}, not a tensor")

    # O_EXCL with mode 0o666 so the umask applies, unlike mkstemp's 0o600.
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(8)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise CheckpointError(f"cannot write {p}: {exc.strerror or exc}; check the directory's permissions") from exc
    try:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
            save_file(tensors, str(tmp), metadata={META_KEY: meta_json})
        else:
            torch.save({"state_dict": dict(state), META_KEY: json.loads(meta_json)}, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {p}: {exc.strerror or exc}; check disk space and permissions") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)  # make the rename durable
    return p


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
