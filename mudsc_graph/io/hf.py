"""Hugging Face model directories (what ``save_pretrained`` writes): loading, data, example inputs, saving.

transformers is imported inside the functions that need it, never at import, so ``import
mudsc_graph`` works without it (``pip install 'mudsc[hf]'`` adds it). Nothing is ever downloaded
and no remote code runs: directories are loaded with ``local_files_only=True`` and
``trust_remote_code=False`` (so transformers never even asks), ``.bin`` weights with
``weights_only=True``.

    >>> a, b = load_model_dir("runs/bert-a"), load_model_dir("runs/bert-b")  # eval mode, weights hashed
    >>> check_same_architecture([a, b])
    >>> tok = load_tokenizer("runs/bert-a")
    >>> calib = load_text_file(tok, "calib.txt", max_length=128, samples=500, seed=0)
    >>> result = merge([a.model, b.model], data=calib.batches(100), example_inputs=calib.example())
    >>> save_model_dir(result.model, "merged", tokenizer=tok, metadata={"method": "mudsc"})

A text file has one example per line, optionally prefixed by an integer label and a TAB
(``2\\tsome text``); only the lines taken are read, tokenised with the model's tokenizer and padded
to the longest of them, so that every batch has one sequence length. A token file
(``.pt``/``.npz``) holds ``input_ids``, optionally ``attention_mask`` and ``labels``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..checks import first_non_finite
from ..errors import MudscError, first_line
from ..merging.api import config_differences, only_sizes
from ..merging.calibration import (
    LABEL_KEYS,  # label columns of a token file, tried in this order
)
from .atomic import cleanup_on_termination, fsync_dir
from .paths import CheckpointError, check_not_an_input, check_output_parent, file_sha256, temp_path

#: What makes a directory a Hugging Face model directory.
CONFIG_FILE = "config.json"
#: The metadata file that ``mudsc merge`` writes into a merged directory.
META_FILE = "mudsc.json"
#: Weight files in the order transformers prefers them: (single file, shard index).
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json"))
#: Any of these in a directory means it has a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.model",
)
#: Files of a model directory besides config, weights and tokenizer that a merged directory keeps.
EXTRA_FILES = ("preprocessor_config.json",)
#: Suffixes of checkpoint and data files: a missing path with one is a missing file, not a hub id.
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz", ".txt", ".json")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
#: Sequence length of the example inputs built from a text model's config.
EXAMPLE_LENGTH = 8


class HFError(MudscError):
    """A Hugging Face model directory cannot be loaded, merged or written, or its data does not fit."""


# --------------------------------------------------------------------------- paths


def looks_like_hub_id(text: str) -> bool:
    """``bert-base-uncased`` or ``org/name``, and no such local path: a name on the Hugging Face hub."""
    text = str(text)
    if Path(text).expanduser().exists() or text.lower().endswith(_FILE_SUFFIXES):
        return False
    return _HUB_ID.fullmatch(text) is not None


def hub_id_error(text: str) -> HFError:
    return HFError(
        f"{text} is not a local directory: mudsc never downloads models; save the model with save_pretrained "
        "(or download it yourself) and pass the directory"
    )


def check_model_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as an existing Hugging Face model directory, else one clear :class:`HFError`."""
    p = Path(path).expanduser()
    if not p.exists():
        if looks_like_hub_id(str(path)):
            raise hub_id_error(str(path))
        raise HFError(f"no such directory: {p}; check the path")
    if not p.is_dir():
        raise HFError(f"{p} is not a directory; pass a directory written by save_pretrained")
    if not (p / CONFIG_FILE).is_file():
        raise HFError(
            f"{p} is a directory without {CONFIG_FILE}, so not a Hugging Face model directory; pass a directory "
            "written by save_pretrained (config.json + weights), or the checkpoint file inside it with --arch"
        )
    return p


def require_transformers(path: str | os.PathLike[str]) -> Any:
    """The transformers module, or an :class:`HFError` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise HFError(f"{path} is a Hugging Face model directory: install transformers (pip install 'mudsc[hf]')") from None
    return transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and load reports off (mudsc reports what matters itself)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def weight_files(path: Path) -> list[Path]:
    """The weight files transformers loads from ``path``: safetensors first, then ``.bin``; shards by their index."""
    for single, index in WEIGHT_FILES:
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise HFError(f"cannot read the shard index {path / index}: {first_line(exc, '.')}") from None
            bad = next((n for n in names if not isinstance(n, str) or not n or Path(n).name != n), None)
            if bad is not None:
                raise HFError(f"the shard index {path / index} names the shard {repr(bad)[:80]}; its weight_map must give a "
                              "file name in the directory for every tensor")
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise HFError(f"{path}: the shard index {index} names {missing[0]}, which is missing; copy every shard")
            return [path / n for n in names]
    raise HFError(f"{path} has {CONFIG_FILE} but no weights (model.safetensors or pytorch_model.bin); save the model with save_pretrained")


# --------------------------------------------------------------------------- models


@dataclass
class HFModel:
    """A model loaded from a directory: the module (eval mode), its config, and the SHA-256 of each
    weight file as it was read (``files``: ``[(name, sha256), ...]``)."""

    path: Path
    model: nn.Module
    config: Any
    files: list[tuple[str, str]] = field(default_factory=list)

    @property
    def class_name(self) -> str:
        return type(self.model).__name__

    @property
    def main_input(self) -> str:
        return str(getattr(self.model, "main_input_name", "input_ids"))

    def source(self) -> dict[str, Any]:
        """The metadata of this source: its directory name, each weight file's hash, and one hash
        for all (the file's own when there is one file)."""
        if len(self.files) == 1:
            combined = self.files[0][1]
        else:
            combined = hashlib.sha256("".join(f"{name}:{sha}\n" for name, sha in self.files).encode()).hexdigest()
        return {"dir": self.path.name, "sha256": combined, "files": [{"file": n, "sha256": s} for n, s in self.files]}


def model_class(config: Any, path: Path) -> Any:
    """The transformers class named in ``config.architectures[0]``, else ``AutoModel``."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    if not names:
        return transformers.AutoModel
    try:
        cls = getattr(transformers, names[0], None)
    except Exception:  # transformers' lazy module raises when a class's own imports fail
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise HFError(
            f"{path}: config.json names the class {names[0]!r}, which transformers does not have; mudsc runs no "
            "remote code (trust_remote_code), so only models of transformers' own classes can be loaded"
        )
    return cls


def load_model_dir(path: str | os.PathLike[str]) -> HFModel:
    """Load a ``save_pretrained`` directory with transformers, locally and without remote code, in eval mode.

    The class is ``config.architectures[0]`` (``AutoModel`` when the config names none). The weight
    files are hashed before transformers reads them. Raises :class:`HFError` for a missing
    directory or config, a hub id, missing transformers, weights that do not fit the class
    (missing or mismatched keys), or any failure of transformers to read the directory.
    """
    p = check_model_dir(path)
    require_transformers(p)
    from transformers import AutoConfig

    files = weight_files(p)
    table = _weight_table(files)
    budget = 2 * sum(n for _, n in table.values()) + (1 << 20)  # parameters a config may describe (tied copies, slack)
    _check_raw_config(p, budget)
    hashes = [(f.name, file_sha256(f)) for f in files]
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # transformers parsing a user's directory: any failure is the directory's
            raise HFError(f"cannot read {p / CONFIG_FILE}: {first_line(exc, '.')}") from exc
        cls = model_class(config, p)
        _check_size(cls, config, budget, p)
        kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True, "trust_remote_code": False}
        if "weights_only" in inspect.signature(cls.from_pretrained).parameters:
            kwargs["weights_only"] = True
        try:
            model, info = cls.from_pretrained(str(p), config=config, **kwargs)
        except Exception as exc:
            raise HFError(f"transformers cannot load {p} as {getattr(cls, '__name__', cls)}: {first_line(exc, '.')}") from exc
    if [(f.name, file_sha256(f)) for f in files] != hashes:  # the hashes must describe what was loaded
        raise HFError(f"{p}: its weight files changed while they were being read; merge a directory that nothing is writing to")
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    if missing or mismatched or unexpected:
        what = (f"missing weights {missing[:3]}" if missing else f"weights of another shape {mismatched[:3]}" if mismatched
                else f"weights it has no place for, {len(unexpected)} of them: {unexpected[:3]}")
        raise HFError(f"{p}: the weights do not fit {type(model).__name__} ({what}); the directory's weights and config.json disagree")
    _check_dtypes(model, table, p)
    bad = first_non_finite(dict(model.named_parameters()))
    if bad is not None:
        raise HFError(f"{p}: the weight {bad} has NaN or inf values; a model with them computes nothing useful: fix or retrain it")
    return HFModel(path=p, model=model.eval(), config=config, files=hashes)


#: The largest config.json read (a real one is a few kB; a huge one is not a config).
MAX_CONFIG_BYTES = 16 << 20


def _weight_table(files: Sequence[Path]) -> dict[str, tuple[str, int]]:
    """``{tensor name: (dtype, elements)}`` of the weight files, from safetensors headers (nothing
    else is read); a ``.bin`` file counts as one entry of at most its size / 2 elements."""
    import math

    out: dict[str, tuple[str, int]] = {}
    for f in files:
        if f.suffix != ".safetensors":
            out[f"<{f.name}>"] = ("", f.stat().st_size // 2)
            continue
        try:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    piece = h.get_slice(k)
                    out[k] = (str(piece.get_dtype()), math.prod(piece.get_shape()))
        except Exception as exc:  # a corrupt or foreign file: any failure is the file's
            raise HFError(f"cannot read {f}: it is not a safetensors file ({first_line(exc, '.')}); save the model with save_pretrained") from None
    return out


def _check_raw_config(p: Path, budget: int) -> None:
    """Refuse what would cost memory before transformers reads config.json: a huge file, or
    ``num_labels`` beyond what the weights could hold (transformers builds a label table of that size)."""
    f = p / CONFIG_FILE
    size = f.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise HFError(f"{f} is {size / 2**20:,.0f} MiB; a config is a few kB: this is not a model's config")
    try:
        raw = json.loads(f.read_bytes())
    except (OSError, ValueError) as exc:
        raise HFError(f"cannot read {f}: {first_line(exc, '.')}") from None
    labels = raw.get("num_labels") if isinstance(raw, dict) else None
    if isinstance(labels, int) and not isinstance(labels, bool) and labels > budget:
        raise HFError(f"{f}: num_labels is {labels:,}, more than the weight files hold values; the config and the weights disagree")


class _TooLarge(Exception):
    pass


def _check_size(cls: Any, config: Any, budget: int, p: Path) -> None:
    """Build the model on the meta device (no memory) and refuse a config that describes more
    parameters than the weight files hold: ``num_hidden_layers: 1000000`` stops after the first few
    layers beyond the budget, a ``hidden_size`` of 10**10 at its first weight."""
    seen: set[int] = set()
    count = 0

    def hook(module: nn.Module, name: str, param: Any) -> None:
        nonlocal count
        if param is not None and id(param) not in seen:
            seen.add(id(param))
            count += param.numel()
            if count > budget:
                raise _TooLarge

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        with torch.device("meta"):
            cls._from_config(config)
    except _TooLarge:
        raise HFError(
            f"{p / CONFIG_FILE} describes a model with more than {budget:,} parameters, far more than its weight files hold; "
            "the config and the weights disagree (check num_hidden_layers, hidden_size, vocab_size, intermediate_size)"
        ) from None
    except Exception:  # a config transformers cannot build: from_pretrained says why
        pass
    finally:
        handle.remove()


_INTEGER_KINDS = ("I", "U", "BOOL")  # safetensors dtype names of integer and boolean tensors


def _check_dtypes(model: nn.Module, table: dict[str, tuple[str, int]], p: Path) -> None:
    """Refuse integer or boolean tensors in the files where the model has floating-point weights
    (transformers would cast them silently: an F32 header edited to I32 merges as weights around 1e9)."""
    state = model.state_dict()
    for name, (dtype, _) in table.items():
        t = state.get(name)
        if t is not None and t.is_floating_point() and dtype.upper().startswith(_INTEGER_KINDS):
            raise HFError(f"{p}: the weight {name} is stored as {dtype} in the weight files, but the model's is {t.dtype}; "
                          "save the model's floating-point weights")


def check_same_architecture(models: Sequence[HFModel]) -> None:
    """One class, one ``model_type``, the same state_dict keys and the same config (but for names and
    output switches), shapes that differ only in sizes and names that differ only in layers that the
    configs' integer fields say (models of different widths and depths, :mod:`mudsc_graph.merging.hetero`
    and :mod:`~mudsc_graph.merging.depth`); else an :class:`HFError` naming both directories."""
    ref = models[0]
    ref_state = ref.model.state_dict()
    for other in models[1:]:
        pair = f"{ref.path.name} and {other.path.name}"
        a_type, b_type = getattr(ref.config, "model_type", None), getattr(other.config, "model_type", None)
        if a_type != b_type or ref.class_name != other.class_name:
            raise HFError(
                f"{pair} have different architectures ({ref.class_name}/{a_type} and {other.class_name}/{b_type}); "
                "only models of one architecture can be merged"
            )
        state = other.model.state_dict()
        missing, extra = [k for k in ref_state if k not in state], [k for k in state if k not in ref_state]
        differ = config_differences(ref.config, other.config)
        sizes = only_sizes(differ)
        if (missing or extra) and not (differ and sizes):  # another depth (num_hidden_layers): the merge aligns the layers
            which = f"{other.path.name} lacks {missing[:3]}" if missing else f"{other.path.name} has extra {extra[:3]}"
            raise HFError(f"{pair} have different architectures: {which}; only models of one architecture can be merged")
        for k, t in ref_state.items():
            if k not in state:
                continue
            if state[k].dim() != t.dim():
                raise HFError(
                    f"{pair} have different architectures: {k} has shape {tuple(t.shape)} and {tuple(state[k].shape)}; "
                    "only models of one architecture can be merged"
                )
        resized = missing or extra or any(tuple(state[k].shape) != tuple(t.shape) for k, t in ref_state.items() if k in state)
        for key, va, vb in differ[:1] if not (resized and sizes) else ():  # sizes may differ with the tensors' shapes
            raise HFError(f"{pair} have different architectures: {key} is {va!r} and {vb!r} in their configs; only models "
                          "of one architecture, computed the same way, can be merged")


# --------------------------------------------------------------------------- tokenizers and data


def has_tokenizer(path: str | os.PathLike[str]) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)``; an :class:`HFError` when the
    directory has no tokenizer files (token ids in a ``.pt``/``.npz`` file do without one)."""
    p = Path(path)
    if not has_tokenizer(p):
        raise HFError(
            f"{p} has no tokenizer files (tokenizer.json, vocab.txt, ...) to tokenise a text file with; save the "
            "tokenizer there with tokenizer.save_pretrained, or give token ids in a .pt/.npz file (input_ids, attention_mask, labels)"
        )
    require_transformers(p)
    from transformers import AutoTokenizer

    with quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        except Exception as exc:
            raise HFError(f"transformers cannot load the tokenizer of {p}: {first_line(exc, '.')}") from exc


@dataclass
class KeywordData:
    """Model inputs as keyword tensors with one row per sample (``{"input_ids": N x L, "attention_mask":
    N x L}`` or ``{"pixel_values": N x C x H x W}``) and, when the source has them, integer labels."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    name: str
    #: why there are no labels (e.g. "line 3 has no LABEL<TAB> prefix"), for messages
    unlabelled: str | None = None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def select(self, idx: torch.Tensor) -> "KeywordData":
        labels = self.labels[idx] if self.labels is not None else None
        return KeywordData({k: v[idx] for k, v in self.inputs.items()}, labels, self.name, self.unlabelled)

    def take(self, n: int | None, seed: int = 0) -> "KeywordData":
        """At most ``n`` samples, chosen by a shuffle seeded with ``seed`` (all, shuffled, when ``n`` is None)."""
        if n is not None and int(n) < 1:
            raise HFError(f"the number of samples must be at least 1, got {n}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(int(seed)))
        return self.select(order[: int(n)] if n is not None else order)

    def example(self, n: int = 2) -> dict[str, torch.Tensor]:
        """The inputs of the first ``n`` samples: example inputs with the data's shapes."""
        return {k: v[:n] for k, v in self.inputs.items()}

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Dict batches (with ``labels`` when there are labels; merging drops them)."""
        if int(batch_size) < 1:
            raise HFError(f"batch size must be at least 1, got {batch_size}")
        out = []
        for start in range(0, len(self), int(batch_size)):
            part = {k: v[start : start + int(batch_size)] for k, v in self.inputs.items()}
            if self.labels is not None:
                part["labels"] = self.labels[start : start + int(batch_size)]
            out.append(part)
        return out


_LABELLED_LINE = re.compile(r"\s*(-?[0-9]+)\t(.*)", re.S | re.ASCII)
#: A line is cut to this many characters per token of ``max_length`` before it is tokenised (at
#: least :data:`MIN_LINE_CHARS`): a 100 MB line must not reach the tokenizer whole.
CHARS_PER_TOKEN = 64
MIN_LINE_CHARS = 1 << 16


def read_text_file(path: str | os.PathLike[str], *, limit: int | None = None, seed: int = 0,
                   max_chars: int = MIN_LINE_CHARS) -> tuple[list[str], list[int] | None, str | None]:
    """``(texts, labels or None, why not labelled)`` of a text file, one example per non-blank line;
    a line ``2<TAB>text`` has label 2 (ASCII digits). Labels are kept only when every line has one.

    The file is streamed: one pass finds the non-blank lines and checks every label, then only the
    ``limit`` lines a shuffle seeded with ``seed`` picks are read (all lines, in order, without
    ``limit``), each cut to ``max_chars`` characters. Memory stays a few bytes per line whatever
    the file holds (a million lines, or one line of 100 MB).
    """
    from .data import MAX_CLASSES

    p = Path(path)
    cap = 4 * int(max_chars) + 4  # bytes: at most 4 per character of UTF-8
    starts: list[int] = []
    labels: list[int] = []
    unlabelled: str | None = None
    try:
        with open(p, "rb") as f:
            number, offset = 0, 0
            while True:
                head, size = _read_line(f, cap)
                if not size:
                    break
                number += 1
                text = _decode(head, p, number)
                if text.strip():
                    starts.append(offset)
                    m = _LABELLED_LINE.match(text)
                    if m:
                        label = int(m[1])
                        if label < 0:
                            raise HFError(f"{p}, line {number}: the label {label} is negative; labels are class ids 0..K-1")
                        if label >= MAX_CLASSES:
                            raise HFError(f"{p}, line {number}: the label {m[1][:20]} is too large; labels are class ids below {MAX_CLASSES:,}")
                        labels.append(label)
                    elif unlabelled is None:
                        unlabelled = f"line {number} of {p.name} has no LABEL<TAB> prefix"
                offset += size
            if not starts:
                raise HFError(f"{p} has no text: give one example per line")
            order = range(len(starts)) if limit is None else torch.randperm(len(starts), generator=torch.Generator().manual_seed(int(seed)))[: int(limit)].tolist()
            texts = []
            for i in order:
                f.seek(starts[i])
                text = _decode(_read_line(f, cap)[0], p, None).rstrip("\r\n")
                m = _LABELLED_LINE.match(text) if unlabelled is None else None
                texts.append((m[2] if m else text)[: int(max_chars)])
    except OSError as exc:
        raise HFError(f"cannot read {p}: {exc.strerror or exc}") from None
    return texts, ([labels[i] for i in order] if unlabelled is None else None), unlabelled


def _read_line(f: Any, cap: int) -> tuple[bytes, int]:
    """The first ``cap`` bytes of the next line and the line's whole length (the rest is skipped)."""
    head = f.readline(cap)
    size = len(head)
    if head and not head.endswith(b"\n"):
        while True:
            rest = f.readline(1 << 20)
            size += len(rest)
            if not rest or rest.endswith(b"\n"):
                break
    return head, size


def _decode(raw: bytes, p: Path, number: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= len(raw) - 3 and exc.reason == "unexpected end of data":  # a character cut by the cap
            return raw[: exc.start].decode("utf-8")
        where = f", line {number}" if number else ""
        raise HFError(f"{p} is not UTF-8 text{where} ({exc.reason}); save it as UTF-8") from None


def _max_positions(config: Any) -> int | None:
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _vocab_size(config: Any) -> int | None:
    value = getattr(config, "vocab_size", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def load_text_file(tokenizer: Any, path: str | os.PathLike[str], *, max_length: int = 128, config: Any = None,
                   samples: int | None = None, seed: int = 0) -> KeywordData:
    """Tokenise a text file: ``input_ids`` and ``attention_mask``, every line padded (on the
    tokenizer's padding side) to the longest line taken, truncated to ``max_length`` tokens (and to
    the config's ``max_position_embeddings``). ``samples``: only that many lines, picked by a shuffle
    seeded with ``seed`` (only those are read and tokenised)."""
    if int(max_length) < 1:
        raise HFError(f"--max-length must be at least 1, got {max_length}")
    texts, labels, unlabelled = read_text_file(path, limit=samples, seed=seed, max_chars=max(MIN_LINE_CHARS, CHARS_PER_TOKEN * int(max_length)))
    limit = int(max_length)
    positions = _max_positions(config) if config is not None else None
    if positions is not None:
        limit = min(limit, positions)
    try:
        encoded = tokenizer(texts, truncation=True, max_length=limit, padding=False)
    except Exception as exc:  # a tokenizer's failure on a user's text
        raise HFError(f"the tokenizer cannot tokenise {path}: {first_line(exc, '.')}") from exc
    ids_list = [list(ids) for ids in encoded["input_ids"]]
    length = max(len(ids) for ids in ids_list)
    if length == 0:
        raise HFError(f"{path}: the tokenizer gives no tokens for any line")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    ids = torch.full((len(ids_list), length), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(ids_list), length), dtype=torch.long)
    for row, seq in enumerate(ids_list):
        span = slice(length - len(seq), length) if left else slice(0, len(seq))
        if seq:
            ids[row, span] = torch.tensor(seq, dtype=torch.long)
            mask[row, span] = 1
    y = torch.tensor(labels, dtype=torch.long) if labels is not None else None
    return KeywordData({"input_ids": ids, "attention_mask": mask}, y, str(path), unlabelled)


def _integer_tensor(value: Any, what: str, where: str) -> torch.Tensor:
    import numpy as np

    try:
        t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:  # ragged lists, ints beyond int64 (10**26)
        raise HFError(f"{where}: {what} is not an array of integers within int64 ({first_line(exc, '.')}); save token ids and "
                      "labels as integer arrays") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise HFError(f"{where}: {what} must hold integers, got {t.dtype}; save token ids as integers (e.g. int64)")
    return t.long()


def load_token_file(path: str | os.PathLike[str], *, config: Any = None) -> KeywordData:
    """Token ids from a ``.pt``/``.npz`` file (``input_ids``, optional ``attention_mask`` and
    ``labels``), read without unpickling anything; integers stay integers."""
    from .data import MAX_CLASSES, DataError, read_tensor_file

    where = f"token file {path}"
    try:
        content = read_tensor_file(path)
    except DataError as exc:
        raise HFError(str(exc).replace("{'x': tensor, 'y': tensor}", "{'input_ids': tensor, 'labels': tensor}")) from None
    if "input_ids" not in content:
        raise HFError(f"{where} must hold 'input_ids' (and optionally 'attention_mask', 'labels'), found keys {', '.join(map(repr, content)) or '(none)'}")
    ids = _integer_tensor(content["input_ids"], "input_ids", where)
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise HFError(f"{where}: input_ids must be N x L token ids, got shape {tuple(ids.shape)}")
    vocab = _vocab_size(config) if config is not None else None
    if int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab):
        raise HFError(f"{where}: token ids run {int(ids.min())}..{int(ids.max())} but the model's vocabulary has ids 0..{(vocab or 1) - 1}")
    positions = _max_positions(config) if config is not None else None
    if positions is not None and ids.shape[1] > positions:
        raise HFError(f"{where}: sequences of {ids.shape[1]} tokens are longer than the model's {positions} positions; truncate them")
    inputs = {"input_ids": ids}
    if "attention_mask" in content:
        mask = _integer_tensor(content["attention_mask"], "attention_mask", where)
        if tuple(mask.shape) != tuple(ids.shape):
            raise HFError(f"{where}: attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}; they must match")
        odd = mask[(mask != 0) & (mask != 1)]
        if len(odd):
            raise HFError(f"{where}: attention_mask holds {int(odd[0])}; it must hold 1 (a token) or 0 (padding)")
        inputs["attention_mask"] = mask
    else:
        inputs["attention_mask"] = torch.ones_like(ids)
    labels = None
    unlabelled: str | None = f"{Path(path).name} has no 'labels'"
    for key in LABEL_KEYS:
        if key in content:
            labels = _integer_tensor(content[key], key, where)
            if labels.dim() != 1 or len(labels) != len(ids):
                raise HFError(f"{where}: {key} must be one class id per row of input_ids ({len(ids)}), got shape {tuple(labels.shape)}")
            if len(labels) and int(labels.min()) < 0:
                raise HFError(f"{where}: labels must be class ids 0..K-1, got {int(labels.min())}")
            if len(labels) and int(labels.max()) >= MAX_CLASSES:
                raise HFError(f"{where}: the label {int(labels.max())} is too large; labels are class ids below {MAX_CLASSES:,}")
            unlabelled = None
            break
    return KeywordData(inputs, labels, str(path), unlabelled)


def image_shape(config: Any) -> tuple[int, int, int] | None:
    """``(num_channels, H, W)`` from a vision config; ``None`` when it fixes no image size."""
    channels = int(getattr(config, "num_channels", 3) or 3)
    size = getattr(config, "image_size", None)
    if size is None:
        return None
    if isinstance(size, int):
        return (channels, size, size)
    if isinstance(size, dict):  # {"height": H, "width": W}
        return (channels, int(size.get("height", 224)), int(size.get("width", 224)))
    h, w = (list(size) + list(size))[:2]
    return (channels, int(h), int(w))


def load_model_data(
    hf: HFModel, spec: str, *, split: str = "train", max_length: int = 128, tokenizer: Any = None,
    limit: int | None = None, seed: int = 0,
) -> KeywordData:
    """The data that ``spec`` names, as inputs for ``hf``'s model.

    Text models (``main_input_name == "input_ids"``): a text file (tokenised with ``tokenizer``,
    by default the one in the model's directory) or a ``.pt``/``.npz`` token file; both are used
    whole for either split. Vision models (``pixel_values``): any image data spec of
    :func:`mudsc_graph.io.data.load_data`, adapted to the config's channels and image size.
    ``limit`` samples are chosen by a shuffle seeded with ``seed``.
    """
    from .data import FILE_SUFFIXES, DataError, adapt_inputs, load_data

    kind = hf.main_input
    if kind == "input_ids":
        path = Path(spec).expanduser()
        if path.suffix.lower() in FILE_SUFFIXES:
            if not path.is_file():
                raise HFError(f"no such file: {spec}; check the path")
            data = load_token_file(path, config=hf.config)
        elif path.is_file():
            if tokenizer is None:
                tokenizer = load_tokenizer(hf.path)
            return load_text_file(tokenizer, path, max_length=max_length, config=hf.config, samples=limit, seed=seed)
        elif path.is_dir() or not path.exists():
            what = "a directory" if path.is_dir() else "no such file"
            raise HFError(
                f"--data {spec}: {what}; {hf.class_name} is a text model: give a text file (one example per line, "
                "optionally LABEL<TAB>text) or a .pt/.npz file with input_ids"
            )
        else:  # pragma: no cover - a special file
            raise HFError(f"--data {spec} is not a regular file")
        return data.take(limit, seed) if limit is not None else data
    if kind == "pixel_values":
        shape = image_shape(hf.config)
        try:
            images = load_data(spec, split=split, input_shape=shape, limit=limit, seed=seed)
            if shape is None and images.x.dim() == 4:  # any size: only the channels must fit
                channels = int(getattr(hf.config, "num_channels", 3) or 3)
                images.x = adapt_inputs(images.x, (channels, *images.x.shape[2:]))
        except DataError as exc:
            raise HFError(str(exc)) from None
        return KeywordData({"pixel_values": images.x}, images.y, spec)
    raise HFError(
        f"{hf.class_name} takes {kind!r} as its main input; mudsc's command line supports text models (input_ids) "
        "and vision models (pixel_values); use the library with your own inputs"
    )


def example_inputs(hf: HFModel, batch: int = 2, *, length: int = EXAMPLE_LENGTH, seed: int = 0) -> dict[str, torch.Tensor]:
    """Small example inputs from the config: ``length`` random token ids and an attention mask for a
    text model, random ``pixel_values`` of the config's image size (224 when it has none) for a vision model."""
    g = torch.Generator().manual_seed(seed)
    if hf.main_input == "input_ids":
        vocab = _vocab_size(hf.config) or 100
        positions = _max_positions(hf.config)
        n = min(length, positions) if positions else length
        ids = torch.randint(0, vocab, (batch, n), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if hf.main_input == "pixel_values":
        shape = image_shape(hf.config) or (int(getattr(hf.config, "num_channels", 3) or 3), 224, 224)
        return {"pixel_values": torch.randn(batch, *shape, generator=g)}
    raise HFError(
        f"{hf.class_name} takes {hf.main_input!r} as its main input; mudsc builds example inputs only for text "
        "models (input_ids) and vision models (pixel_values)"
    )


# --------------------------------------------------------------------------- saving


def check_output_dir(out: str | os.PathLike[str], *, force: bool = False, inputs: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Refuse an output directory before any work: its parent must exist; an existing one needs
    ``force`` and must itself be a model directory (or empty), so ``--force`` never wipes other files;
    an output that is, or contains, one of ``inputs`` is refused even with ``force``."""
    p = Path(out).expanduser()
    try:
        check_not_an_input(p, inputs, contains=True)
        check_output_parent(p)
    except CheckpointError as exc:
        raise HFError(f"--out: {exc}") from None
    if p.exists() or p.is_symlink():
        if not force:
            raise HFError(f"{p} exists; pass --force to overwrite")
        if p.is_dir() and not p.is_symlink():
            if any(p.iterdir()) and not ((p / CONFIG_FILE).is_file() or (p / META_FILE).is_file()):
                raise HFError(f"{p} is a directory that holds no model ({CONFIG_FILE}); mudsc replaces only model directories, even with --force")
            other = next((f for f in sorted(p.iterdir()) if not (f.is_file() and not f.is_symlink() and _model_file(f.name))), None)
            if other is not None:
                raise HFError(f"{p} holds {other.name}, which is not part of a model directory; --force replaces only what a model "
                              "directory holds: move it out first")
        elif p.exists() and not p.is_file():
            raise HFError(f"{p} exists and is not a directory or a file (a FIFO, a socket or a device); mudsc never replaces one, "
                          "even with --force")
    return p


#: What a model directory holds (what save_pretrained, a tokenizer and mudsc write): --force replaces only these.
_MODEL_FILES = re.compile(
    r"(config|generation_config|preprocessor_config|processor_config|special_tokens_map|added_tokens|tokenizer_config|tokenizer"
    r"|vocab|merges|chat_template|mudsc|model|pytorch_model|spiece|sentencepiece\.bpe)"
    r"([.-].*)?\.(json|safetensors|bin|txt|model|jinja)"
)


def _model_file(name: str) -> bool:
    return bool(_MODEL_FILES.fullmatch(name))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)
    fsync_dir(root.parent)


def save_model_dir(
    model: nn.Module, out: str | os.PathLike[str], *, metadata: dict[str, Any], tokenizer: Any = None,
    force: bool = False, inputs: Sequence[str | os.PathLike[str]] = (), extra_files: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``model`` (``save_pretrained``, safetensors), ``tokenizer``, copies of ``extra_files``
    (e.g. the first model's ``preprocessor_config.json``) and ``mudsc.json`` into the
    directory ``out``, atomically: everything goes into a temporary directory beside ``out``, which
    is renamed into place at the end (an existing ``out``, with ``force``, is moved aside first and
    removed after). On any failure nothing is left behind and an existing ``out`` is untouched.
    """
    p = check_output_dir(out, force=force, inputs=inputs)
    require_transformers(p)
    try:
        meta_json = json.dumps(dict(metadata), indent=2)
    except (TypeError, ValueError) as exc:
        raise HFError(f"cannot save {p}: metadata is not JSON-serialisable ({exc})") from exc
    tmp = temp_path(p)
    old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
    with cleanup_on_termination():  # SIGTERM mid-save: the temp directory goes too
        _write_dir(model, p, tmp, old, tokenizer, extra_files, meta_json, force)
    fsync_dir(p.parent)
    return p


def _write_dir(model: nn.Module, p: Path, tmp: Path, old: Path, tokenizer: Any, extra_files: Sequence[Any], meta_json: str,
               force: bool) -> None:
    try:
        tmp.mkdir()
    except OSError as exc:
        raise HFError(f"cannot write {p}: {exc.strerror or exc}; check the directory's permissions") from exc
    moved_aside = False
    try:
        kwargs: dict[str, Any] = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True
        with quiet_transformers():
            model.save_pretrained(str(tmp), **kwargs)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        for extra in extra_files:
            if not (tmp / Path(extra).name).exists():
                shutil.copyfile(extra, tmp / Path(extra).name)
        (tmp / META_FILE).write_text(meta_json + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        if p.exists() or p.is_symlink():
            if not force:  # it appeared while this merge ran: another writer's, never replaced without --force
                raise HFError(f"{p} was created by someone else while this merge ran; nothing was written (pass --force to replace it)")
            os.replace(p, old)
            moved_aside = True
        os.replace(tmp, p)
    except BaseException as exc:
        if moved_aside and not p.exists():
            os.replace(old, p)
            moved_aside = False
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise HFError(f"cannot write {p}: {exc.strerror or exc}; check disk space and permissions") from exc
        raise
    if moved_aside:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


__all__ = [
    "HFError", "HFModel", "KeywordData", "check_model_dir", "check_output_dir", "check_same_architecture", "example_inputs",
    "has_tokenizer", "hub_id_error", "image_shape", "load_model_data", "load_model_dir", "load_text_file", "load_token_file",
    "load_tokenizer", "looks_like_hub_id", "read_text_file", "require_transformers", "save_model_dir",
]
