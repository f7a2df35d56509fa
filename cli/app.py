"""The ``mudsc`` Typer app and its ``main()`` entry point.

Exit codes: 0 success; 1 a :class:`~mudsc_graph.errors.MudscError` (a mistake of the user's:
unknown architecture, a checkpoint that does not fit, bad data, unsupported op in strict mode,
failed self-check ...), one red line on stderr (``MUDSC_DEBUG=1`` re-raises it with its
traceback instead); 2 a usage error (unknown option, a value of the wrong type, a missing
argument, fewer than two checkpoints to merge), one red line and where to look. Any other
exception is a bug and propagates with its traceback.
"""

import os
import sys
from typing import Annotated, Any, Optional, Sequence

import typer
from typer.core import TyperGroup

from mudsc_graph.errors import MudscError

from . import demo_cmd, eval_cmd, inspect_cmd, merge_cmd, plugins_cmd
from .console import DEBUG_ENV, UsageError, print_error, print_usage_error

try:  # typer vendors its own click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as _cx  # type: ignore[no-redef]

#: Exit code of a command line that cannot be parsed or is incomplete (a MudscError exits 1).
USAGE_EXIT = 2



def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _in_process_group() -> bool:
    """Whether this process joined a torch.distributed process group (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


class MudscGroup(TyperGroup):
    """The root command group: maps :class:`MudscError` raised by a command to exit code 1.

    The mapping lives here (not only in :func:`main`) so that ``typer.testing.CliRunner``, which
    invokes the app directly, sees exactly what a user sees.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except MudscError as exc:
            if _debug():
                raise
            if isinstance(exc, UsageError):
                raise _cx.UsageError(str(exc), ctx=ctx) from None
            print_error(exc)
            if getattr(exc, "abandon_process", False) or _in_process_group():
                # a process group's gloo threads abort the interpreter's exit ("terminate called without
                # an active exception") when its peers are gone or going: leave at once, with exit code 1
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            raise typer.Exit(1) from None

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True, **extra: Any) -> Any:
        """Usage errors (an unknown option, a bad value, a missing argument) are one ``error:`` line
        and exit code 2; a mudsc error is one line and exit code 1; success is 0."""
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except _cx.NoArgsIsHelpError:
            if not standalone_mode:
                raise
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=True, **extra)
        except _cx.UsageError as exc:
            if not standalone_mode:
                raise
            print_usage_error(exc)
            sys.exit(USAGE_EXIT)
        except _cx.ClickException as exc:  # e.g. a file click itself could not open
            if not standalone_mode:
                raise
            print_error(exc)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            print_error(RuntimeError("interrupted"))
            sys.exit(130)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    name="mudsc",
    cls=MudscGroup,
    help="Training-free merging of neural networks of any architecture (MuDSC, ZipIt!, Git Re-Basin).",
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        from .console import version

        typer.echo(f"mudsc {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version of mudsc and exit."),
    ] = None,
) -> None:
    """Training-free merging of neural networks of any architecture (MuDSC, ZipIt!, Git Re-Basin)."""


app.command("demo")(demo_cmd.demo_command)
app.command("merge")(merge_cmd.merge_command)
app.command("eval")(eval_cmd.eval_command)
app.command("inspect")(inspect_cmd.inspect_command)
app.command("plugins")(plugins_cmd.plugins_command)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the app (the ``mudsc`` console script)."""
    try:
        app(args=None if argv is None else list(argv), prog_name="mudsc")
    except MudscError as exc:  # raised outside a command (e.g. while building the context)
        if _debug():
            raise
        print_error(exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
