"""Files in and out: what mudsc reads (regular files only) and the rules an output path must pass.

A file is read only when it is a regular file (symbolic links followed): a FIFO or device, even one
swapped in after the first check, is refused, never waited on; a missing file, a loop of links or a
permission problem is one line. An output is checked before any work (:func:`check_output_file`,
:func:`check_output_parent`, :func:`check_not_an_input`): never one of the inputs (through any path
or link, even with ``--force``), its directory exists and is writable, its name fits the file
system, an existing file is replaced only with ``--force``. Writing it is :mod:`.atomic`'s concern.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from ..errors import MudscError

#: What mudsc writes a checkpoint as.
SAVE_SUFFIXES = (".safetensors", ".pt", ".pth")
#: What a checkpoint file may be, for the messages.
FORMATS = "a torch.save file (.pt, .pth, .bin, .ckpt) or a .safetensors file"
CHUNK = 1 << 20


class CheckpointError(MudscError):
    """A checkpoint file (or model directory) is missing, unreadable, unsafe to unpickle, cannot be
    written where asked, or does not fit the model."""


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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    p = _check_file(path)
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def temp_path(p: Path) -> Path:
    """A hidden, unique temp name beside ``p``; a shorter one when ``p``'s name leaves no room for it."""
    token = secrets.token_hex(8)
    name = f".{p.name}.{token}.tmp"
    if len(os.fsencode(name)) > name_max(p.parent if p.parent.is_dir() else "."):
        name = f".mudsc.{token}.tmp"
    return p.with_name(name)
