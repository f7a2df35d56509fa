"""The ``mudsc`` Typer app and its ``main()`` entry point.

Every :class:`~mudsc_graph.errors.MudscError` (a mistake of the user's: unknown architecture,
bad option, unsupported op in strict mode, failed self-check ...) becomes one red line on
stderr and exit code 1; ``MUDSC_DEBUG=1`` re-raises it with its traceback instead. Any other
exception is a bug and propagates with its traceback.
"""

import os
from typing import Annotated, Any, Optional, Sequence

import typer
from typer.core import TyperGroup

from mudsc_graph.errors import MudscError

from . import demo_cmd, eval_cmd, inspect_cmd, merge_cmd, plugins_cmd
from .console import DEBUG_ENV, print_error


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


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
            print_error(exc)
            raise typer.Exit(1) from None


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
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("mudsc")
        except PackageNotFoundError:  # running from a source tree that is not installed
            v = "unknown"
        typer.echo(f"mudsc {v}")
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
