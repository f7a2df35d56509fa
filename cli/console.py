"""The two rich consoles of the CLI and how errors and warnings are printed.

Results go to stdout; errors, warnings and progress go to stderr, so that ``--json`` output on
stdout stays machine-readable. Consoles are made per call (not at import) so that they write to
whatever ``sys.stdout``/``sys.stderr`` are at that moment (``CliRunner`` swaps them).
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from mudsc_graph.errors import MudscError

DEBUG_ENV = "MUDSC_DEBUG"


class UsageError(MudscError):
    """A command line that is incomplete or self-contradictory (fewer than two models to merge, ...):
    reported like the usage errors the parser finds, with exit code 2."""


def version() -> str:
    """The installed version of mudsc (``mudsc --version``, and what every merged output records),
    ``"unknown"`` when running from a source tree that is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("mudsc")
    except PackageNotFoundError:
        return "unknown"


def out() -> Console:
    """Console for results (stdout)."""
    return Console(highlight=False, markup=False)


def err() -> Console:
    """Console for errors, warnings and progress (stderr)."""
    return Console(stderr=True, highlight=False, markup=False)


def print_error(exc: BaseException) -> None:
    """One red line ``error: <message>`` and a dim hint, on stderr."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    console = err()
    console.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    console.print(Text(f"set {DEBUG_ENV}=1 for the traceback", style="dim"), soft_wrap=True)


def print_usage_error(exc: BaseException) -> None:
    """A command line that cannot be parsed (unknown option, bad value, missing argument): one red
    line ``error: <message>`` and where to look, on stderr. Exit code 2, as is usual for usage errors."""
    fmt = getattr(exc, "format_message", None)
    message = " ".join((fmt() if callable(fmt) else str(exc)).split()) or type(exc).__name__
    ctx = getattr(exc, "ctx", None)
    console = err()
    console.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    path = ctx.command_path if ctx is not None else "mudsc"
    sub = getattr(ctx, "invoked_subcommand", None)
    console.print(Text(f"see '{path}{' ' + sub if sub else ''} --help'", style="dim"), soft_wrap=True)


def print_warning(message: str) -> None:
    """One yellow line ``warning: <message>`` on stderr."""
    err().print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)
