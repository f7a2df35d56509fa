"""``mudsc merge A.pt B.pt [C.pt ...] --arch NAME --data SPEC --out merged.pt``, or
``mudsc merge DIR_A DIR_B [...] --data SPEC --out DIR_M`` for Hugging Face model directories.

Loads the checkpoints safely, merges them with the chosen method, writes the merged checkpoint
atomically (state_dict plus metadata: arch, method, alpha, source file hashes) and prints a
summary. Progress and warnings go to stderr; the summary to stdout. Model directories are handled
by :func:`mudsc_cli.hf_cmds.merge_dirs` (the class from config.json, a merged directory out).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import typer
from rich.table import Table

from mudsc_graph.errors import MudscError
from mudsc_graph.merging.options import DEFAULTS

from .archs import (
    MAX_SEED, TRACER_HELP, build_model, check_tracer, example_or_none, parse_arch_opts, parse_key_values, parse_shape, resolve_architecture, resolve_device,
)
from .console import UsageError, err, out, print_warning
from .hf_cmds import first_tokenizer, input_kind, load_dirs, refuse_options

METHOD_HELP = (
    "Merging method: average, weight_matching, weight_zip, activation_matching, zipit, mudsc, or any method or matcher "
    "a plugin registers (mudsc plugins lists them)."
)


class MergeCommandError(MudscError):
    """A ``mudsc merge`` argument is wrong."""


def check_output(path: Path, force: bool, inputs: Sequence[Path] = ()) -> Path:
    """Refuse a bad output path before any work is done: the extension, one of ``inputs`` (even with
    ``--force``), a missing or unwritable directory, a name too long for the file system, an
    existing directory, an existing file without ``--force``
    (:func:`mudsc_graph.io.checkpoints.check_output_file`, which ``save_checkpoint`` runs again)."""
    from mudsc_graph.io.checkpoints import CheckpointError, check_output_file

    try:
        return check_output_file(path, force=force, inputs=inputs)
    except CheckpointError as exc:
        raise MergeCommandError(f"--out: {exc}") from exc


def protected_paths(checkpoints: Sequence[Path], data: Optional[str]) -> list[Path]:
    """What ``--out`` must never be: the inputs, and the calibration data file when ``--data`` is one."""
    protected = [Path(p).expanduser() for p in checkpoints]
    if data is not None and Path(data).expanduser().exists():
        protected.append(Path(data).expanduser())
    return protected


def load_models(paths: list[Path], arch: Any, opts: dict[str, Any], trust_pickle: bool) -> tuple[list[Any], list[dict[str, Any]]]:
    """The models, and the ``{"file", "sha256"}`` of each source: the hash of the very bytes its
    weights were loaded from (each file is read once), so a file replaced later is not misrecorded."""
    from mudsc_graph.io.checkpoints import fit_state_dict, read_checkpoint

    models, sources = [], []
    for path in paths:
        ck = read_checkpoint(path, trust_pickle=trust_pickle)
        model = build_model(arch, opts)
        fit_state_dict(model, ck.state, source=path.name)
        models.append(model)
        sources.append({"file": path.name, "sha256": ck.sha256})
    return models, sources


def merge_command(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Two or more checkpoints of one architecture (.pt, .pth, .safetensors), or two or more Hugging Face "
            "model directories (save_pretrained: config.json + weights; no --arch).",
            show_default=False,
        ),
    ],
    out_path: Annotated[
        Path,
        typer.Option("--out", "-O", help="Where to write the merged checkpoint (.pt or .safetensors); for model directories, the merged directory.", show_default=False),
    ],
    arch: Annotated[
        Optional[str],
        typer.Option("--arch", "-a", help="Registered architecture name or alias, package.module:factory or timm:NAME; required for checkpoint files, not used with model directories.", show_default=False),
    ] = None,
    data: Annotated[
        Optional[str],
        typer.Option(
            "--data",
            "-d",
            help="Calibration data: a dataset name (digits, mnist5k, animal_mnist), NAME:0-4 for a class subset, a .pt/.npz file "
            "with x and y (several inputs: x a dict by the forward's parameter names, or arrays x.NAME), or an image folder; "
            "for a Hugging Face text model a text file (one example per line) or a .pt/.npz file with input_ids "
            "(and attention_mask).",
        ),
    ] = None,
    arch_opt: Annotated[
        Optional[list[str]],
        typer.Option("--arch-opt", "-o", metavar="KEY=VALUE", help="Option for the architecture's factory, e.g. num_classes=10. Repeat for several.", show_default=False),
    ] = None,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = DEFAULTS.method,
    mode: Annotated[str, typer.Option(help="Matcher of the mudsc method: align (permutation) or zip (ZipIt! greedy).")] = DEFAULTS.mode,
    alpha: Annotated[float, typer.Option(help="Weight of the weight-space similarity in S = alpha*S_weight + (1-alpha)*S_act (mudsc only).")] = DEFAULTS.alpha,
    matcher_opt: Annotated[
        Optional[list[str]],
        typer.Option("--matcher-opt", metavar="KEY=VALUE", help="A parameter of the matcher, e.g. a=0.3 for zip (mudsc plugins lists "
                     "each matcher's parameters). Repeat for several.", show_default=False),
    ] = None,
    stop_at: Annotated[
        Optional[str],
        typer.Option("--stop-at", help="Partial zip: merge up to this module path (e.g. layer3); after it each model keeps its own layers.", show_default=False),
    ] = None,
    device: Annotated[str, typer.Option(help="Where to compute: auto (CUDA when available), cpu or cuda.")] = "auto",
    samples: Annotated[int, typer.Option(min=1, help="Number of calibration samples taken from the training split of --data.")] = 500,
    batch_size: Annotated[int, typer.Option(min=1, help="Calibration batch size.")] = 100,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the group order in the iterative scheme and of the sample choice.")] = DEFAULTS.seed,
    max_iter: Annotated[int, typer.Option(min=0, help="Most sweeps of the iterative dual-space scheme.")] = DEFAULTS.max_iter,
    patience: Annotated[
        int, typer.Option("--patience", "--tol", min=1, help="Stop after this many sweeps without improvement (--tol: its old name).")
    ] = DEFAULTS.patience,
    reset_bn: Annotated[
        bool, typer.Option("--reset-bn/--no-reset-bn", help="Recompute BatchNorm statistics of the base models and of the merged model on the data.")
    ] = DEFAULTS.reset_bn,
    repair: Annotated[
        bool, typer.Option("--repair/--no-repair", help="REPAIR after merging: give every merged layer's output channels the interpolation of their parents' mean and std on the data.")
    ] = DEFAULTS.repair,
    input_shape: Annotated[Optional[str], typer.Option(help="Shape of one input, e.g. 3,32,32; needed only for a package.module:factory --arch.")] = None,
    max_length: Annotated[int, typer.Option(min=1, help="Text data for a Hugging Face model: at most this many tokens per line (lines are padded to the longest).")] = 128,
    tracer: Annotated[str, typer.Option(help=TRACER_HELP)] = DEFAULTS.tracer,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists (a directory only if it holds a model).")] = False,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow checkpoints that contain pickled Python objects; this executes their code, so only for trusted files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Merge two or more checkpoints (or Hugging Face model directories) of one architecture into one, without training."""
    from mudsc_graph import MergeOptions
    from mudsc_graph.merging.distributed import init_from_env, is_writer, same_on_every_rank
    from mudsc_graph.merging.methods import resolve_method
    from mudsc_graph.plugin.registry import get_registry


    if len(checkpoints) < 2:
        raise UsageError(f"give at least two checkpoints (or model directories) to merge, got {len(checkpoints)}")
    names = get_registry().method_names()
    if method not in names:
        raise MergeCommandError(f"unknown --method {method!r}; choose one of {', '.join(names)}")
    check_tracer(tracer)
    device = init_from_env(resolve_device(device))  # under torchrun: join the process group, this rank's device
    same_on_every_rank("command line", [str(c) for c in checkpoints] + [str(out_path), data, arch, samples, batch_size, seed, method, mode])
    quiet = quiet or not is_writer()
    options = MergeOptions(method=method, mode=mode, alpha=alpha, stop_at=stop_at, seed=seed, max_iter=max_iter, patience=patience,
                           reset_bn=reset_bn, device=device, tracer=tracer, repair=repair,
                           matcher_options=parse_key_values(matcher_opt, "--matcher-opt", "a=0.3"))  # read by the parameters' types
    resolved = resolve_method(get_registry(), options)  # before any work: one line for a bad mode or alpha
    calibration = Calibration(data, samples, batch_size, seed, max_length)
    if input_kind(checkpoints) == "dir":
        refuse_options(arch=arch, arch_opt=arch_opt, input_shape=input_shape, trust_pickle=trust_pickle)
        merge_dirs(checkpoints, out_path, options, calibration, needs_data=resolved.needs_activations, force=force, quiet=quiet, as_json=as_json)
        return
    if not arch:
        raise MergeCommandError("--arch is required to merge checkpoint files: give the architecture, e.g. --arch resnet20 (see mudsc inspect --list)")
    if data is None and (resolved.needs_activations or reset_bn or repair):
        why = (f"--method {method}" if resolved.needs_activations else "--repair" if repair
               else "resetting BatchNorm statistics (or pass --no-reset-bn)")
        raise MergeCommandError(f"{why} needs calibration data: pass --data (e.g. --data mnist5k)")
    protected = protected_paths(checkpoints, data)
    check_output(out_path, force, protected)
    architecture = resolve_architecture(arch, parse_shape(input_shape))
    merge_files(checkpoints, out_path, options, calibration, arch_name=arch, architecture=architecture, arch_options=parse_arch_opts(arch_opt),
                protected=protected, trust_pickle=trust_pickle, force=force, quiet=quiet, as_json=as_json)


@dataclass(frozen=True)
class Calibration:
    """Where the calibration batches come from: ``--data``, ``--samples``, ``--batch-size``, the
    ``--seed`` that picks the samples, and ``--max-length`` for text."""

    data: Optional[str]
    samples: int
    batch_size: int
    seed: int
    max_length: int


def merge_files(
    checkpoints: list[Path], out_path: Path, options: Any, calibration: Calibration, *, arch_name: str, architecture: Any,
    arch_options: dict[str, Any], protected: list[Path], trust_pickle: bool, force: bool, quiet: bool, as_json: bool,
) -> None:
    """Checkpoint files: load them into the architecture, merge, write one checkpoint with metadata."""
    from mudsc_graph.io.checkpoints import save_checkpoint
    from mudsc_graph.io.data import load_data
    from mudsc_graph.merging.distributed import writer_turn

    c = calibration
    started = time.perf_counter()
    with err().status("loading checkpoints ...", spinner="dots") if not quiet else contextlib.nullcontext():
        models, sources = load_models(checkpoints, architecture, arch_options, trust_pickle)
    example = example_or_none(architecture)
    batches = None
    if c.data is not None:
        shape = tuple(example[0].shape[1:]) if example is not None else None
        calib = load_data(c.data, split="train", input_shape=shape, limit=c.samples, seed=c.seed)
        batches = calib.batches(c.batch_size)
        if example is None:
            example = calib.rows(slice(0, 2)) if isinstance(calib.x, dict) else (calib.x[:2],)
    result = run_merge(models, batches, example, options, quiet)
    metadata = {
        "arch": arch_name, "arch_options": arch_options, **merge_metadata(result, options, len(models), c.data),
        "samples": sum(len(y) for _, y in batches) if batches else 0, "sources": sources,
    }
    if not writer_turn():  # torchrun: every rank holds the same merge, rank 0 writes it
        return
    state = {k: v.detach().to("cpu") for k, v in result.model.state_dict().items()}
    written = save_checkpoint(out_path, state, metadata, force=force, inputs=protected)
    report(result, metadata, written, started, options.device, as_json)


def run_merge(models: list[Any], batches: Any, example: Any, options: Any, quiet: bool) -> Any:
    """``mudsc_graph.merge`` with progress bars on stderr; its warnings printed as one line each."""
    import mudsc_graph
    from mudsc_graph.checks import first_non_finite

    from .progress import RichReporter

    reporter = RichReporter(err(), enabled=not quiet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with reporter:
            result = mudsc_graph.merge(models, data=batches, example_inputs=example, options=options, reporter=reporter)
    for w in caught:
        print_warning(str(w.message))
    bad = first_non_finite(result.model.state_dict())
    if bad is not None:  # the library refuses these too: never write one, whatever produced it
        raise MergeCommandError(
            f"the merged model's {bad} has NaN or inf values, so nothing was written: the calibration data or the models "
            "are not finite (or too large; e.g. NaN images poison BatchNorm statistics); check --data and the checkpoints"
        )
    return result


def merge_metadata(result: Any, options: Any, n_models: int, data: Optional[str]) -> dict[str, Any]:
    """What every merged output records about the merge (checkpoint files and model directories)."""
    return {
        "method": result.method, "mode": result.mode, "alpha": result.alpha, "matcher_options": result.matcher_options,
        "stop_at": options.stop_at, "tracer": options.tracer,
        "n_models": n_models, "data": data, "groups_merged": len(result.matchings), "history": result.history,
        "repair": options.repair, "repair_std_ratio": result.repair_std_ratio, "mudsc_version": _version(),
    }


def report(result: Any, metadata: dict[str, Any], written: Path, started: float, device: str, as_json: bool) -> None:
    """The summary on stdout: a table, or JSON with ``--json``."""
    import torch

    summary = {
        **{k: metadata[k] for k in ("method", "mode", "alpha", "stop_at", "n_models", "groups_merged", "repair_std_ratio")},
        "permutable_units": result.spec.permutable_units,
        "sweeps": result.sweeps,
        "score_per_sweep": result.history,
        "timings": result.timings,
        "seconds": time.perf_counter() - started,
        "out": str(written),
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary, torch.device(device))


def _print_summary(s: dict, device: Any) -> None:
    table = Table(title=f"merged {s['n_models']} models: {s['method']}" + (f" ({s['mode']}, alpha={s['alpha']})" if s["method"] == "mudsc" else ""))
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("groups merged", f"{s['groups_merged']} ({s['permutable_units']} permutable units)")
    if s["stop_at"]:
        table.add_row("partial zip", f"merged up to {s['stop_at']}, one output per model")
    if s["score_per_sweep"]:
        shown = ", ".join(f"{x:.4f}" for x in s["score_per_sweep"][:12])
        more = " ..." if len(s["score_per_sweep"]) > 12 else ""
        table.add_row("score per sweep", f"{shown}{more} (best {max(s['score_per_sweep']):.4f})")
    if s["repair_std_ratio"] is not None:
        table.add_row("REPAIR", f"merged std / parents' before repair: {s['repair_std_ratio']:.3f} (restored)")
    for stage, seconds in s["timings"].items():
        table.add_row(f"time: {stage}", f"{seconds:.2f} s")
    table.add_row("total", f"{s['seconds']:.2f} s on {device}")
    table.add_row("written", s["out"])
    out().print(table)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mudsc")
    except PackageNotFoundError:
        return "unknown"




def merge_dirs(dirs: list[Path], out_path: Path, options: Any, calibration: Any, *, needs_data: bool, force: bool, quiet: bool,
               as_json: bool) -> None:
    """``mudsc merge DIR_A DIR_B ... --out DIR_M``: see :func:`mudsc_cli.merge_cmd.merge_command`."""
    from mudsc_graph.io.checkpoints import SAVE_SUFFIXES
    from mudsc_graph.io.hf import EXTRA_FILES, check_output_dir, check_same_architecture, example_inputs, load_model_data, save_model_dir
    from mudsc_graph.merging.batchnorm import has_batchnorm
    from mudsc_graph.merging.distributed import writer_turn


    c = calibration
    if options.stop_at:
        raise MergeCommandError(
            "--stop-at does not work with Hugging Face model directories yet: a partial-zip model returns one output "
            "per model, is not a Hugging Face class and cannot be saved with save_pretrained; merge the whole model, "
            "or use the library (mudsc_graph.merge(..., stop_at=...)) and save its state_dict"
        )
    if c.data is None and (needs_data or options.repair):
        why = "--repair" if options.repair and not needs_data else f"--method {options.method}"
        raise MergeCommandError(f"{why} needs calibration data: pass --data (a text file, or a .pt/.npz with input_ids)")
    if out_path.suffix.lower() in SAVE_SUFFIXES:
        raise MergeCommandError(
            f"--out {out_path} looks like a checkpoint file, but merging model directories writes a model directory; "
            "give a directory name (e.g. --out merged)"
        )
    protected: list[Any] = list(dirs)
    if c.data is not None and Path(c.data).expanduser().exists():
        protected.append(Path(c.data).expanduser())
    check_output_dir(out_path, force=force, inputs=protected)

    started = time.perf_counter()
    models = load_dirs(dirs, quiet)
    check_same_architecture(models)
    if c.data is None and options.reset_bn and any(has_batchnorm(m.model) for m in models):
        raise MergeCommandError("resetting BatchNorm statistics needs calibration data: pass --data (or pass --no-reset-bn)")
    first = models[0]
    tokenizer = first_tokenizer(first.path)
    batches = None
    if c.data is not None:
        calib = load_model_data(first, c.data, split="train", max_length=c.max_length, tokenizer=tokenizer, limit=c.samples, seed=c.seed)
        batches = calib.batches(c.batch_size)
        example: Any = calib.example(2)
    else:
        example = example_inputs(first)
    result = run_merge([m.model for m in models], batches, example, options, quiet)
    metadata = {
        "format": "huggingface", "arch": first.class_name, "model_type": getattr(first.config, "model_type", None),
        **merge_metadata(result, options, len(models), c.data),
        "samples": sum(len(next(iter(b.values()))) for b in batches) if batches else 0,
        "max_length": c.max_length if first.main_input == "input_ids" and c.data is not None else None,
        "seed": options.seed, "sources": [m.source() for m in models],
    }
    if not writer_turn():  # torchrun: every rank holds the same merge, rank 0 writes it
        return
    extras = [first.path / name for name in EXTRA_FILES if (first.path / name).is_file()]
    written = save_model_dir(result.model.to("cpu"), out_path, metadata=metadata, tokenizer=tokenizer, force=force, inputs=protected,
                             extra_files=extras)
    report(result, metadata, written, started, options.device, as_json)
