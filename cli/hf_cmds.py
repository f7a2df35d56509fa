"""Hugging Face model directories on the command line: ``mudsc merge DIR_A DIR_B --out DIR_M``,
``mudsc eval DIR --data DATA``, ``mudsc inspect DIR``.

The commands in ``merge_cmd``, ``eval_cmd`` and ``inspect_cmd`` hand a directory to these
functions; the work (loading, data, example inputs, atomic saving) is in :mod:`mudsc_graph.io.hf`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence


from mudsc_graph.errors import MudscError

from .console import err


class HFCommandError(MudscError):
    """A command-line argument does not go with a Hugging Face model directory."""


def input_kind(paths: Sequence[Path]) -> str:
    """``"dir"`` when the existing paths are directories (Hugging Face model directories), ``"file"``
    when they are files (or none exists); a missing path that looks like a hub id
    (``bert-base-uncased``, ``org/name``) is an error, and so are directories mixed with files."""
    from mudsc_graph.io.hf import hub_id_error, looks_like_hub_id

    dirs, files = [], []
    for p in paths:
        if p.expanduser().is_dir():
            dirs.append(str(p))
        elif p.expanduser().exists():
            files.append(str(p))
        elif looks_like_hub_id(str(p)):
            raise hub_id_error(str(p))
    if dirs and files:
        raise HFCommandError(
            f"the inputs mix Hugging Face model directories ({', '.join(dirs)}) and checkpoint files ({', '.join(files)}); "
            "give only directories (no --arch) or only checkpoint files (with --arch)"
        )
    return "dir" if dirs else "file"


def refuse_options(**given: Any) -> None:
    """Options of the checkpoint path that mean nothing for a model directory."""
    why = {
        "arch": "the model class comes from the directory's config.json",
        "arch_opt": "the model comes from the directory's config.json",
        "input_shape": "example inputs are built from the directory's config.json",
        "trust_pickle": "transformers loads .bin weights with weights_only, and never unpickles code",
    }
    for name, value in given.items():
        if value:
            flag = "--" + name.replace("_", "-")
            raise HFCommandError(f"{flag} does not apply to a Hugging Face model directory: {why[name]}; leave it out")


def _load(paths: Sequence[Path], quiet: bool) -> list[Any]:
    from mudsc_graph.io.hf import check_model_dir, load_model_dir, require_transformers

    dirs = [check_model_dir(p) for p in paths]
    require_transformers(dirs[0])
    stderr = err()
    with stderr.status("loading models ...", spinner="dots") if not quiet else _nothing():
        return [load_model_dir(d) for d in dirs]


def _first_tokenizer(path: Path) -> Any:
    from mudsc_graph.io.hf import has_tokenizer, load_tokenizer

    return load_tokenizer(path) if has_tokenizer(path) else None


def merge_dirs(dirs: list[Path], out_path: Path, options: Any, calibration: Any, *, needs_data: bool, force: bool, quiet: bool,
               as_json: bool) -> None:
    """``mudsc merge DIR_A DIR_B ... --out DIR_M``: see :func:`mudsc_cli.merge_cmd.merge_command`."""
    from mudsc_graph.io.checkpoints import SAVE_SUFFIXES
    from mudsc_graph.io.hf import EXTRA_FILES, check_output_dir, check_same_architecture, example_inputs, load_model_data, save_model_dir
    from mudsc_graph.merging.batchnorm import has_batchnorm
    from mudsc_graph.merging.distributed import writer_turn

    from .merge_cmd import MergeCommandError, merge_metadata, report, run_merge

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
    models = _load(dirs, quiet)
    check_same_architecture(models)
    if c.data is None and options.reset_bn and any(has_batchnorm(m.model) for m in models):
        raise MergeCommandError("resetting BatchNorm statistics needs calibration data: pass --data (or pass --no-reset-bn)")
    first = models[0]
    tokenizer = _first_tokenizer(first.path)
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


def eval_dir(
    model_dir: Path, *, data: str, tasks: Optional[str], split: str, device: str, batch_size: int, max_length: int, as_json: bool,
) -> None:
    """``mudsc eval DIR --data DATA``: accuracy of a sequence or image classifier in a model directory."""
    import torch

    from mudsc_graph.experiments.evaluate import accuracy, predict_logits, task_metrics
    from mudsc_graph.io.hf import load_model_data

    from .eval_cmd import EvalCommandError, check_task_labels, parse_tasks, report
    from .merge_cmd import resolve_device

    dev = resolve_device(device)
    (hf,) = _load([model_dir], quiet=True)
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


def inspect_dir(model_dir: Path, *, as_json: bool, check: bool, strict: bool, tracer: str = "auto") -> None:
    """``mudsc inspect DIR``: the merge groups of the model in a directory, analysed on example inputs from its config."""
    from mudsc_graph import analyze
    from mudsc_graph.io.hf import example_inputs

    from .inspect_cmd import show_spec

    (hf,) = _load([model_dir], quiet=True)
    inputs = example_inputs(hf)
    stderr = err()
    with stderr.status(f"analysing {hf.class_name} ...", spinner="dots"):
        start = time.perf_counter()
        spec = analyze(hf.model, inputs, strict=strict, tracer=tracer)
        seconds = time.perf_counter() - start
    show_spec(spec, hf.model, inputs, f"merge groups of {hf.class_name} ({model_dir.name})", seconds, as_json=as_json, check=check)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
