"""The trained-model cache shared by ``mudsc demo`` and the reproduction benchmarks.

Both train pairs of models of one architecture that end in the fixed class-embedding head of
:mod:`mudsc_experiments.tasks`, and both keep the trained weights on disk, keyed by a hash
of everything that affects them. This module holds what they share:

* :func:`backbone_options`: the factory options of such a backbone (the demo's defaults, the
  caller's options, the embedding width :data:`EMBED_DIM` as ``num_classes``, the data's flattened
  size as ``in_features`` where the factory takes it);
* :func:`config_key`, :func:`save_cached`, :func:`load_cached`: the cache files (one per config,
  named by its hash, written atomically, read back only for the very same config);
* :data:`CACHE_ENV`: the environment variable that moves the cache folder.

Where each caller keeps its files is its own choice: the demo under :func:`mudsc_experiments.demo.default_cache_dir`,
the benchmarks under ``$MUDSC_CACHE_DIR/<kind>``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["ARCH_DEFAULTS", "CACHE_ENV", "EMBED_DIM", "backbone_options", "config_key", "load_cached", "save_cached"]

#: Architecture options used unless told otherwise: the paper's MNIST MLP, no bias.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {"mlp": {"hidden": (1024, 1024, 1024, 512), "bias": False}}
#: Size of the shared class-embedding space (the backbone's output width).
EMBED_DIM = 128
#: Environment variable that overrides the default cache folder.
CACHE_ENV = "MUDSC_CACHE_DIR"


def backbone_options(architecture: Any, arch_options: dict[str, Any] | None, x_shape: tuple[int, ...]) -> dict[str, Any]:
    """The factory options: :data:`ARCH_DEFAULTS`, the caller's options, the embedding width as classes,
    and the data's flattened size (``x_shape``: one sample's shape) as ``in_features`` where the factory takes it."""
    opts = {**ARCH_DEFAULTS.get(architecture.name, {}), **(arch_options or {})}
    opts["num_classes"] = EMBED_DIM
    try:
        params = inspect.signature(architecture.factory).parameters
    except (TypeError, ValueError):
        params = {}
    if "in_features" in params and "in_features" not in (arch_options or {}):
        opts["in_features"] = math.prod(x_shape)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}


def config_key(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able config: the name of its cache file."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _save_atomic(path: Path, obj: Any) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace``: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_cached(path: Path, config: dict[str, Any], states: list[dict[str, torch.Tensor]], **extra: Any) -> None:
    """Cache trained state dicts with the config that made them (atomically); ``extra`` is stored beside them."""
    _save_atomic(path, {"config": json.dumps(config, sort_keys=True, default=str), "models": states, **extra})


def load_cached(path: Path, n_models: int, config: dict[str, Any]) -> list[dict[str, torch.Tensor]] | None:
    """The cached state dicts, or ``None`` when the file is missing, unreadable or for another config."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt or foreign file: retrain and overwrite it
        return None
    if not isinstance(blob, dict) or blob.get("config") != json.dumps(config, sort_keys=True, default=str):
        return None
    states = blob.get("models")
    if not isinstance(states, list) or len(states) != n_models:
        return None
    return states
