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
from typing import Annotated, Any, Optional, Protocol, Sequence

import typer
from rich.table import Table

from mudsc_graph.errors import MudscError
from mudsc_graph.merging.options import DEFAULTS

from .archs import (
    MAX_SEED, TRACER_HELP, build_model, check_tracer, example_or_none, parse_arch_opts, parse_key_values, parse_model_arch_opts, parse_shape, resolve_architecture, resolve_device,
)
from .console import UsageError, err, out, print_warning, version
from .options import ArchOption, ArchOptOption, DeviceOption, InputShapeOption, JsonOption, MaxLengthOption, QuietOption, TrustPickleOption
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
    (:func:`mudsc_graph.io.paths.check_output_file`, which ``save_checkpoint`` runs again)."""
    from mudsc_graph.io.paths import CheckpointError, check_output_file

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


def load_models(paths: list[Path], arch: Any, opts: "dict[str, Any] | list[dict[str, Any]]",
                trust_pickle: bool) -> tuple[list[Any], list[dict[str, Any]]]:
    """The models (``opts``: the architecture's options, or one dict per model), and the ``{"file",
    "sha256"}`` of each source: the hash of the very bytes its weights were loaded from (each file
    is read once), so a file replaced later is not misrecorded."""
    from mudsc_graph.io.checkpoints import read_checkpoint
    from mudsc_graph.io.fitting import fit_state_dict

    per_model = opts if isinstance(opts, list) else [opts] * len(paths)
    models, sources = [], []
    for path, own in zip(paths, per_model):
        ck = read_checkpoint(path, trust_pickle=trust_pickle)
        model = build_model(arch, own)
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
    arch: ArchOption = None,
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
    arch_opt: ArchOptOption = None,
    model_arch_opt: Annotated[
        Optional[list[str]],
        typer.Option("--model-arch-opt", metavar="I:KEY=VALUE", help="An architecture option of model I alone (0: the first "
                     "checkpoint), over --arch-opt, for models of different widths: e.g. --arch-opt width=2 --model-arch-opt "
                     "1:width=4. The merged model has model 0's sizes (times --width). Repeat for several.", show_default=False),
    ] = None,
    depth_alignment: Annotated[
        Optional[list[str]],
        typer.Option("--depth-alignment", metavar="I:CHAIN=K,K,...", help="For models of different depths: the blocks model I "
                     "keeps of a chain, instead of the alignment found on the data (the merge prints the one it found), e.g. "
                     "1:layer2=0,2,3. Repeat for several.", show_default=False),
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
    device: DeviceOption = "auto",
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
    refit: Annotated[
        bool, typer.Option("--refit/--no-refit", help="Least-squares refit after merging: each merged Linear/Conv2d, front to back, fitted in closed form "
                           "to reproduce its parents' outputs on the data (a forward pass of each model, plus each layer's Gram matrix).")
    ] = DEFAULTS.refit,
    width: Annotated[
        Optional[list[str]],
        typer.Option("--width", metavar="W|NAME=W", help="Width budget: the merged model this many times as wide as one model "
                     "(up to the number of models; the least similar units are left unmerged; below 1, zip narrows), e.g. --width 1.5; or NAME=W for "
                     "the groups a module or parameter produces (repeat for several; see mudsc inspect). Groups the model's code "
                     "cannot widen stay at one model's width, with a warning.", show_default=False),
    ] = None,
    input_shape: InputShapeOption = None,
    max_length: MaxLengthOption = 128,
    tracer: Annotated[str, typer.Option(help=TRACER_HELP)] = DEFAULTS.tracer,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists (a directory only if it holds a model).")] = False,
    trust_pickle: TrustPickleOption = False,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
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
                           reset_bn=reset_bn, device=device, tracer=tracer, repair=repair, refit=refit, width=parse_width(width),
                           depth_alignment=parse_depth_alignment(depth_alignment),
                           matcher_options=parse_key_values(matcher_opt, "--matcher-opt", "a=0.3"))  # read by the parameters' types
    resolved = resolve_method(get_registry(), options)  # before any work: one line for a bad mode or alpha
    choice = DataChoice(data, samples, batch_size, seed, max_length)
    source: Source
    if input_kind(checkpoints) == "dir":
        refuse_options(arch=arch, arch_opt=arch_opt, model_arch_opt=model_arch_opt, input_shape=input_shape, trust_pickle=trust_pickle)
        source = ModelDirs(list(checkpoints), options)
    else:
        if not arch:
            raise MergeCommandError("--arch is required to merge checkpoint files: give the architecture, e.g. --arch resnet20 (see mudsc inspect --list)")
        common = parse_arch_opts(arch_opt)
        own = [{**common, **mine} for mine in parse_model_arch_opts(model_arch_opt, len(checkpoints))]
        source = CheckpointFiles(list(checkpoints), arch, common, parse_shape(input_shape), trust_pickle, own)
    merge_sources(source, out_path, options, choice, needs_data=resolved.needs_activations, force=force, quiet=quiet, as_json=as_json)


@dataclass(frozen=True)
class DataChoice:
    """Where the calibration batches come from: ``--data``, ``--samples``, ``--batch-size``, the
    ``--seed`` that picks the samples, and ``--max-length`` for text."""

    data: Optional[str]
    samples: int
    batch_size: int
    seed: int
    max_length: int


class Source(Protocol):
    """What ``mudsc merge`` merges (:class:`CheckpointFiles`, :class:`ModelDirs`): one pipeline
    (:func:`merge_sources`) checks, loads, calibrates, merges and saves any of them."""

    paths: list[Path]
    #: how ``--data`` is given for these inputs, for the message when it is missing
    data_hint: str

    def check_output(self, out: Path, force: bool, protected: list[Path]) -> None:
        """Refuse a bad ``--out`` (and options these inputs cannot honour) before any work."""

    def load(self, quiet: bool) -> list[Any]:
        """The models, each source read once."""

    def data(self, choice: DataChoice) -> tuple[Any, Any]:
        """``(calibration data with len() and batches(size), or None; the example inputs)``."""

    def metadata(self, choice: DataChoice) -> dict[str, Any]:
        """What the output records about its inputs (architecture, sources and their hashes)."""

    def save(self, result: Any, out: Path, metadata: dict[str, Any], *, force: bool, protected: list[Path]) -> Path:
        """Write the merged model atomically; the path written."""


def merge_sources(source: Source, out_path: Path, options: Any, choice: DataChoice, *, needs_data: bool, force: bool,
                  quiet: bool, as_json: bool) -> None:
    """The one merge pipeline of the command line: check the output, load, calibrate, merge, record
    the metadata, save (rank 0 alone under torchrun), report."""
    from mudsc_graph.merging.batchnorm import has_batchnorm
    from mudsc_graph.merging.distributed import writer_turn

    if choice.data is None and (needs_data or options.repair or options.refit):
        why = f"--method {options.method}" if needs_data else "--repair" if options.repair else "--refit"
        raise MergeCommandError(f"{why} needs calibration data: pass --data ({source.data_hint})")
    if options.stop_at and options.width != 1.0:
        raise MergeCommandError("--width with --stop-at cannot be written to a file yet (a partial-zip file is rebuilt at one "
                                "model's width); give one of them, or use the library (mudsc_graph.merge(..., stop_at=..., width=...))")
    protected = protected_paths(source.paths, choice.data)
    source.check_output(out_path, force, protected)
    started = time.perf_counter()
    models = source.load(quiet)
    first = {k: tuple(v.shape) for k, v in models[0].state_dict().items()}  # what the output's sizes are told against
    if choice.data is None and options.reset_bn and any(has_batchnorm(m) for m in models):
        raise MergeCommandError("resetting BatchNorm statistics needs calibration data: pass --data (or pass --no-reset-bn)")
    data, example = source.data(choice)
    batches = data.batches(choice.batch_size) if data is not None else None
    result = run_merge(models, batches, example, options, quiet)
    if result.own_heads is not None:
        raise MergeCommandError(f"the models' output layers differ (other label spaces), so each keeps its own from {result.own_heads} "
                                "on and the merge returns one output per model; mudsc merge cannot write such a model yet: use the "
                                "library (mudsc_graph.merge) and save its state_dict")
    metadata = {**source.metadata(choice), **merge_metadata(result, options, len(models), choice.data, first),
                "samples": len(data) if data is not None else 0}
    if not writer_turn():  # torchrun: every rank holds the same merge, rank 0 writes it
        return
    written = source.save(result, out_path, metadata, force=force, protected=protected)
    report(result, metadata, written, started, options.device, as_json)


@dataclass
class CheckpointFiles:
    """Checkpoint files of one architecture (``--arch``, ``--arch-opt``): loaded into it, merged into
    one checkpoint with metadata."""

    paths: list[Path]
    arch_name: str
    arch_options: dict[str, Any]
    input_shape: Optional[tuple[int, ...]]
    trust_pickle: bool
    model_options: Optional[list[dict[str, Any]]] = None  # each model's options (--model-arch-opt over --arch-opt)
    data_hint = "e.g. --data mnist5k"

    def check_output(self, out: Path, force: bool, protected: list[Path]) -> None:
        check_output(out, force, protected)
        self.architecture = resolve_architecture(self.arch_name, self.input_shape)

    def load(self, quiet: bool) -> list[Any]:
        with err().status("loading checkpoints ...", spinner="dots") if not quiet else contextlib.nullcontext():
            models, self.sources = load_models(self.paths, self.architecture, self.model_options or self.arch_options,
                                               self.trust_pickle)
        return models

    def data(self, choice: DataChoice) -> tuple[Any, Any]:
        from mudsc_graph.io.data import load_data

        example = example_or_none(self.architecture)
        if choice.data is None:
            return None, example
        shape = tuple(example[0].shape[1:]) if example is not None else None
        data = load_data(choice.data, split="train", input_shape=shape, limit=choice.samples, seed=choice.seed)
        if example is None:
            example = data.rows(slice(0, 2)) if isinstance(data.x, dict) else (data.x[:2],)
        return data, example

    def metadata(self, choice: DataChoice) -> dict[str, Any]:
        per_model = self.model_options if self.model_options and any(o != self.arch_options for o in self.model_options) else None
        return {"arch": self.arch_name, "arch_options": self.arch_options, "model_arch_options": per_model, "sources": self.sources}

    def save(self, result: Any, out: Path, metadata: dict[str, Any], *, force: bool, protected: list[Path]) -> Path:
        from mudsc_graph.io.checkpoints import save_checkpoint

        state = {k: v.detach().to("cpu") for k, v in result.model.state_dict().items()}
        return save_checkpoint(out, state, metadata, force=force, inputs=protected)


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


def parse_width(items: Optional[list[str]]) -> Any:
    """``--width 1.5`` -> 1.5; ``--width layer1=1.5 --width 3=2`` -> ``{"layer1": 1.5, 3: 2.0}`` (a
    group id or a module/parameter name); nothing -> 1 (one model's width)."""
    if not items:
        return 1.0
    plain = [i for i in items if "=" not in i]
    named = [i for i in items if "=" in i]
    if plain and (named or len(plain) > 1):
        raise MergeCommandError("give --width once as a number (e.g. --width 1.5), or as NAME=W entries for some groups, not both")

    def number(text: str, item: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise MergeCommandError(f"--width {item!r}: {text!r} is not a number (e.g. --width 1.5 or --width layer1=1.5)") from None

    if plain:
        return number(plain[0], plain[0])
    out: dict[Any, float] = {}
    for item in named:
        key, _, value = item.partition("=")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = number(value.strip(), item)
    return out


def parse_depth_alignment(items: Optional[list[str]]) -> Optional[dict[int, dict[str, list[int]]]]:
    """``["1:layer2=0,2,3"]`` -> ``{1: {"layer2": [0, 2, 3]}}``; nothing -> None."""
    if not items:
        return None
    out: dict[int, dict[str, list[int]]] = {}
    for item in items:
        index, _, rest = item.partition(":")
        chain, _, blocks = rest.partition("=")
        try:
            kept = [int(k) for k in blocks.split(",")]
        except ValueError:
            kept = []
        if not index.strip().isdigit() or not chain.strip() or not kept:
            raise MergeCommandError(f"--depth-alignment {item!r} is not I:CHAIN=K,K,... (for example --depth-alignment 1:layer2=0,2,3)")
        out.setdefault(int(index), {})[chain.strip()] = kept
    return out


def width_metadata(result: Any, first: dict[str, tuple[int, ...]]) -> Optional[dict[str, Any]]:
    """What rebuilds the merged model from model 0's architecture when its sizes differ from model
    0's (``first``: its tensors' shapes; a width budget, or models of different widths): every tensor
    of another shape and every attention layer's new head count (``{"shapes": {name: shape},
    "heads": {path: [old, new, size]}}``)."""
    from mudsc_graph.merging.widths import head_changes

    shapes = {k: list(v.shape) for k, v in result.model.state_dict().items() if k in first and tuple(v.shape) != first[k]}
    if not shapes:
        return None
    return {"shapes": shapes, "heads": {k: list(v) for k, v in head_changes(result.spec, result.widths).items()},
            "units": {str(g): u for g, u in sorted(result.widths.items())}}


def merge_metadata(result: Any, options: Any, n_models: int, data: Optional[str], first: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """What every merged output records about the merge (checkpoint files and model directories)."""
    return {
        "method": result.method, "mode": result.mode, "alpha": result.alpha, "matcher_options": result.matcher_options,
        "stop_at": options.stop_at, "tracer": options.tracer,
        "n_models": n_models, "data": data, "groups_merged": len(result.matchings), "history": result.history,
        "repair": options.repair, "repair_std_ratio": result.repair_std_ratio,
        "refit": options.refit, "refit_residual": list(result.refit.mean()) if result.refit is not None else None,
        "width": options.width if not isinstance(options.width, dict) else {str(k): v for k, v in options.width.items()},
        "widths": width_metadata(result, first), "mudsc_version": version(),
        "depth_alignment": {str(i): kept for i, kept in result.depth_alignment.items()} or None,
    }


def report(result: Any, metadata: dict[str, Any], written: Path, started: float, device: str, as_json: bool) -> None:
    """The summary on stdout: a table, or JSON with ``--json``."""
    import torch

    summary = {
        **{k: metadata[k] for k in ("method", "mode", "alpha", "stop_at", "n_models", "groups_merged", "repair_std_ratio", "refit_residual",
                                    "width")},
        "widened_groups": len(result.widths),
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
    if s["widened_groups"]:
        table.add_row("width", f"{s['widened_groups']} groups merged wider than one model (--width {s['width']})")
    if s["refit_residual"] is not None:
        before, after = s["refit_residual"]
        table.add_row("refit", f"layers' residual against their parents: {before:.4f} -> {after:.4f} (relative, mean over layers)")
    if s["repair_std_ratio"] is not None:
        table.add_row("REPAIR", f"merged std / parents' before repair: {s['repair_std_ratio']:.3f} (restored)")
    for stage, seconds in s["timings"].items():
        table.add_row(f"time: {stage}", f"{seconds:.2f} s")
    table.add_row("total", f"{s['seconds']:.2f} s on {device}")
    table.add_row("written", s["out"])
    out().print(table)






@dataclass
class ModelDirs:
    """Hugging Face model directories (the class from config.json): merged into a model directory
    (``save_pretrained``) with the first model's tokenizer and extra files."""

    paths: list[Path]
    options: Any
    data_hint = "a text file, or a .pt/.npz with input_ids"

    def check_output(self, out: Path, force: bool, protected: list[Path]) -> None:
        from mudsc_graph.io.hf import check_output_dir
        from mudsc_graph.io.paths import SAVE_SUFFIXES

        if self.options.stop_at:
            raise MergeCommandError(
                "--stop-at does not work with Hugging Face model directories yet: a partial-zip model returns one output "
                "per model, is not a Hugging Face class and cannot be saved with save_pretrained; merge the whole model, "
                "or use the library (mudsc_graph.merge(..., stop_at=...)) and save its state_dict"
            )
        if out.suffix.lower() in SAVE_SUFFIXES:
            raise MergeCommandError(
                f"--out {out} looks like a checkpoint file, but merging model directories writes a model directory; "
                "give a directory name (e.g. --out merged)"
            )
        check_output_dir(out, force=force, inputs=protected)

    def load(self, quiet: bool) -> list[Any]:
        from mudsc_graph.io.hf import check_same_architecture

        self.models = load_dirs(self.paths, quiet)
        check_same_architecture(self.models)
        self.tokenizer = first_tokenizer(self.models[0].path)
        return [m.model for m in self.models]

    def data(self, choice: DataChoice) -> tuple[Any, Any]:
        from mudsc_graph.io.hf import example_inputs, load_model_data

        first = self.models[0]
        if choice.data is None:
            return None, example_inputs(first)
        data = load_model_data(first, choice.data, split="train", max_length=choice.max_length, tokenizer=self.tokenizer,
                               limit=choice.samples, seed=choice.seed)
        return data, data.example(2)

    def metadata(self, choice: DataChoice) -> dict[str, Any]:
        first = self.models[0]
        return {
            "format": "huggingface", "arch": first.class_name, "model_type": getattr(first.config, "model_type", None),
            "max_length": choice.max_length if first.main_input == "input_ids" and choice.data is not None else None,
            "seed": self.options.seed, "sources": [m.source() for m in self.models],
        }

    def save(self, result: Any, out: Path, metadata: dict[str, Any], *, force: bool, protected: list[Path]) -> Path:
        from mudsc_graph.io.hf import EXTRA_FILES, save_model_dir

        first = self.models[0].path
        extras = [first / name for name in EXTRA_FILES if (first / name).is_file()]
        return save_model_dir(result.model.to("cpu"), out, metadata=metadata, tokenizer=self.tokenizer, force=force,
                              inputs=protected, extra_files=extras)
