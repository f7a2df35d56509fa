"""Hugging Face model directories on the command line: ``mudsc merge DIR_A DIR_B --out DIR_M``,
``mudsc eval DIR --data DATA``, ``mudsc inspect DIR``.

What the commands in ``merge_cmd``, ``eval_cmd`` and ``inspect_cmd`` share about directories (which
kind of input they were given, options that do not apply, loading); the work (loading, data,
example inputs, atomic saving) is in :mod:`mudsc_graph.io.hf`. Nothing here imports a command.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

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
        "model_arch_opt": "each model's sizes come from its directory's config.json",
        "input_shape": "example inputs are built from the directory's config.json",
        "trust_pickle": "transformers loads .bin weights with weights_only, and never unpickles code",
    }
    for name, value in given.items():
        if value:
            flag = "--" + name.replace("_", "-")
            raise HFCommandError(f"{flag} does not apply to a Hugging Face model directory: {why[name]}; leave it out")


def load_dirs(paths: Sequence[Path], quiet: bool) -> list[Any]:
    from mudsc_graph.io.hf import check_model_dir, load_model_dir, require_transformers

    dirs = [check_model_dir(p) for p in paths]
    require_transformers(dirs[0])
    stderr = err()
    with stderr.status("loading models ...", spinner="dots") if not quiet else contextlib.nullcontext():
        return [load_model_dir(d) for d in dirs]


def first_tokenizer(path: Path) -> Any:
    from mudsc_graph.io.hf import has_tokenizer, load_tokenizer

    return load_tokenizer(path) if has_tokenizer(path) else None
