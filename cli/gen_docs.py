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
    lines += _guarantees()
    return "\n".join(lines).rstrip() + "\n"


def _guarantees() -> list[str]:
    """What every command promises, with the limits as the code has them."""
    from mudsc_graph.io.data import MAX_CLASSES, MAX_INPUT_BYTES
    from mudsc_graph.io.partial import MAX_PARTIAL_MODELS

    from .archs import MAX_INPUT_NUMEL

    return [
        "## What mudsc guarantees",
        "",
        "- **Exit codes.** 0 success; 1 an input mudsc refuses, as one `error:` line (`MUDSC_DEBUG=1` shows the "
        "traceback); 2 a command line that cannot be parsed or is incomplete (unknown option, a value of the wrong "
        "type or out of range, a missing argument, fewer than two models to merge). No other failure is expected: "
        "a traceback without `MUDSC_DEBUG` is a bug.",
        "- **Inputs are never changed.** An output that is one of the inputs (the same path, or the same file through "
        "another path, a symbolic link or a hard link; for a model directory, one that contains an input, or the "
        "`--data` file), or that lies inside an input directory (`--out a/config.json`, `--out a/merged`), is refused "
        "even with `--force`.",
        "- **Outputs are all or nothing.** The output path is checked before any work (extension, the directory "
        "exists and is writable, the name fits the file system, an existing file needs `--force`, a directory, FIFO "
        "or device is never replaced; `--force` replaces a model directory only if it holds nothing but what a model "
        "directory holds, so no file of yours goes with it). An output that appears while the merge runs (another "
        "merge to the same new name) is never replaced without `--force`: the later writer fails. The file (or model directory) is written to a hidden temp name beside the "
        "target, synced and renamed into place: a failure, a full disk or quota, Ctrl-C, SIGTERM or SIGHUP leaves "
        "neither a partial output nor the temp file, and an existing `--force` target is untouched until the new one "
        "is complete (SIGKILL can leave the hidden temp file, never a partial output).",
        "- **Reproducible.** The same merge (inputs, options, seed) gives byte-identical `.pt` and `.safetensors` "
        "files, on any number of threads.",
        "- **Safe loading.** Checkpoints load with `torch.load(weights_only=True)` or safetensors; a pickled object "
        "is refused unless `--trust-pickle`, which executes the file's code and is for trusted files only. A "
        "`.safetensors` file is never unpickled, data files never (`weights_only`, `allow_pickle=False`). Hugging "
        "Face directories load with `local_files_only` and without remote code; nothing is downloaded.",
        "- **Checked before a merge.** Each checkpoint is read once: the recorded SHA-256 is that of the bytes merged. "
        "Its format comes from its content; empty, truncated, corrupt (zip checksums), sparse or quantized files and "
        "tensors are refused, so are FIFOs and devices (never waited on). A tensor must have the dtype kind the model "
        "has (no integer, boolean or complex tensor where it has floats) and finite values. Data must be regular files "
        f"or image folders, numeric and finite, with integer labels in 0..{MAX_CLASSES - 1:,}, at most "
        f"{MAX_INPUT_BYTES >> 30} GiB in memory; decompression bombs (images, `.npz`) are refused before they inflate. "
        f"`--input-shape` is at most {MAX_INPUT_NUMEL:,} values per input.",
        "- **Model directories.** A config is checked against its weight files before anything is built: a model "
        "with more parameters than twice the files hold (`num_hidden_layers: 1000000`, a `hidden_size` of 10**10, "
        "`num_labels` beyond the files) is refused at once, built on the meta device; so are weights the model has no "
        "place for (an extra layer, a config naming the base class of a classifier, zero layers), integer tensors "
        "where the model has floats, NaN or inf weights, and models whose configs differ in anything that changes "
        "the computation (heads, activation, `layer_norm_eps`). Text data is streamed: only the sampled lines are "
        "read, each cut to 64 characters per token of `--max-length` before the tokenizer sees it; labels are "
        "ASCII digits below 1,000,000, attention masks 0 or 1. Each refusal, and a merge of a file with a 100 MB line "
        "or a million lines, stays at the start-up's memory (0.6 GB) and a few seconds "
        "(`python -m benchmarks.investigations.hostile_inputs`).",
        "- **The self-check gates the merge.** One random valid permutation of every merge group must leave model 0's "
        "output unchanged (to 1e-4 of its scale; 2e-2 in half precision), or nothing is merged or written (a "
        "plugin's layer handler that links too little).",
        "- **torchrun.** Every rank must be given the same command line. A rank waits for the others at most "
        "`MUDSC_DIST_TIMEOUT` seconds (default 600), when joining and at every collective: a rank that never starts, "
        "stops or dies ends the others with one line, as does a taken `MASTER_PORT`. Rank 0 writes.",
        "- **Plugins.** A plugin that fails to import (or calls `sys.exit`) or whose hook raises is skipped with a "
        "warning; `MUDSC_PLUGINS` naming a plugin no package provides is warned of.",
        "- **Checked after a merge.** The merged model must be finite (NaN calibration data or overflowing statistics "
        "would otherwise reach BatchNorm), or nothing is written. `mudsc eval` checks a partial (`--stop-at`) "
        f"checkpoint like any other (keys, shapes, dtypes, finite values; at most {MAX_PARTIAL_MODELS} models), its "
        "data like merge does, and refuses labels or `--tasks` classes the model has no output for.",
        "",
    ]


def main() -> None:
    sys.stdout.write(render_cli_reference())


if __name__ == "__main__":
    main()
