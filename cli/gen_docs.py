"""Render the command-line reference (``docs/cli.md``) from the Typer app itself.

Regenerate with::

    python -m mudsc_cli.gen_docs > docs/cli.md

The page is built from the commands' own parameters (names, types, defaults, help), not from
rich-formatted ``--help`` screens, so it is the same whatever the terminal, its width or colours.
A test asserts that ``docs/cli.md`` is up to date.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import typer

REGENERATE = "python -m mudsc_cli.gen_docs > docs/cli.md"


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _section(command: Any, ctx: Any, prog: str) -> list[str]:
    lines = [f"## `{prog}`", ""]
    if command.help:
        lines += [inspect.cleandoc(command.help), ""]
    usage = " ".join([prog, *command.collect_usage_pieces(ctx)])
    lines += ["```", usage, "```", ""]
    rows = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)  # (names and metavar, help): the same in click and typer
        if record is None:  # hidden
            continue
        names, help_text = record
        rows.append(f"| `{_cell(names)}` | {_cell(help_text)} |")
    if rows:
        lines += ["| parameter | description |", "|---|---|", *rows, ""]
    return lines


def render_cli_reference() -> str:
    """The Markdown text of ``docs/cli.md``."""
    from .app import app

    root = typer.main.get_command(app)
    root_ctx = typer.Context(root, info_name="mudsc", **(root.context_settings or {}))
    lines = [
        "# Command-line reference",
        "",
        f"<!-- Generated from the Typer app by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Every command prints results on stdout and errors, warnings and progress on stderr. Exit codes: 0 "
        "success; 1 an input mudsc refuses (unknown architecture, a checkpoint that does not fit, bad data, "
        "failed self-check ...), one red `error:` line (set `MUDSC_DEBUG=1` to get its traceback instead); 2 a "
        "command line that cannot be parsed or is incomplete (unknown option, a value of the wrong type, a "
        "missing argument), one red `error:` line and a pointer to `--help`.",
        "",
    ]
    lines += _section(root, root_ctx, "mudsc")
    for name in root.list_commands(root_ctx):
        command = root.get_command(root_ctx, name)
        ctx = typer.Context(command, info_name=name, parent=root_ctx, **(command.context_settings or {}))
        lines += _section(command, ctx, f"mudsc {name}")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    sys.stdout.write(render_cli_reference())


if __name__ == "__main__":
    main()
