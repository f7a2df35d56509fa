"""Labelled data for calibration and evaluation: registered datasets, tensor files, image folders.

A data *spec* says where the data comes from (``--data SPEC`` on the command line)::

    digits              a registered dataset (``mudsc plugins`` lists them)
    mnist5k:0-4         only classes 0..4; labels keep their original ids
    digits:0,3,5-6      ids and ranges mix freely
    runs/feats.pt       a dict {"x": Tensor, "y": Tensor} saved with torch.save (both splits)
    feats.npz:5-9       arrays x and y saved with numpy.savez; a class selection works here too
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MudscError, PluginError

SPLITS = ("train", "test")
#: Fraction of each class that goes to the train split (built-ins and image folders).
TRAIN_FRACTION = 0.8
#: Seed of the per-class shuffle that splits train from test, and of ``limit``'s shuffle.
SPLIT_SEED = 0
FILE_SUFFIXES = (".pt", ".pth", ".npz")
_SPEC_HELP = "a spec is NAME, NAME:CLASSES (e.g. mnist5k:0-4), a .pt/.npz file or an image folder"


class DataError(MudscError):
    """A data spec, file or folder cannot be loaded, or its inputs do not fit the model."""


@dataclass
class LabeledData:
    """Inputs ``x`` (``N x ...`` float) with class labels ``y`` (``N`` long).

    ``classes`` lists the class ids this data covers (the selection of ``NAME:CLASSES``, else all
    ids of the source); labels keep their original ids, so ``mnist5k:5-9`` has labels 5..9.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[int]
    name: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batches(self, batch_size: int = 100, shuffle: bool = False, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The data as ``(x, y)`` batches; with ``shuffle`` in a seeded random order."""
        if int(batch_size) < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        return [(self.x[idx], self.y[idx]) for idx in order.split(int(batch_size))]


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


def parse_classes(text: str, num_classes: int) -> list[int]:
    """The sorted class ids of a selection like ``0-4``, ``5-9``, ``0,2,4`` or ``0-2,7``."""
    text = text.strip()
    if not text:
        raise DataError("empty class selection: give class ids like 0-4, 5-9 or 0,2,4")
    chosen: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise DataError(f"bad class selection {text!r}: {part.strip()!r} is not a class id or a range; use e.g. 0-4, 5-9 or 0,2,4")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise DataError(f"bad class selection {text!r}: the range {part.strip()!r} runs backwards; write {hi}-{lo}")
        if hi >= num_classes:
            raise DataError(f"class {hi} in the selection {text!r} is out of range: this data has {num_classes} classes (ids 0-{num_classes - 1})")
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
    if limit is not None and int(limit) < 1:
        raise DataError(f"limit must be at least 1, got {limit}")
    kind, source, selection = _resolve(spec, registry)
    if kind == "dataset":
        x, y, num_classes = _from_registry(source, split)
    elif kind == "folder":
        x, y, num_classes = _from_folder(source, split)
    else:
        x, y, num_classes = _from_file(source)
    if len(y) == 0:
        raise DataError(f"{spec!r} has no samples in its {split} split")
    pad_value = float(x.min()) if x.numel() else 0.0  # a black pixel, before any class selection
    if selection is None:
        classes = list(range(num_classes))
    else:
        classes = parse_classes(selection, num_classes)
        keep = torch.isin(y, torch.tensor(classes, dtype=y.dtype))
        if not bool(keep.any()):
            raise DataError(f"{spec!r} selects no samples of the {split} split: none has a class in {classes}")
        x, y = x[keep], y[keep]
    if limit is not None:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(seed)))[: int(limit)]
        x, y = x[order], y[order]
    if input_shape is not None:
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
        from .registry import get_registry

        registry = get_registry()
    candidates = [(spec, None)]
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        candidates.append((head, tail))
    for source, selection in candidates:  # the whole spec first: a name or path may contain ':'
        if source in registry.datasets:
            return "dataset", (registry, source), selection
        path = Path(source).expanduser()
        if path.exists():
            return ("folder" if path.is_dir() else "file"), path, selection
    source = candidates[-1][0]
    if source.lower().endswith(FILE_SUFFIXES) or "/" in source or os.sep in source or source.startswith(("~", ".")):
        raise DataError(f"no such file or folder: {source!r}; check the path ({_SPEC_HELP})")
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


def _as_tensors(x: Any, y: Any, where: str, *, grey_images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if x.dim() < 2:
        raise DataError(f"{where}: x must hold one input per row (N x ...), got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.is_floating_point() and not bool((y == y.round()).all()):
        raise DataError(f"{where}: y must be a 1-D tensor of integer class labels, got shape {tuple(y.shape)} {y.dtype}")
    if len(x) != len(y):
        raise DataError(f"{where}: x has {len(x)} samples but y has {len(y)} labels; they must match")
    if grey_images and x.dim() == 3:  # N x H x W grey images
        x = x.unsqueeze(1)
    y = y.long()
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{where}: labels must be class ids 0..K-1, got {int(y.min())}")
    return x.float(), y


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0].rstrip(".: ")


def _stamp(path: Path) -> tuple:
    """What invalidates a cached load: modification times of the path and its subfolders."""
    st = path.stat()
    subs = tuple((p.name, p.stat().st_mtime_ns) for p in sorted(path.iterdir()) if p.is_dir()) if path.is_dir() else ()
    return (st.st_mtime_ns, st.st_size, subs)


def _from_file(path: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    x, y = _read_file(str(path.resolve()), _stamp(path))
    return x.clone(), y.clone(), int(y.max()) + 1 if len(y) else 0


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
    try:
        if suffix == ".npz":
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    return {k: loaded[k] for k in loaded.files}
            return loaded  # a single array saved with np.save under a .npz name
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise anything from pickle, zipfile, numpy
        if suffix == ".npz" and "pickle" in str(exc):
            raise DataError(f"{where} is not a .npz archive of plain arrays; save it with numpy.savez(path, x=..., y=...)") from None
        if suffix != ".npz" and "weights_only" in str(exc):
            raise DataError(
                f"{where} is not a file of plain tensors that torch.load(weights_only=True) can read; "
                f"save a dict {{'x': tensor, 'y': tensor}} with torch.save"
            ) from None
        raise DataError(f"{where} cannot be read ({type(exc).__name__}: {_first_line(exc)}); save it with torch.save or numpy.savez") from None


@functools.lru_cache(maxsize=8)
def _read_file(path: str, stamp: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"data file {path}"
    content = _load_plain(path)
    if not isinstance(content, dict) or "x" not in content or "y" not in content:
        have = f"keys {', '.join(map(repr, content)) or '(none)'}" if isinstance(content, dict) else f"an object of type {type(content).__name__}"
        raise DataError(f"{where} must hold a dict with 'x' (inputs) and 'y' (labels), found {have}")
    return _as_tensors(content["x"], content["y"], where, grey_images=True)


def _from_folder(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    x, y, num_classes = _read_folder(str(path.resolve()), _stamp(path))
    xs, ys = make_split(x, y, split)
    return torch.from_numpy(xs), torch.from_numpy(ys), num_classes


@functools.lru_cache(maxsize=4)
def _read_folder(root_name: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray, int]:
    """All images of a class-per-subfolder tree, scaled to [0, 1]: ``(N x C x H x W, labels, K)``."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root_name)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataError(f"image folder {root} has no class subfolders: put each class's images in its own subfolder (CLASS/image.png)")
    extensions = {e.lower() for e in Image.registered_extensions()}
    files: list[Path] = []
    labels: list[int] = []
    for k, sub in enumerate(subdirs):
        images = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        if not images:
            raise DataError(f"class folder {sub} has no images (.png, .jpg, ...); add some or remove the folder")
        files += images
        labels += [k] * len(images)
    modes, sizes = [], []
    for p in files:  # headers only: modes and sizes
        try:
            with Image.open(p) as im:
                modes.append(im.mode)
                sizes.append(im.size)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"cannot read image {p}: {_first_line(exc)}; remove or replace the file") from None
    mode = "L" if all(m in ("1", "L", "LA") for m in modes) else "RGB"
    size = Counter(sizes).most_common(1)[0][0]
    arrays = []
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if im.size != size:
                    im = im.resize(size, Image.Resampling.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"cannot read image {p}: {_first_line(exc)}; remove or replace the file") from None
    x = np.stack(arrays)
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), np.asarray(labels, dtype=np.int64), len(subdirs)


__all__ = [
    "DataError", "LabeledData", "SPLITS", "adapt_inputs", "load_data", "make_split", "parse_classes", "read_tensor_file", "split_indices",
]
