"""Atomic, signal-safe writing: a finished file or nothing.

The data go to a hidden temp file beside the target (:func:`~.paths.temp_path`), are fsynced, and
take the target's name in one step (:func:`place`: a rename with ``force``, else a hard link that
fails if someone created the target meanwhile). A failure (a full disk, a quota, ``ulimit -f``),
Ctrl-C, SIGTERM or SIGHUP (:func:`cleanup_on_termination`) leaves neither a partial output nor the
temp file behind, and an existing target untouched. :func:`write_atomically` is the whole of it for
one file; a model directory (:mod:`.hf`) uses the parts.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .paths import CHUNK, CheckpointError, temp_path


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
        if len(self._buf) + n < CHUNK:
            self._buf += view
            return n
        self.flush()
        if n >= CHUNK:
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


def place(tmp: Path, p: Path, force: bool) -> None:
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




def write_atomically(p: Path, serialise: Callable[[Any], None], *, force: bool) -> None:
    """Write ``p`` through ``serialise(file object)``: a temp file beside it, fsynced, then put in
    place (see the module docstring); an OS error is a :class:`~.paths.CheckpointError` that says
    what to do."""
    with cleanup_on_termination():
        tmp = temp_path(p)
        writer: _FdWriter | None = None
        try:
            # O_EXCL with mode 0o666 so the umask applies, unlike mkstemp's 0o600.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            writer = _FdWriter(fd)
            try:
                serialise(writer)
                writer.flush()
                os.fsync(fd)
            finally:
                os.close(fd)
            place(tmp, p, force)
        except BaseException as exc:
            if writer is not None:  # the temp file is ours (O_EXCL): remove it, whatever happened
                tmp.unlink(missing_ok=True)
            cause = exc if isinstance(exc, OSError) else writer.error if writer is not None else None
            if cause is not None and isinstance(exc, Exception):
                raise CheckpointError(_write_error(p, cause)) from exc
            raise
        fsync_dir(p.parent)  # make the rename durable
