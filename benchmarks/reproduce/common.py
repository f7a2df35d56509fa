"""Shared helpers of the reproduction benchmarks: configs, data splits, a cached model-pair trainer, timing.

The protocol (docs/results.md, docs/findings.md): two models of one architecture are trained from
different initialisations on disjoint class subsets (5 + 5), both ending in the same fixed
class-embedding head (same head seed), so every backbone layer can be merged.

* Data: the dataset's train split minus a seeded, per-class 10 % validation hold-out (used only to
  choose MuDSC's alpha); calibration images for merging come from the rest of the train split
  (both tasks); metrics are taken on the test split.
* Training ends with a precise-BatchNorm pass: the running statistics are recomputed as an exact
  average over the model's own training images (:func:`mudsc_graph.merging.batchnorm.reset_bn_stats`), because
  the short training budgets leave momentum-averaged statistics far behind the weights (a
  ResNet-20 x4 measured 72 % on its task before the pass, 96 % after).
* Model pairs are cached under ``$MUDSC_CACHE_DIR/reproduce`` (or ``~/.cache/mudsc/reproduce``),
  keyed by a hash of everything that affects the trained weights.

The backbone options and the cache files are the demo's (:mod:`mudsc_experiments.cache`), imported, not copied.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from mudsc_graph.merging.batchnorm import reset_bn_stats
from mudsc_graph.io.data import LabeledData, load_data
from mudsc_experiments.cache import CACHE_ENV, EMBED_DIM, backbone_options, config_key, load_cached, save_cached
from mudsc_graph.plugin.registry import get_registry
from mudsc_experiments.tasks import DEFAULT_SCALE, HeadedModel, split_classes, train_classifier, with_class_head

#: Bumped whenever training or data preparation changes in a way the config hash does not capture.
CACHE_VERSION = 2
#: Seed of the fixed class-embedding head shared by every model.
HEAD_SEED = 0


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ArchSetting:
    """One architecture setting of the tables: a registry name, factory options and training budget.

    ``train_limit``: at most this many training images per task (after the validation hold-out;
    ``None``: all of them). ``epochs``, ``lr``, ``batch_size``: Adam training of each model.
    ``data``: this setting's own data cut (evaluation sizes), else the run's.
    """

    label: str
    arch: str
    options: tuple[tuple[str, Any], ...] = ()
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 128
    train_limit: int | None = None
    data: "DataSetting | None" = None

    @property
    def opts(self) -> dict[str, Any]:
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.options}


def setting(label: str, arch: str, *, epochs: int, train_limit: int | None = None, lr: float = 1e-3,
            batch_size: int = 128, data: "DataSetting | None" = None, **options: Any) -> ArchSetting:
    """Shorthand: ``setting("resnet20x2", "resnet20", epochs=3, width=2)``."""
    return ArchSetting(label, arch, tuple(sorted(options.items())), epochs, lr, batch_size, train_limit, data)


@dataclass(frozen=True)
class DataSetting:
    """How the data of one dataset is cut: validation share, calibration size, optional caps on the
    test images and on the validation images that are evaluated (the whole share is held out of
    training either way)."""

    val_fraction: float = 0.1
    val_seed: int = 0
    calib_samples: int = 300
    test_limit: int | None = None
    val_limit: int | None = None


@dataclass
class TaskData:
    """The data of one (dataset, split of the classes): train (minus validation), validation, test, calibration."""

    tasks: list[list[int]]
    train: LabeledData
    val: LabeledData
    test: LabeledData
    calib_batches: list[tuple[torch.Tensor, torch.Tensor]]
    input_shape: tuple[int, ...]


# --------------------------------------------------------------------------- paths, hashing, timing


def cache_root(kind: str = "reproduce") -> Path:
    """``$MUDSC_CACHE_DIR/KIND`` if the variable is set, else ``~/.cache/mudsc/KIND``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "mudsc"
    return base / kind


def sync(device: torch.device) -> None:
    """Wait for the device, so that wall-clock timings cover its work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_seconds(models: Sequence[torch.nn.Module], batches: Sequence[torch.Tensor], device: torch.device) -> float:
    """Seconds for the models' calibration forward passes alone (after one warm-up batch)."""
    with torch.no_grad():
        for m in models:
            m(batches[0])
        sync(device)
        t0 = time.perf_counter()
        for m in models:
            for x in batches:
                m(x)
        sync(device)
    return time.perf_counter() - t0


@contextmanager
def timed(store: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``store[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - t0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs are left out."""
    vals = [float(v) for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


# --------------------------------------------------------------------------- data


def _subset(data: LabeledData, idx: torch.Tensor, name: str) -> LabeledData:
    return LabeledData(x=data.x[idx], y=data.y[idx], classes=list(data.classes), name=name)


def validation_indices(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded per-class hold-out of ``round(fraction * n_class)`` samples (at least 1)."""
    held: list[torch.Tensor] = []
    for c in sorted(set(y.tolist())):
        where = torch.nonzero(y == c).flatten()
        g = torch.Generator().manual_seed(int(seed) * 1009 + int(c))
        n = max(1, round(fraction * len(where))) if fraction > 0 else 0
        held.append(where[torch.randperm(len(where), generator=g)[:n]])
    return torch.sort(torch.cat(held)).values if held else torch.zeros(0, dtype=torch.long)


def input_shape_for(dataset: str, arch: ArchSetting) -> tuple[tuple[int, ...], dict[str, Any]]:
    """The input shape the architecture wants for ``dataset`` and its resolved factory options."""
    architecture = get_registry().architecture(arch.arch)
    probe = load_data(dataset, split="test", limit=2)
    opts = backbone_options(architecture, arch.opts, tuple(probe.x.shape[1:]))
    if "in_features" in opts:
        return tuple(probe.x.shape[1:]), opts
    return tuple(architecture.example_inputs(2)[0].shape[1:]), opts


def prepare_data(dataset: str, split: int, input_shape: tuple[int, ...], ds: DataSetting, n_tasks: int = 2) -> TaskData:
    """Train / validation / test / calibration data for class split ``split`` (``split_classes(K, n_tasks, seed=split)``)."""
    full = load_data(dataset, split="train", input_shape=input_shape)
    test = load_data(dataset, split="test", input_shape=input_shape)
    tasks = [[full.classes[i] for i in part] for part in split_classes(len(full.classes), n_tasks, seed=split)]
    val_idx = validation_indices(full.y, ds.val_fraction, ds.val_seed)
    keep = torch.ones(len(full), dtype=torch.bool)
    keep[val_idx] = False
    train = _subset(full, torch.nonzero(keep).flatten(), f"{dataset}:train-val")
    val = _capped(_subset(full, val_idx, f"{dataset}:val"), ds.val_limit, seed=54321)
    test = _capped(test, ds.test_limit, seed=12345)
    union = torch.tensor([c for t in tasks for c in t])
    pool = torch.nonzero(torch.isin(train.y, union)).flatten()
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(777 + split))[: ds.calib_samples]
    cidx = torch.sort(pool[order]).values
    cx, cy = train.x[cidx], train.y[cidx]
    calib_batches = list(zip(cx.split(100), cy.split(100)))
    return TaskData(tasks, train, val, test, calib_batches, input_shape)


def _capped(data: LabeledData, limit: int | None, seed: int) -> LabeledData:
    """A seeded random subset of ``limit`` samples (in their original order), or ``data`` itself."""
    if limit is None or limit >= len(data):
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit]
    return _subset(data, torch.sort(order).values, f"{data.name}[:{limit}]")


def _limit_task(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int], limit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.nonzero(torch.isin(y, torch.tensor(list(classes)))).flatten()
    if limit is not None and limit < len(idx):
        idx = torch.sort(idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:limit]]).values
    return x[idx], y[idx]


# --------------------------------------------------------------------------- model pairs


@dataclass
class ModelPair:
    models: list[HeadedModel]
    trained: bool
    train_seconds: list[float]
    cache_path: str
    config: dict[str, Any] = field(default_factory=dict)


def model_pair(dataset: str, arch: ArchSetting, split: int, data: TaskData, ds: DataSetting, *,
               cache_dir: Path | None = None, retrain: bool = False, log: Any = None) -> ModelPair:
    """Model A trained on task A, model B on task B (init seeds differ; same head seed), cached; one
    model per task when ``data`` has more than two."""
    architecture = get_registry().architecture(arch.arch)
    _, opts = input_shape_for(dataset, arch)
    num_classes = max(data.train.classes) + 1
    config = {
        "version": CACHE_VERSION, "kind": "reproduce-pair", "dataset": dataset, "arch": architecture.name,
        "arch_options": opts, "embed_dim": EMBED_DIM, "scale": DEFAULT_SCALE, "head_seed": HEAD_SEED,
        "tasks": data.tasks, "split": split, "epochs": arch.epochs, "lr": arch.lr, "batch_size": arch.batch_size,
        "train_limit": arch.train_limit, "optimizer": "adam", "val_fraction": ds.val_fraction, "val_seed": ds.val_seed,
        "train_samples": len(data.train),
    }
    root = cache_dir if cache_dir is not None else cache_root()
    path = root / f"{arch.label}-{dataset.replace(':', '_').replace('/', '_')}-s{split}-{config_key(config)}.pt"
    seeds = [1000 * split + 1 + i for i in range(len(data.tasks))]

    def fresh(i: int) -> HeadedModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeds[i])
            return with_class_head(architecture.build(**opts), EMBED_DIM, num_classes, seed=HEAD_SEED)

    models = [fresh(i) for i in range(len(seeds))]
    states = None if retrain else load_cached(path, len(models), config)
    seconds = [0.0] * len(models)
    trained = states is None
    if states is None:
        for i, (model, task) in enumerate(zip(models, data.tasks)):
            x, y = _limit_task(data.train.x, data.train.y, task, arch.train_limit, seeds[i])
            t0 = time.perf_counter()
            train_classifier(model, x, y, task, epochs=arch.epochs, lr=arch.lr, batch_size=arch.batch_size, seed=seeds[i])
            reset_bn_stats(model, [(b,) for b in x.split(100)])
            seconds[i] = time.perf_counter() - t0
            if log:
                log(f"    trained model {'ABCDEFGH'[i]} ({len(y)} images x {arch.epochs} epochs) in {seconds[i]:.1f}s")
        states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
        save_cached(path, config, states, train_seconds=seconds)
    else:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            seconds = [float(s) for s in blob.get("train_seconds", seconds)]
        except Exception:
            pass
    for m, s in zip(models, states):
        m.load_state_dict(s)
        m.eval()
    return ModelPair(models, trained, seconds, str(path), config)


def summarize_by(rows: Sequence[dict[str, Any]], fields: Sequence[str], averaged: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One summary per combination of ``fields`` (in row order): the number of splits, the joint and
    mean per-task accuracy's mean and sample std over them, and the plain mean of each ``averaged`` field."""
    key = lambda r: tuple(r[f] for f in fields)  # noqa: E731
    out = []
    for k in dict.fromkeys(key(r) for r in rows):
        group = [r for r in rows if key(r) == k]
        s = {**dict(zip(fields, k)), "n_splits": len(group)}
        s.update({f: mean_std([r[f] for r in group])[0] for f in averaged})
        for metric in ("joint", "mean_per_task"):
            s[f"{metric}_mean"], s[f"{metric}_std"] = mean_std([r[metric] for r in group])
        out.append(s)
    return out


def as_jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return as_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {k: as_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
