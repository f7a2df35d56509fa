"""``mudsc eval MODEL.pt --arch NAME --data SPEC [--tasks 0-4/5-9]``: accuracy of a checkpoint.

A plain checkpoint gives its accuracy on the test split. With ``--tasks`` (disjoint class sets,
one per model that was merged) it gives the joint accuracy (argmax over the union of the
classes) and each task's accuracy (on that task's samples, argmax over its classes). A partial
zip checkpoint written by ``mudsc merge --stop-at`` (one output per model) is rebuilt from its
metadata and evaluated with one head per task. ``mudsc eval DIR --data DATA`` evaluates a
Hugging Face classifier from its directory (:func:`mudsc_cli.hf_cmds.eval_dir`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from mudsc_graph.errors import MudscError

from .archs import build_model, example_or_none, parse_arch_opts, parse_shape, resolve_architecture, resolve_device
from .console import out
from .hf_cmds import input_kind, load_dirs, refuse_options
from .options import ArchOption, ArchOptOption, DeviceOption, InputShapeOption, JsonOption, MaxLengthOption, TrustPickleOption


class EvalCommandError(MudscError):
    """A ``mudsc eval`` argument is wrong."""


def parse_tasks(text: Optional[str], num_classes: Optional[int], *, what: str = "the model") -> Optional[list[list[int]]]:
    """``"0-4/5-9"`` -> ``[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]`` (disjoint class sets, every id below
    ``num_classes``; ``None`` checks only the syntax). ``what`` owns the classes in the error."""
    if not text:
        return None
    from mudsc_graph.io.data import DataError, parse_classes

    tasks = []
    for part in text.split("/"):
        try:
            tasks.append(parse_classes(part, num_classes, what=what))
        except DataError as exc:
            raise EvalCommandError(f"--tasks {_short(text)!r}: {exc}") from None
    seen: set[int] = set()
    for t in tasks:
        if seen & set(t):
            raise EvalCommandError(f"--tasks {_short(text)!r}: the tasks share classes {sorted(seen & set(t))[:10]}; give disjoint sets like 0-4/5-9")
        seen |= set(t)
    return tasks


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _ranges(classes: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts, start = [], None
    for k, c in enumerate(classes):
        if start is None:
            start = c
        if k + 1 == len(classes) or classes[k + 1] != c + 1:
            parts.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(parts)


def _partial_args(meta: dict[str, Any], state: dict[str, Any], source: str) -> Optional[tuple[int, str, str]]:
    """``(n_models, stop_at, tracer)`` of a partial-zip checkpoint from its metadata, checked against
    its tensors before anything is built; ``None`` for a plain checkpoint (no ``stop_at``)."""
    from mudsc_graph.io.partial import check_partial_args

    if meta.get("stop_at") is None:
        return None
    n_models, stop_at = meta.get("n_models"), meta["stop_at"]
    tracer = meta.get("tracer", "auto")
    tracer = "auto" if tracer is None else tracer
    check_partial_args(n_models, stop_at, state, f"{source} (metadata)", tracer)
    return n_models, stop_at, tracer


def check_task_labels(y: Any, task_sets: Optional[list[list[int]]], tasks: Optional[str], data: str, split: str) -> None:
    """With ``--tasks``: every label must be in one of the tasks (a sample no task can predict is
    not silently dropped), and every task must have samples (its accuracy would be NaN)."""
    if not task_sets:
        return
    import torch

    union = sorted(c for t in task_sets for c in t)
    outside = (~torch.isin(y, torch.tensor(union, dtype=y.dtype))).nonzero()
    if len(outside):
        i = int(outside[0, 0])
        base = data.rpartition(":")[0] if ":" in data and not Path(data).expanduser().exists() else data
        raise EvalCommandError(
            f"--data {data} has label {int(y[i])} (sample {i}), which is in none of the --tasks classes ({tasks}); "
            f"evaluate only the tasks' classes (--data {base}:{_ranges(union)}) or add it to --tasks"
        )
    for t in task_sets:
        if not bool(torch.isin(y, torch.tensor(t, dtype=y.dtype)).any()):
            raise EvalCommandError(
                f"task {_ranges(t)} has no samples in --data {data} ({split} split), so its accuracy is undefined; "
                "give data with those classes or leave the task out of --tasks"
            )


def _check_outputs(outputs: Any, name: str) -> None:
    """Logits the metrics can use: one row of finite class scores per sample (per head)."""
    import torch

    heads = outputs if isinstance(outputs, tuple) else (outputs,)
    for k, o in enumerate(heads):
        which = f"output {k} of {name}" if isinstance(outputs, tuple) else name
        if not isinstance(o, torch.Tensor) or o.dim() != 2:
            shape = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
            raise EvalCommandError(f"{which} gives outputs of shape {shape}, not one row of class scores per sample; mudsc eval needs a classifier")
        bad = ~torch.isfinite(o).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            kind = "NaN" if bool(torch.isnan(o[i]).any()) else "inf"
            raise EvalCommandError(f"{which} gives {kind} logits for sample {i}; check the checkpoint's weights and the data's scale")


def _model_of(model_path: Path, architecture: Any, opts: dict[str, Any], state: dict, meta: dict, example: Any, arch: str) -> Any:
    """The checkpoint's model: the architecture with its weights, or the partial-zip model its
    metadata describes; a load error names the ``--arch`` the file was merged with, if another."""
    from mudsc_graph.io.fitting import fit_state_dict
    from mudsc_graph.io.paths import CheckpointError
    from mudsc_graph.errors import MudscError
    from mudsc_graph.io.partial import looks_partial, rebuild_partial
    from mudsc_graph.merging.widths import rebuild

    partial = _partial_args(meta, state, model_path.name)
    merged_with = meta.get("arch")
    hint = f" (the file was merged with --arch {merged_with})" if isinstance(merged_with, str) and merged_with != arch else ""
    try:
        if partial is not None:
            n_models, stop_at, tracer = partial
            model: Any = rebuild_partial(
                lambda: build_model(architecture, opts), n_models, stop_at, example, state, tracer=tracer, source=model_path.name,
            )
        else:
            model = build_model(architecture, opts)
            if meta.get("widths"):  # merged wider than one model: the architecture rebuilt with the merged sizes
                try:
                    rebuild(model, meta["widths"], model_path.name)
                except (ValueError, MudscError) as exc:
                    raise CheckpointError(str(exc)) from None
            try:
                fit_state_dict(model, state, source=model_path.name)
            except CheckpointError:
                if looks_partial(state):
                    raise EvalCommandError(
                        f"{model_path.name} holds a partial-zip model (keys trunk.*, tail0.*, ...) but its metadata has no stop_at, "
                        "so it cannot be rebuilt; write it again with mudsc merge --stop-at"
                    ) from None
                raise
    except CheckpointError as exc:
        if not hint:
            raise
        raise CheckpointError(f"{exc}{hint}") from None
    return model


def eval_command(
    model_path: Annotated[
        Path,
        typer.Argument(help="Checkpoint to evaluate (.pt, .pth, .safetensors), or a Hugging Face classifier's model directory (no --arch).", show_default=False),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="Evaluation data: dataset name, NAME:0-4, a .pt/.npz file (x and y, as for merge) or an image folder; for a Hugging Face text "
            "classifier a text file of LABEL<TAB>text lines or a .pt/.npz file with input_ids and labels.",
            show_default=False,
        ),
    ],
    arch: ArchOption = None,
    arch_opt: ArchOptOption = None,
    tasks: Annotated[
        Optional[str],
        typer.Option(help="Disjoint class sets of the merged models' tasks, e.g. 0-4/5-9: report joint and per-task accuracy.", show_default=False),
    ] = None,
    split: Annotated[str, typer.Option(help="Which split of --data: test or train (a tensor, text or token file is used whole).")] = "test",
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Evaluation batch size.")] = 512,
    input_shape: InputShapeOption = None,
    max_length: MaxLengthOption = 128,
    trust_pickle: TrustPickleOption = False,
    as_json: JsonOption = False,
) -> None:
    """Accuracy of a checkpoint; joint and per-task accuracy of a merged multi-task model."""
    from mudsc_graph.io.checkpoints import load_checkpoint
    from mudsc_graph.io.data import load_data
    from mudsc_experiments.evaluate import accuracy, predict_logits, task_metrics


    if isinstance(batch_size, bool) or batch_size < 1:
        raise EvalCommandError(f"--batch-size must be at least 1, got {batch_size}")
    parse_tasks(tasks, None)  # the syntax, before anything is loaded; the classes are checked against the model below
    if input_kind([model_path]) == "dir":
        refuse_options(arch=arch, arch_opt=arch_opt, input_shape=input_shape, trust_pickle=trust_pickle)
        eval_dir(model_path, data=data, tasks=tasks, split=split, device=device, batch_size=batch_size, max_length=max_length, as_json=as_json)
        return
    if not arch:
        raise EvalCommandError("--arch is required to evaluate a checkpoint file: give the architecture, e.g. --arch resnet20 (see mudsc inspect --list)")
    dev = resolve_device(device)
    opts = parse_arch_opts(arch_opt)
    architecture = resolve_architecture(arch, parse_shape(input_shape))
    state, meta = load_checkpoint(model_path, trust_pickle=trust_pickle)
    example = example_or_none(architecture)
    test = load_data(data, split=split, input_shape=tuple(example[0].shape[1:]) if example else None)
    if example is None:
        example = test.rows(slice(0, 2)) if isinstance(test.x, dict) else (test.x[:2],)
    model = _model_of(model_path, architecture, opts, state, meta, example, arch)
    model = model.to(dev).eval()
    outputs = predict_logits(model, test.x, batch_size=batch_size, device=dev)
    _check_outputs(outputs, model_path.name)
    result: dict[str, Any] = {"model": str(model_path), "data": data, "split": split, "samples": len(test)}
    y = test.y
    if isinstance(outputs, tuple):
        task_sets = parse_tasks(tasks, sum(int(o.shape[1]) for o in outputs), what="the model's heads together")
        if not task_sets or len(task_sets) != len(outputs):
            raise EvalCommandError(
                f"{model_path.name} has {len(outputs)} outputs (a partial merge): give --tasks with {len(outputs)} class sets, e.g. 0-4/5-9"
            )
    else:
        n_out = int(outputs.shape[1])
        beyond = (y >= n_out).nonzero()
        if len(beyond):
            i = int(beyond[0, 0])
            raise EvalCommandError(
                f"--data {data} has label {int(y[i])} (sample {i}) but the model has {n_out} output classes (0-{n_out - 1}); "
                "check --data, and --arch-opt (e.g. num_classes)"
            )
        task_sets = parse_tasks(tasks, n_out)
    check_task_labels(y, task_sets, tasks, data, split)
    if isinstance(outputs, tuple):
        m = task_metrics(outputs, None, y, task_sets, heads="separate")
    elif task_sets:
        m = task_metrics(outputs, None, y, task_sets, heads="shared")
    else:
        m = None
        result["accuracy"] = accuracy(outputs, y)
    report(result, m, task_sets, f"{model_path.name} on {data} ({split}, {len(test)} samples)", as_json)


def report(result: dict[str, Any], m: Any, task_sets: Optional[list[list[int]]], title: str, as_json: bool) -> None:
    """Print the metrics: ``result`` (with ``accuracy``, or the task metrics ``m``) as JSON or a table."""
    if m is not None:
        result.update(joint=m.joint, per_task=list(m.per_task), mean_per_task=m.mean_per_task, tasks=task_sets)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("accuracy", justify="right")
    if m is None:
        table.add_row("accuracy", f"{result['accuracy']:.2%}")
    else:
        table.add_row("joint", f"{m.joint:.2%}")
        for t, acc in zip(task_sets or [], m.per_task):
            table.add_row(f"task {t[0]}-{t[-1]}" if t == list(range(t[0], t[-1] + 1)) else f"task {t}", f"{acc:.2%}")
        table.add_row("mean per task", f"{m.mean_per_task:.2%}")
    out().print(table)


def eval_dir(
    model_dir: Path, *, data: str, tasks: Optional[str], split: str, device: str, batch_size: int, max_length: int, as_json: bool,
) -> None:
    """``mudsc eval DIR --data DATA``: accuracy of a sequence or image classifier in a model directory."""
    import torch

    from mudsc_experiments.evaluate import accuracy, predict_logits, task_metrics
    from mudsc_graph.io.hf import load_model_data


    dev = resolve_device(device)
    (hf,) = load_dirs([model_dir], quiet=True)
    test = load_model_data(hf, data, split=split, max_length=max_length)
    if test.labels is None:
        raise EvalCommandError(
            f"{data} has no labels to evaluate against ({test.unlabelled}); start every line with LABEL<TAB>, "
            "or save 'labels' in the .pt/.npz file"
        )
    logits = predict_logits(hf.model, test.inputs, batch_size=batch_size, device=dev)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if hasattr(logits, "shape") else type(logits).__name__
        raise EvalCommandError(f"{hf.class_name} gives logits of shape {shape}, not one row of class scores per sample; mudsc eval needs a sequence or image classifier")
    n_classes = int(logits.shape[1])
    if len(test.labels) and int(test.labels.max()) >= n_classes:
        raise EvalCommandError(f"{data} has label {int(test.labels.max())} but {hf.class_name} has {n_classes} classes (0-{n_classes - 1})")
    task_sets = parse_tasks(tasks, n_classes)
    check_task_labels(test.labels, task_sets, tasks, data, split)
    result: dict[str, Any] = {"model": str(model_dir), "data": data, "split": split, "samples": len(test)}
    m = task_metrics(logits, None, test.labels, task_sets, heads="shared") if task_sets else None
    if m is None:
        result["accuracy"] = accuracy(logits, test.labels)
    report(result, m, task_sets, f"{model_dir.name} on {data} ({len(test)} samples)", as_json)
