"""``mudsc inspect``: build a registered architecture (or load a Hugging Face model directory) and show its merge groups.

Results go to stdout (a table and a summary, or with ``--json`` the MergeSpec as JSON and
nothing else); warnings, progress and errors go to stderr.
"""

import json
from collections import Counter
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from .archs import TRACER_HELP, build_architecture, check_tracer, parse_arch_opts, parse_shape
from .console import err, out, print_warning
from .hf_cmds import HFCommandError, input_kind, load_dirs, refuse_options
from .options import ArchOption, ArchOptOption, InputShapeOption, JsonOption

#: How many member names a row of the group table shows.
MEMBERS_SHOWN = 3
#: Least width of the "first members" column; it gets what the other columns leave of a wider terminal.
MEMBER_WIDTH = 24
#: Width of every column but "first members", with the borders, when nothing is folded.
_OTHER_COLUMNS = 56


def _list_architectures(as_json: bool) -> None:
    from mudsc_graph.plugin.registry import get_registry

    registry = get_registry()
    rows = [
        {
            "name": a.name,
            "aliases": list(a.aliases),
            "plugin": registry.arch_plugins.get(a.name, ""),
            "description": a.description,
            "defaults": {k: repr(v) for k, v in a.defaults.items()},
        }
        for a in sorted(registry.architectures.values(), key=lambda a: a.name)
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="registered architectures")
    for column in ("name", "aliases", "plugin", "description"):
        table.add_column(column, overflow="fold", no_wrap=column in ("name", "aliases"))
    for r in rows:
        table.add_row(r["name"], ", ".join(r["aliases"]), r["plugin"], r["description"])
    out().print(table)


def _member_label(member: Any) -> str:
    name, axis = member
    return f"{name}:{axis}"


def _groups_table(spec: Any, title: str, width: int = 80) -> Table:
    table = Table(title=title)
    table.add_column("id", justify="right")
    table.add_column("units", justify="right")
    table.add_column("blocks", justify="right")
    table.add_column("fixed", overflow="fold")
    table.add_column("members", justify="right")
    # capped: a Hugging Face model's long member paths are cut instead of squeezing the other columns
    members_width = max(MEMBER_WIDTH, int(width) - _OTHER_COLUMNS)
    table.add_column("first members", no_wrap=True, overflow="ellipsis", max_width=members_width)
    table.add_column("coupled")
    for g in spec.groups:
        fixed = ("fixed: " + g.reason if g.reason else "fixed") if g.fixed else ""
        shown = "\n".join(_member_label(m) for m in g.members[:MEMBERS_SHOWN])
        if len(g.members) > MEMBERS_SHOWN:
            shown += "\n..."
        coupled = ", ".join(str(c) for c in g.coupled)
        table.add_row(str(g.id), str(g.size), str(g.blocks), fixed, str(len(g.members)), shown, coupled)
    return table


def inspect_command(
    model_dir: Annotated[
        Optional[Path],
        typer.Argument(
            help="A Hugging Face model directory (save_pretrained: config.json + weights) to inspect instead of --arch; "
            "it is analysed on example inputs built from its config.",
            show_default=False,
        ),
    ] = None,
    arch: ArchOption = None,
    arch_opt: ArchOptOption = None,
    as_json: JsonOption = False,
    check: Annotated[
        bool,
        typer.Option("--check", help="Also apply three random valid permutations and verify that the output is unchanged."),
    ] = False,
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Fail on an op that no layer handler understands instead of fixing the spaces it touches."),
    ] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the registered architectures and exit.")] = False,
    tracer: Annotated[str, typer.Option(help=TRACER_HELP)] = "auto",
    input_shape: InputShapeOption = None,
) -> None:
    """Show the merge groups that mudsc infers for an architecture or a Hugging Face model directory (--json: the
    MergeSpec alone; with --list, the architectures)."""
    if list_:
        _list_architectures(as_json)
        return
    if model_dir is not None:

        if arch:
            raise HFCommandError(f"give either a model directory ({model_dir}) or --arch {arch}, not both")
        refuse_options(arch_opt=arch_opt, input_shape=input_shape)
        if input_kind([model_dir]) != "dir":
            raise HFCommandError(
                f"{model_dir} is not a directory; mudsc inspect takes a Hugging Face model directory or --arch NAME (see --list)"
            )
        inspect_dir(model_dir, as_json=as_json, check=check, strict=strict, tracer=check_tracer(tracer))
        return
    if not arch:
        raise typer.BadParameter("give an architecture name, a model directory, or --list to see them", param_hint="'--arch'")
    opts = parse_arch_opts(arch_opt)
    stderr = err()
    architecture, model, inputs = build_architecture(arch, opts, parse_shape(input_shape))

    from mudsc_graph import analyze

    with stderr.status(f"analysing {architecture.name} ...", spinner="dots"):
        start = time.perf_counter()
        spec = analyze(model, inputs, strict=strict, tracer=check_tracer(tracer))
        seconds = time.perf_counter() - start
    shown_opts = "".join(f" {k}={v!r}" for k, v in opts.items())
    show_spec(spec, model, inputs, f"merge groups of {architecture.name}{shown_opts}", seconds, as_json=as_json, check=check)


def show_spec(spec: Any, model: Any, inputs: Any, title: str, seconds: float, *, as_json: bool, check: bool) -> None:
    """The spec's warnings, the groups table and summary (or the MergeSpec as JSON), after the self-check when asked."""
    for warning in spec.warnings:
        print_warning(warning)
    stderr = err()
    difference = None
    if check:
        with stderr.status("self-check: permuting every group ...", spinner="dots"):
            difference = spec.check(model, inputs, seed=0)

    if as_json:
        typer.echo(spec.to_json())
        if difference is not None:
            stderr.print(f"self-check passed: max abs difference {difference:.3g}", highlight=False)
        return

    n_fixed = sum(1 for g in spec.groups if g.fixed)
    console = out()
    console.print(_groups_table(spec, title, console.width))
    console.print(
        f"{len(spec.groups)} groups ({len(spec.groups) - n_fixed} permutable, {n_fixed} fixed), "
        f"{spec.permutable_units} permutable units, analysed in {seconds:.2f} s"
    )
    if spec.fixed:  # axes outside every group, each with what it indexes (no silent drop)
        counts = Counter(why for axes in spec.fixed.values() for why in axes.values())
        console.print("parameter axes kept in order outside any group: " + "; ".join(f"{n} x {why}" for why, n in counts.most_common()),
                      highlight=False)
    if difference is not None:
        console.print(f"self-check passed: max abs difference {difference:.3g}")


def inspect_dir(model_dir: Path, *, as_json: bool, check: bool, strict: bool, tracer: str = "auto") -> None:
    """``mudsc inspect DIR``: the merge groups of the model in a directory, analysed on example inputs from its config."""
    from mudsc_graph import analyze
    from mudsc_graph.io.hf import example_inputs


    (hf,) = load_dirs([model_dir], quiet=True)
    inputs = example_inputs(hf)
    stderr = err()
    with stderr.status(f"analysing {hf.class_name} ...", spinner="dots"):
        start = time.perf_counter()
        spec = analyze(hf.model, inputs, strict=strict, tracer=tracer)
        seconds = time.perf_counter() - start
    show_spec(spec, hf.model, inputs, f"merge groups of {hf.class_name} ({model_dir.name})", seconds, as_json=as_json, check=check)
