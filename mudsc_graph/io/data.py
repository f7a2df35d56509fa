"""Labelled data for calibration and evaluation: registered datasets, tensor files, image folders.

A data *spec* says where the data comes from (``--data SPEC`` on the command line)::

    digits              a registered dataset (``mudsc plugins`` lists them)
    mnist5k:0-4         only classes 0..4; labels keep their original ids
    digits:0,3,5-6      ids and ranges mix freely
    runs/feats.pt       a dict {"x": Tensor, "y": Tensor} saved with torch.save (both splits)
    feats.npz:5-9       arrays x and y saved with numpy.savez; a class selection works here too
    pairs.pt            several inputs per sample, by the forward's parameter names: {"x": {"src": ...,
                        "mem": ...}, "y": ...} (torch.save) or arrays x.src, x.mem and y (numpy.savez)
    photos/             an image folder, one subfolder per class (sorted names = ids 0..K-1)

:func:`load_data` returns a :class:`LabeledData`; with ``input_shape`` the inputs are adapted to
a model's input by :func:`adapt_inputs` (channels repeated or averaged, images zero-padded or
downscaled, or flattened). Built-in datasets and image folders are split per class, 80 % train
and 20 % test after a seeded shuffle, and standardised with the train split's mean and std
(:func:`make_split`); a tensor file is used as it is for both splits.
"""

from __future__ import annotations

import functools
import math
import os
import re
import stat
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MudscError, PluginError, first_line

SPLITS = ("train", "test")
#: Fraction of each class that goes to the train split (built-ins and image folders).
TRAIN_FRACTION = 0.8
#: Seed of the per-class shuffle that splits train from test, and of ``limit``'s shuffle.
SPLIT_SEED = 0
FILE_SUFFIXES = (".pt", ".pth", ".npz")
#: Labels must be class ids below this bound (a larger one is refused, not turned into a huge ``range``).
MAX_CLASSES = 1_000_000
#: Data that would take more than this many bytes in memory is refused before it is read (an image
#: folder as float32, a .npz file's arrays once inflated, inputs adapted to a model's input shape).
MAX_INPUT_BYTES = 8 << 30
_SPEC_HELP = "a spec is NAME, NAME:CLASSES (e.g. mnist5k:0-4), a .pt/.npz file or an image folder"


class DataError(MudscError):
    """A data spec, file or folder cannot be loaded, or its inputs do not fit the model."""


@dataclass
class LabeledData:
    """Inputs ``x`` (``N x ...`` float; or, for a model with several inputs, a dict of them by the
    forward's parameter names, each with ``N`` rows) with class labels ``y`` (``N`` long).

    ``classes`` lists the class ids this data covers (the selection of ``NAME:CLASSES``, else all
    ids of the source); labels keep their original ids, so ``mnist5k:5-9`` has labels 5..9.
    """

    x: torch.Tensor | dict[str, torch.Tensor]
    y: torch.Tensor
    classes: list[int]
    name: str

    def rows(self, idx: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """The inputs of the samples ``idx`` (a slice, an index or a boolean mask)."""
        return _rows(self.x, idx)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batches(self, batch_size: int = 100, shuffle: bool = False, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The data as ``(x, y)`` batches; with ``shuffle`` in a seeded random order."""
        if int(batch_size) < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        return [(self.rows(idx), self.y[idx]) for idx in order.split(int(batch_size))]


def _rows(x: torch.Tensor | dict[str, torch.Tensor], idx: Any) -> torch.Tensor | dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


# --------------------------------------------------------------------------- splits and classes


def split_indices(y: np.ndarray, split: str, *, train_fraction: float = TRAIN_FRACTION, seed: int = SPLIT_SEED) -> np.ndarray:
    """Indices of ``split`` in sorted order: per class a seeded shuffle, the first
    ``round(train_fraction * n)`` samples train and the rest test. Each class has its own
    generator (seeded with ``(seed, class)``), so adding a class leaves the others' split alone."""
    _check_split(split)
    y = np.asarray(y)
    parts = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))]
        n_train = math.floor(train_fraction * len(idx) + 0.5)
        parts.append(idx[:n_train] if split == "train" else idx[n_train:])
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def make_split(x: np.ndarray, y: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split`` of ``(x, y)`` (see :func:`split_indices`), standardised with the train split's
    mean and std (one scalar each). ``x`` should be scaled to [0, 1]; returns float32, int64."""
    y = np.asarray(y).astype(np.int64).ravel()
    x = np.asarray(x, dtype=np.float32)
    train = x[split_indices(y, "train")]
    mean = float(train.mean(dtype=np.float64)) if train.size else 0.0
    std = float(train.std(dtype=np.float64)) if train.size else 1.0
    idx = split_indices(y, split)
    xs = (x[idx] - np.float32(mean)) / np.float32(std if std > 0 else 1.0)
    return xs, y[idx]


def parse_classes(text: str, num_classes: int | None, *, what: str = "this data") -> list[int]:
    """The sorted class ids of a selection like ``0-4``, ``5-9``, ``0,2,4`` or ``0-2,7``.

    Every id must be below ``num_classes`` (``None``: only the syntax and :data:`MAX_CLASSES` are
    checked); ``what`` names the owner of the classes in the error ("this data", "the model").
    Raises :class:`DataError` with one line.
    """
    if not isinstance(text, str):
        raise DataError(f"a class selection must be text like 0-4, 5-9 or 0,2,4, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise DataError("empty class selection: give class ids like 0-4, 5-9 or 0,2,4")
    shown = text if len(text) <= 60 else text[:57] + "..."
    bound = MAX_CLASSES if num_classes is None else int(num_classes)
    if num_classes is None:
        beyond = f"class ids must be below {MAX_CLASSES:,}"
    else:
        beyond = f"{what} has {bound} classes ({f'ids 0-{bound - 1}' if bound > 0 else 'no ids'})"
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", part)
        if not m:
            bad = part.strip()
            bad = bad if len(bad) <= 40 else bad[:37] + "..."
            raise DataError(f"bad class selection {shown!r}: {bad!r} is not a class id or a range; use e.g. 0-4, 5-9 or 0,2,4")
        lo_text, hi_text = m[1], m[2] if m[2] is not None else m[1]
        if max(len(lo_text.lstrip("0")), len(hi_text.lstrip("0"))) > 18:  # int() of thousands of digits is refused (or slow)
            raise DataError(f"a class id in the selection {shown!r} is out of range: {beyond}")
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise DataError(f"bad class selection {shown!r}: the range {part.strip()!r} runs backwards; write {hi}-{lo}")
        if hi >= bound:
            raise DataError(f"class {hi} in the selection {shown!r} is out of range: {beyond}")
        ranges.append((lo, hi))
    chosen: set[int] = set()
    for lo, hi in ranges:
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


# --------------------------------------------------------------------------- fitting a model's input


def adapt_inputs(x: torch.Tensor, input_shape: Sequence[int], *, pad_value: float | None = None) -> torch.Tensor:
    """Fit ``x`` (``N x C x H x W`` or ``N x D``) to a model whose one input has ``input_shape``.

    Channels: 1 -> C by repeating, 3 -> 1 by the mean. Space: a smaller image is padded, centred,
    with ``pad_value`` (default: the smallest value of ``x``, which for standardised images with
    black pixels is exactly a black pixel's value); a larger one is downscaled (bilinear,
    antialiased); a side smaller in one direction and larger in the other gets both. A 1-D
    ``input_shape`` flattens (sizes must match); ``(H, W)`` means one channel without its axis.
    """
    target = tuple(int(s) for s in input_shape)
    have = tuple(x.shape[1:])
    if not target or any(s < 1 for s in target):
        raise DataError(f"invalid input shape {target}: give one input's shape, e.g. (3, 32, 32) or (784,)")
    if have == target:
        return x
    need = x.shape[0] * math.prod(target) * x.element_size()
    if need > MAX_INPUT_BYTES:
        raise DataError(
            f"adapting {x.shape[0]} inputs of shape {have} to the model's input shape {target} would take {need / 2**30:.1f} GiB "
            f"(the limit is {MAX_INPUT_BYTES / 2**30:.0f} GiB); check the input shape, or use fewer samples"
        )
    if len(target) == 1:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != target[0]:
            raise DataError(
                f"cannot flatten inputs of shape {have} ({flat.shape[1]} values) to the model's input shape {target}: "
                f"the sizes differ; give an image shape (C, H, W) to pad or resize instead"
            )
        return flat
    if len(target) == 2:
        return adapt_inputs(x, (1, *target), pad_value=pad_value).squeeze(1)
    if len(target) != 3 or x.dim() != 4:
        if x.dim() >= 2 and math.prod(have) == math.prod(target):
            return x.reshape(x.shape[0], *target)
        raise DataError(f"cannot adapt inputs of shape {have} to the model's input shape {target}: only images (C, H, W) can be adapted")
    (c, h, w), (C, H, W) = have, target
    if c != C:
        if c == 1:
            x = x.expand(-1, C, -1, -1)
        elif C == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise DataError(f"cannot adapt {c}-channel inputs {have} to {C} channels {target}: only 1 -> C and 3 -> 1 are supported")
    if pad_value is None:
        pad_value = float(x.min()) if x.numel() else 0.0
    mh, mw = min(h, H), min(w, W)
    if (mh, mw) != (h, w):
        x = F.interpolate(x, size=(mh, mw), mode="bilinear", antialias=True, align_corners=False)
    if (mh, mw) != (H, W):
        top, left = (H - mh) // 2, (W - mw) // 2
        x = F.pad(x, (left, W - mw - left, top, H - mh - top), value=float(pad_value))
    return x.contiguous()


# --------------------------------------------------------------------------- load_data


def load_data(
    spec: str,
    *,
    split: str = "train",
    input_shape: tuple[int, ...] | None = None,
    registry: Any = None,
    limit: int | None = None,
    seed: int = SPLIT_SEED,
) -> LabeledData:
    """Load the labelled data that ``spec`` names (see the module docstring for the grammar).

    ``split`` is ``"train"`` or ``"test"``; ``input_shape`` adapts the inputs to a model
    (:func:`adapt_inputs`); ``limit`` keeps the first ``limit`` samples after a shuffle seeded
    with ``seed`` (the train/test split itself always uses :data:`SPLIT_SEED`); ``registry``
    defaults to :func:`mudsc_graph.get_registry`. Raises :class:`DataError`.
    """
    _check_split(split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or int(limit) < 1):
        raise DataError(f"limit must be at least 1 (a whole number of samples), got {limit!r}")
    kind, source, selection = _resolve(spec, registry)
    if kind == "dataset":
        x, y, num_classes = _from_registry(source, split)
    elif kind == "folder":
        x, y, num_classes = _from_folder(source, split)
    else:
        x, y, num_classes = _from_file(source)
    if len(y) == 0:
        raise DataError(f"{spec!r} has no samples in its {split} split")
    pad_value = float(x.min()) if isinstance(x, torch.Tensor) and x.numel() else 0.0  # a black pixel, before any class selection
    if selection is None:
        classes = list(range(num_classes))
    else:
        classes = parse_classes(selection, num_classes)
        keep = torch.isin(y, torch.tensor(classes, dtype=y.dtype))
        if not bool(keep.any()):
            raise DataError(f"{spec!r} selects no samples of the {split} split: none has a class in {classes}")
        x, y = _rows(x, keep), y[keep]
    if limit is not None:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(seed)))[: int(limit)]
        x, y = _rows(x, order), y[order]
    if input_shape is not None and isinstance(x, torch.Tensor):  # several named inputs are given as the model takes them
        x = adapt_inputs(x, input_shape, pad_value=pad_value)
    return LabeledData(x=x, y=y, classes=classes, name=spec)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use 'train' or 'test'")


def _resolve(spec: str, registry: Any) -> tuple[str, Any, str | None]:
    """``(kind, source, class selection)`` with kind ``dataset``, ``folder`` or ``file``."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec: {_SPEC_HELP}")
    spec = spec.strip()
    if registry is None:
        from ..plugin.registry import get_registry

        registry = get_registry()
    candidates = [(spec, None)]
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        candidates.append((head, tail))
    for source, selection in candidates:  # the whole spec first: a name or path may contain ':'
        if source in registry.datasets:
            return "dataset", (registry, source), selection
        path = Path(source).expanduser()
        try:
            exists, link = path.exists(), path.is_symlink()
        except OSError as exc:  # e.g. a name too long for the file system
            raise DataError(f"cannot use {_short(source)!r} as a path: {exc.strerror or exc}; {_SPEC_HELP}") from None
        if exists:
            return ("folder" if path.is_dir() else "file"), path, selection
        if link:
            raise DataError(f"{source} is a broken symbolic link (its target is missing, or the links loop); point it at a data file or folder")
    source = candidates[-1][0]
    if source.lower().endswith(FILE_SUFFIXES) or "/" in source or os.sep in source or source.startswith(("~", ".")):
        raise DataError(f"no such file or folder: {_short(source)!r}; check the path ({_SPEC_HELP})")
    try:
        registry.dataset(source)
    except PluginError as exc:
        raise DataError(f"{exc}; {_SPEC_HELP}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _from_registry(source: tuple[Any, str], split: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    registry, name = source
    record = registry.datasets[name]
    where = f"dataset {name!r} (plugin {registry.dataset_plugins.get(name, '?')!r})"
    out = record.load(split)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise DataError(f"{where}: load({split!r}) must return a tuple (x, y), got {type(out).__name__}; fix the plugin")
    x, y = _as_tensors(out[0], out[1], where)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= record.classes):
        raise DataError(f"{where}: labels run {int(y.min())}..{int(y.max())} but the record says {record.classes} classes; fix the plugin")
    return x, y, int(record.classes)


def _short(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


_INT_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64} | {
    getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)
}


def _dense(value: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """``value`` if it is an ordinary dense tensor with values (not sparse, nested, quantized or meta)."""
    if value.layout != torch.strided or value.is_nested:
        layout = "nested" if value.is_nested else str(value.layout).replace("torch.", "")
        raise DataError(f"{where}: {name} is a {layout} tensor, not a dense one; save {name}.to_dense() instead")
    if value.is_quantized:
        raise DataError(f"{where}: {name} is a quantized tensor ({value.dtype}); save {name}.dequantize() instead")
    if value.device.type == "meta":
        raise DataError(f"{where}: {name} is a tensor on the meta device, which holds no values; save a tensor with data")
    return value.cpu()


def _as_array(value: Any, name: str, where: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except Exception as exc:  # ragged lists, objects that refuse conversion ...
        raise DataError(f"{where}: {name} is not an array ({type(value).__name__}: {first_line(exc, '.: ')}); save a numeric array") from None


def _inputs(value: Any, where: str) -> torch.Tensor:
    """Validated inputs as float32: numeric, dense, one row per sample, every value finite."""
    if isinstance(value, torch.Tensor):
        x = _dense(value, "x", where)
        if not (x.is_floating_point() or x.dtype in _INT_DTYPES):
            raise DataError(f"{where}: x holds {x.dtype} values, not numbers; save the inputs as a float array")
    else:
        arr = _as_array(value, "x", where)
        if arr.dtype.kind not in "iuf":
            raise DataError(f"{where}: x holds {arr.dtype} values, not numbers; save the inputs as a float array")
        with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, refused below
            x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if x.dim() < 2:
        raise DataError(f"{where}: x must hold one input per row (N x ...), got shape {tuple(x.shape)}")
    x = x.float()
    finite = torch.isfinite(x.flatten(1)).all(dim=1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0, 0])
        kind = "NaN" if bool(torch.isnan(x[i]).any()) else "inf"
        raise DataError(
            f"{where}: x has {kind} values (the first in sample {i}); inputs must be finite numbers within float32's range: "
            "fix or drop those samples"
        )
    return x


def _labels(value: Any, where: str) -> torch.Tensor:
    """Validated labels as int64: a 1-D array of whole numbers in ``[0, MAX_CLASSES)``."""
    if isinstance(value, torch.Tensor):
        y = _dense(value, "y", where)
        if not (y.is_floating_point() or y.dtype in _INT_DTYPES):
            raise DataError(f"{where}: y holds {y.dtype} values, not integer class labels; save y as an integer array (e.g. int64)")
        if y.is_floating_point() and y.dtype not in (torch.float16, torch.float32, torch.float64):
            y = y.double()  # bfloat16, float8: exact in float64, which numpy reads
        arr = y.numpy()
    else:
        arr = _as_array(value, "y", where)
    if arr.ndim != 1:
        raise DataError(f"{where}: y must be a 1-D tensor of integer class labels, got shape {tuple(arr.shape)} {arr.dtype}")
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{where}: y holds {arr.dtype} values, not integer class labels; save y as an integer array (e.g. int64)")
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64)  # exact; float16 cannot even hold MAX_CLASSES
        whole = np.isfinite(arr) & (arr == np.round(arr))
        if not whole.all():
            i = int(np.flatnonzero(~whole)[0])
            raise DataError(f"{where}: y must hold integer class labels, but sample {i} has label {_label(arr[i])}; save whole class ids")
    if len(arr):
        negative = arr < 0
        if negative.any():
            i = int(np.flatnonzero(negative)[0])
            raise DataError(f"{where}: labels must be class ids 0..K-1, got {_label(arr[i])} (sample {i})")
        large = arr >= MAX_CLASSES
        if large.any():
            i = int(np.flatnonzero(large)[0])
            raise DataError(f"{where}: label {_label(arr[i])} (sample {i}) is too large: class ids must be below {MAX_CLASSES:,}; save class ids 0..K-1")
    return torch.from_numpy(arr.astype(np.int64))


def _label(v: Any) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _as_tensors(x: Any, y: Any, where: str, *, grey_images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = _inputs(x, where)
    y = _labels(y, where)
    if len(x) != len(y):
        raise DataError(f"{where}: x has {len(x)} samples but y has {len(y)} labels; they must match")
    if grey_images and x.dim() == 3:  # N x H x W grey images
        x = x.unsqueeze(1)
    return x, y


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _check_regular(path: str | os.PathLike[str], what: str) -> None:
    """Refuse anything but a regular file (symlinks followed) *before* it is opened: opening a FIFO
    blocks until someone writes to it, and a device can be endless."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            raise DataError(f"{what} {path} is a broken symbolic link (its target is missing, or the links loop); fix or remove it") from None
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}; check the path and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "a special file")
        raise DataError(f"{what} {path} is not a regular file ({kind}); give a file written by torch.save, numpy.savez or an image program")


def _open_regular(path: str | os.PathLike[str], what: str) -> Any:
    """A binary file object of a regular file; checked before the open, and the open itself never
    blocks (``O_NONBLOCK``) in case the path was swapped for a FIFO in between."""
    _check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise DataError(f"cannot open {what} {path}: {exc.strerror or exc}; check its permissions") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"{what} {path} is not a regular file; give a file written by torch.save, numpy.savez or an image program")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _stamp(path: Path) -> tuple:
    """What invalidates a cached load: modification times of the path and its subfolders."""
    try:
        st = path.stat()
        subs = tuple((p.name, p.stat().st_mtime_ns) for p in _listdir(path, "image folder") if p.is_dir()) if path.is_dir() else ()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; check the path and its permissions") from None
    return (st.st_mtime_ns, st.st_size, subs)


def _from_file(path: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    # the path as given (a symlink's suffix counts, not its target's); the target only keys the cache
    x, y = _read_file(str(path.absolute()), _stamp(path), str(path.resolve()))
    x = {k: v.clone() for k, v in x.items()} if isinstance(x, dict) else x.clone()
    return x, y.clone(), int(y.max()) + 1 if len(y) else 0


def read_tensor_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The arrays of a ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.npz``
    (``numpy.load(allow_pickle=False)``) file, as a dict; nothing pickled is ever executed.

    Raises :class:`DataError` for another extension, an unreadable file, pickled objects, or a
    file that does not hold a dict.
    """
    content = _load_plain(str(path))
    if not isinstance(content, dict):
        raise DataError(f"data file {path} must hold a dict of arrays, found an object of type {type(content).__name__}")
    return content


def _load_plain(path: str) -> Any:
    where = f"data file {path}"
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"{where}: unsupported file type {suffix or '(none)'!r}; use a .pt file (torch.save) or .npz (numpy.savez)")
    with _open_regular(path, "data file") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise DataError(f"{where} is empty; save the data with torch.save or numpy.savez")
        return _parse_plain(f, where, suffix)


def _check_inflated(size: int, where: str) -> None:
    """Refuse an archive whose members would inflate beyond :data:`MAX_INPUT_BYTES` (zipfile never
    reads past a member's declared size, so the declared sizes bound what is read)."""
    if size > MAX_INPUT_BYTES:
        raise DataError(
            f"{where} holds {size / 2**20:,.0f} MiB of arrays once decompressed (the limit is {MAX_INPUT_BYTES / 2**20:,.0f} MiB): "
            "a decompression bomb, or more data than calibration needs; use a smaller file"
        )


def _parse_plain(f: Any, where: str, suffix: str) -> Any:
    try:
        if suffix == ".npz":
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    _check_inflated(sum(info.file_size for info in loaded.zip.infolist()), where)
                    return {k: loaded[k] for k in loaded.files}
            return loaded  # a single array saved with np.save under a .npz name
        if zipfile.is_zipfile(f):  # torch.save's format; a crafted one may hold deflated members
            with zipfile.ZipFile(f) as z:
                _check_inflated(sum(info.file_size for info in z.infolist()), where)
        f.seek(0)
        return torch.load(f, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as exc:  # corrupt or foreign files raise anything from pickle, zipfile, numpy
        if suffix == ".npz" and "pickle" in str(exc):
            raise DataError(f"{where} is not a .npz archive of plain arrays; save it with numpy.savez(path, x=..., y=...)") from None
        if suffix != ".npz" and "weights_only" in str(exc):
            raise DataError(
                f"{where} is not a file of plain tensors that torch.load(weights_only=True) can read; "
                f"save a dict {{'x': tensor, 'y': tensor}} with torch.save"
            ) from None
        if isinstance(exc, EOFError):
            raise DataError(f"{where} is truncated (it ends too early); save it again with torch.save or numpy.savez") from None
        raise DataError(f"{where} cannot be read ({type(exc).__name__}: {first_line(exc, '.: ')}); save it with torch.save or numpy.savez") from None


@functools.lru_cache(maxsize=8)
def _read_file(path: str, stamp: tuple, target: str = "") -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
    where = f"data file {path}"
    content = _load_plain(path)
    named = _named_inputs(content, where) if isinstance(content, dict) else None
    if named is not None:
        if "y" not in content:
            raise DataError(f"{where} holds several inputs but no 'y' (labels); save y beside them")
        y = _labels(content["y"], where)
        x = {name: _named_input(value, name, len(y), where) for name, value in named.items()}
        return x, y
    if not isinstance(content, dict) or "x" not in content or "y" not in content:
        have = f"keys {', '.join(map(repr, content)) or '(none)'}" if isinstance(content, dict) else f"an object of type {type(content).__name__}"
        raise DataError(f"{where} must hold a dict with 'x' (inputs) and 'y' (labels), found {have}")
    return _as_tensors(content["x"], content["y"], where, grey_images=True)


def _named_inputs(content: dict, where: str) -> dict[str, Any] | None:
    """Several inputs per sample: a dict under ``x`` (torch.save), or arrays ``x.NAME`` (numpy.savez,
    which cannot nest); ``None`` for a file with one input."""
    x = content.get("x")
    flat = {k[2:]: v for k, v in content.items() if isinstance(k, str) and k.startswith("x.")}
    if flat and x is not None:
        raise DataError(f"{where} holds both 'x' and inputs named 'x.NAME'; save one input as x, or several as x.NAME (or a dict under x)")
    named = x if isinstance(x, dict) else flat or None
    if named is None:
        return None
    if not named:
        raise DataError(f"{where}: x is an empty dict; give each input of the model by its forward parameter name")
    for name in named:
        if not (isinstance(name, str) and name.isidentifier()):
            raise DataError(f"{where}: input name {_short(repr(name), 60)} is not a Python identifier; name each input after the "
                            "model's forward parameter (e.g. x.src, x.mem)")
    return named


def _named_input(value: Any, name: str, n: int, where: str) -> torch.Tensor:
    """One of several inputs: float inputs as float32 and finite, integer ones (token ids, masks) as int64."""
    what = f"x.{name}"
    if isinstance(value, torch.Tensor):
        t = _dense(value, what, where)
    else:
        arr = _as_array(value, what, where)
        if arr.dtype.kind not in "iufb":
            raise DataError(f"{where}: {what} holds {arr.dtype} values, not numbers; save it as a numeric array")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype == torch.bool:
        pass
    elif t.dtype in _INT_DTYPES:
        t = t.long()
    elif t.is_floating_point():
        t = t.float()  # a float64 beyond float32's range becomes inf, refused here
        if not bool(torch.isfinite(t).all()):
            raise DataError(f"{where}: {what} has NaN or inf values; inputs must be finite numbers within float32's range")
    else:
        raise DataError(f"{where}: {what} holds {t.dtype} values, not real numbers; save it as a float or integer array")
    if t.dim() < 1 or len(t) != n:
        raise DataError(f"{where}: {what} has {len(t) if t.dim() else 0} rows but y has {n} labels; give one row per sample in every input")
    return t


def _from_folder(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    x, y, num_classes = _read_folder(str(path.resolve()), _stamp(path))
    xs, ys = make_split(x, y, split)
    return torch.from_numpy(xs), torch.from_numpy(ys), num_classes


#: Pillow modes of grey images with more than 8 bits, read as numbers and scaled (``convert("L")`` clips them).
_DEEP_GREY = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
_GREY = {"1", "L", "LA", "La"} | set(_DEEP_GREY)


def _listdir(path: Path, what: str) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError as exc:
        raise DataError(f"cannot list {what} {path}: {exc.strerror or exc}; check its permissions") from None


@functools.lru_cache(maxsize=4)
def _read_folder(root_name: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray, int]:
    """All images of a class-per-subfolder tree, scaled to [0, 1]: ``(N x C x H x W, labels, K)``.

    Only regular files are opened (a FIFO named ``x.png`` is refused, not waited on); an image
    whose header declares more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS`` (a decompression
    bomb) is refused before it is decoded, and so is a folder that would not fit in memory.
    8-bit images are divided by 255, 16-bit grey ones by 65535; float images must lie in [0, 1].
    """
    from PIL import Image

    root = Path(root_name)
    subdirs = [p for p in _listdir(root, "image folder") if p.is_dir() and not p.name.startswith(".")]
    if not subdirs:
        raise DataError(f"image folder {root} has no class subfolders: put each class's images in its own subfolder (CLASS/image.png)")
    extensions = {e.lower() for e in Image.registered_extensions()}
    files: list[Path] = []
    labels: list[int] = []
    for k, sub in enumerate(subdirs):
        images = [p for p in _listdir(sub, "class folder") if p.suffix.lower() in extensions and not p.is_dir()]
        if not images:
            raise DataError(f"class folder {sub} has no images (.png, .jpg, ...); add some or remove the folder")
        files += images
        labels += [k] * len(images)
    modes, sizes = [], []
    for p in files:  # headers only: modes and sizes
        with _image(p) as im:
            modes.append(im.mode)
            sizes.append(im.size)
    mode = "L" if all(m in _GREY for m in modes) else "RGB"
    size = Counter(sizes).most_common(1)[0][0]
    need = len(files) * size[0] * size[1] * (1 if mode == "L" else 3) * 4
    if need > MAX_INPUT_BYTES:
        raise DataError(
            f"image folder {root} would take {need / 2**30:.1f} GiB as float32 ({len(files)} images of {size[0]}x{size[1]}); "
            f"the limit is {MAX_INPUT_BYTES / 2**30:.0f} GiB: use smaller or fewer images"
        )
    arrays = []
    for p in files:
        with _image(p) as im:
            try:
                arrays.append(_pixels(im, mode, size, p))
            except DataError:
                raise
            except Exception as exc:  # decoding arbitrary bytes: any failure is the file's fault
                raise DataError(f"cannot read image {p}: {first_line(exc, '.: ')}; remove or replace the file") from None
    x = np.stack(arrays)
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), np.asarray(labels, dtype=np.int64), len(subdirs)


def _pixels(im: Any, mode: str, size: tuple[int, int], p: Path) -> np.ndarray:
    """One image as float32 in [0, 1]: ``H x W`` for ``mode`` ``"L"``, ``H x W x 3`` for ``"RGB"``."""
    from PIL import Image

    if im.mode not in _DEEP_GREY:
        im = im.convert(mode)
        if im.size != size:
            im = im.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0
    scale = _DEEP_GREY[im.mode]
    a = np.asarray(im).astype(np.float64)
    if not np.isfinite(a).all() or a.size and (a.min() < 0 or a.max() > scale):
        span = "[0, 1]" if scale == 1.0 else f"0..{int(scale)}"
        raise DataError(f"image {p} ({im.mode}) has pixel values outside {span}, which cannot be scaled to [0, 1]; save it as an 8- or 16-bit image")
    grey = Image.fromarray((a / scale).astype(np.float32), "F")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    out = np.clip(np.asarray(grey, dtype=np.float32), 0.0, 1.0)
    return out if mode == "L" else np.repeat(out[:, :, None], 3, axis=2)


class _image:
    """``with _image(path) as im``: a Pillow image opened from a regular file, with decompression
    bombs (the error and the warning) and unreadable headers turned into one-line :class:`DataError`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: Any = None
        self.im: Any = None

    def __enter__(self) -> Any:
        from PIL import Image

        self.file = _open_regular(self.path, "image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self.im = Image.open(self.file)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            self.file.close()
            raise DataError(
                f"image {self.path} is too large to decode safely ({first_line(exc, '.: ').split(',')[0]}): a possible decompression bomb; "
                "shrink it or remove it"
            ) from None
        except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError from a broken header ...
            self.file.close()
            raise DataError(f"cannot read image {self.path}: {first_line(exc, '.: ')}; remove or replace the file") from None
        return self.im

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.im is not None:
                self.im.close()
        finally:
            self.file.close()


__all__ = [
    "DataError", "LabeledData", "MAX_CLASSES", "MAX_INPUT_BYTES", "SPLITS", "adapt_inputs", "load_data", "make_split", "parse_classes", "read_tensor_file", "split_indices",
]
