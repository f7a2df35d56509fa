"""``mudsc demo``: the built-in end-to-end run, with no files of the user's.

Trains two models on disjoint halves of a bundled dataset (cached after the first run), merges
them with every method and prints joint and per-task test accuracy (see
:func:`mudsc_graph.experiments.demo.run_demo`). Progress and warnings go to stderr; the table (or ``--json``)
to stdout.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from mudsc_graph.errors import MudscError

from .archs import MAX_SEED
from .console import err, out, print_warning
from .merge_cmd import resolve_device


class DemoCommandError(MudscError):
    """A ``mudsc demo`` argument is wrong."""


def _task_label(classes: list[int]) -> str:
    if classes == list(range(classes[0], classes[-1] + 1)):
        return f"{classes[0]}-{classes[-1]}"
    return ",".join(map(str, classes))


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def demo_command(
    dataset: Annotated[str, typer.Option(help="Bundled dataset whose classes are split into two halves: mnist5k, digits or animal_mnist.")] = "mnist5k",
    arch: Annotated[str, typer.Option("--arch", "-a", help="Registered architecture of both models; its last layer becomes the input of the fixed class-embedding head.")] = "mlp",
    arch_opt: Annotated[
        Optional[list[str]],
        typer.Option("--arch-opt", "-o", metavar="KEY=VALUE", help="Option for the architecture's factory, e.g. hidden=(512,512). Repeat for several.", show_default=False),
    ] = None,
    methods: Annotated[
        str,
        typer.Option(help="Comma-separated merging methods to compare: average, weight_matching, weight_zip, activation_matching, zipit, mudsc-align, mudsc-zip."),
    ] = "average,weight_matching,weight_zip,activation_matching,zipit,mudsc-align,mudsc-zip",
    alpha: Annotated[float, typer.Option(help="Weight of the weight-space similarity in S = alpha*S_weight + (1-alpha)*S_act, used by the mudsc methods.")] = 0.5,
    epochs: Annotated[int, typer.Option(help="Training epochs of each of the two models.")] = 10,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the models' initialisation, the training order, the class embeddings and the merge.")] = 0,
    calib_samples: Annotated[int, typer.Option(min=1, help="Number of training images (from both halves) used as calibration data for every merge.")] = 500,
    cache_dir: Annotated[
        Optional[Path],
        typer.Option(help="Folder where the trained models are cached; the default is $MUDSC_CACHE_DIR or ~/.cache/mudsc/demo.", show_default=False),
    ] = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train the two models again even if the cache has them, and overwrite the cache.")] = False,
    device: Annotated[str, typer.Option(help="Where to train and merge: auto (CUDA when available), cpu or cuda.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout instead of a table.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Show no progress bars.")] = False,
) -> None:
    """Train two models on disjoint class halves of a bundled dataset, merge them with every method, compare."""
    from mudsc_graph.experiments.demo import run_demo

    from .archs import parse_arch_opts
    from .progress import RichReporter

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    if not method_list:
        raise DemoCommandError("--methods is empty; name at least one method, e.g. --methods zipit,mudsc-zip")
    dev = resolve_device(device)
    stderr = err()
    reporter = RichReporter(stderr, enabled=not quiet, keep_finished=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with reporter:
            result = run_demo(
                dataset=dataset, arch=arch, arch_options=parse_arch_opts(arch_opt), methods=method_list, alpha=alpha,
                epochs=epochs, seed=seed, cache_dir=cache_dir, retrain=retrain, calib_samples=calib_samples, device=dev,
                reporter=reporter,
            )
    for message in dict.fromkeys(str(w.message) for w in caught):
        print_warning(message)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    out().print(_table(result))


def _table(result: Any) -> Table:
    cfg = result.config
    source = "trained now" if result.trained else "loaded from the cache"
    hidden = cfg["arch_options"].get("hidden")
    arch = f"{cfg['arch']} {'-'.join(map(str, hidden))}" if hidden else cfg["arch"]
    table = Table(
        title=f"{cfg['dataset']}: two {arch} models, classes {_task_label(result.tasks[0])} and {_task_label(result.tasks[1])}",
        caption=(
            f"test accuracy (%) on {result.samples['test']} images; models {source} ({result.cache_path}); "
            f"{result.samples['calibration']} calibration images"
        ),
    )
    table.add_column("model")
    table.add_column("joint", justify="right")
    table.add_column(f"task {_task_label(result.tasks[0])}", justify="right")
    table.add_column(f"task {_task_label(result.tasks[1])}", justify="right")
    table.add_column("mean per task", justify="right")
    table.add_column("merge s", justify="right")
    for i, row in enumerate(result.rows):
        table.add_row(
            row.name, _pct(row.joint), _pct(row.task_a), _pct(row.task_b), _pct(row.mean_per_task),
            "" if row.merge_seconds is None else f"{row.merge_seconds:.1f}",
            end_section=i + 1 < len(result.rows) and row.kind != result.rows[i + 1].kind,
        )
    return table
