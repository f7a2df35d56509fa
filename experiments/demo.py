"""The built-in demo: train two models on disjoint halves of a bundled dataset, merge them every way.

``run_demo()`` needs no files of the user's. It follows the paper's protocol (docs/findings.md, "What was run"):

1. load a bundled real dataset (``mnist5k`` by default: 5000 MNIST digits, 80/20 train/test);
2. train two models of one architecture from different seeds, model A on classes 0-4 and model B
   on 5-9, both ending in the same fixed class-embedding head (:mod:`mudsc_experiments.tasks`);
   their weights are cached under ``cache_dir``, keyed by a hash of everything that affects them;
3. merge the two backbones with every method (``average`` ... ``mudsc-zip``), calibrating on a
   few hundred train images of both halves, and put the shared head back on;
4. evaluate everything on the test split: joint accuracy, accuracy per task and their mean
   (:func:`mudsc_experiments.evaluate.task_metrics`), plus the seconds each merge took.

Only the backbones are merged: the head is the same fixed buffer in both models, so the backbone's
output coordinates are shared (not permutable), exactly as with the paper's CLIP-embedding heads.

    >>> result = run_demo()
    >>> for row in result.rows: print(row.name, row.joint, row.mean_per_task)
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from mudsc_graph.errors import MudscError
from mudsc_graph.merging.options import MergeOptions
from mudsc_graph.merging.progress import NullReporter, Reporter
from .cache import CACHE_ENV, EMBED_DIM, config_key, load_cached, save_cached
from .cache import backbone_options as _backbone_options  # the name run_demo uses
from .evaluate import ensemble_logits, predict_logits, task_metrics
from .tasks import (
    DEFAULT_SCALE,
    HeadedModel,
    split_classes,
    train_classifier,
    with_class_head,
)

__all__ = ["DEFAULT_METHODS", "DEMO_METHODS", "DemoError", "DemoResult", "DemoRow", "default_cache_dir", "run_demo", "parse_method",
           "parse_demo_method"]

#: Every method of the demo, in table order: ``NAME`` or ``mudsc-align`` / ``mudsc-zip``.
DEFAULT_METHODS: tuple[str, ...] = (
    "average", "weight_matching", "weight_zip", "activation_matching", "zipit", "mudsc-align", "mudsc-zip",
)
#: What a demo method's name may end with, and what it adds to the merge.
VARIANTS: dict[str, dict[str, Any]] = {"+refit": {"refit": True}, "+repair": {"repair": True}}
#: The image demo's rows: every method, and MuDSC-zip with the least-squares refit, at one model's
#: width and at a width budget of 1.5 (``@W``: the merged model W times as wide as one model).
DEMO_METHODS: tuple[str, ...] = (*DEFAULT_METHODS, "mudsc-zip+refit", "mudsc-zip+refit@1.5")
#: Bumped whenever training changes in a way that the config hash does not capture.
CACHE_VERSION = 1


class DemoError(MudscError):
    """The demo cannot run as asked (unknown method, bad sizes, unreadable cache)."""


@dataclass
class DemoRow:
    """One line of the demo table; accuracies in [0, 1], ``merge_seconds`` only for merges."""

    name: str
    kind: str  # "base", "ensemble" or "merged"
    joint: float
    task_a: float
    task_b: float
    mean_per_task: float
    merge_seconds: float | None = None
    sweeps: int | None = None


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: the rows, the resolved config and where time went."""

    rows: list[DemoRow]
    tasks: list[list[int]]
    config: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    trained: bool = False
    cache_path: str | None = None
    samples: dict[str, int] = field(default_factory=dict)

    def row(self, name: str) -> DemoRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [asdict(r) for r in self.rows],
            "tasks": self.tasks,
            "config": self.config,
            "timings": self.timings,
            "trained": self.trained,
            "cache_path": self.cache_path,
            "samples": self.samples,
        }


class _Prefixed:
    """A reporter that prefixes every stage name (``"model A: training"``)."""

    def __init__(self, inner: Reporter, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    def start(self, stage: str, total: int | None = None) -> None:
        self.inner.start(f"{self.prefix}{stage}", total)

    def advance(self, n: int = 1, **info: Any) -> None:
        self.inner.advance(n, **info)

    def end(self) -> None:
        self.inner.end()


def default_cache_dir() -> Path:
    """``$MUDSC_CACHE_DIR`` if set, else ``~/.cache/mudsc/demo``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mudsc" / "demo"


def parse_demo_method(name: str) -> tuple[str, str, dict[str, Any]]:
    """``"mudsc-zip+refit@1.5"`` -> ``("mudsc", "zip", {"refit": True, "width": 1.5})``:
    :func:`parse_method`, a variant of :data:`VARIANTS` or none, and a width budget ``@W`` or none."""
    name, at, width = name.partition("@")
    base, plus, variant = name.partition("+")
    extras = VARIANTS.get(plus + variant, None) if plus else {}
    if extras is None:
        raise DemoError(f"unknown variant {plus + variant!r} of demo method {name!r}; use {' or '.join(VARIANTS)}")
    if at:
        try:
            extras = {**extras, "width": float(width)}
        except ValueError:
            raise DemoError(f"demo method {name}@{width}: the width after @ must be a number, e.g. mudsc-zip@1.5") from None
    return (*parse_method(base), extras)


def parse_method(name: str) -> tuple[str, str]:
    """``"zipit"`` -> ``("zipit", "zip")``; ``"mudsc-align"`` -> ``("mudsc", "align")``; ``"mudsc"`` is ``mudsc-zip``."""
    from mudsc_graph import get_registry

    base, _, mode = name.partition("-")
    if base == "mudsc":
        mode = mode or "zip"
        if mode not in ("align", "zip"):
            raise DemoError(f"unknown demo method {name!r}: mudsc takes -align or -zip")
        return base, mode
    if mode or base not in get_registry().method_names():
        choices = ", ".join(DEFAULT_METHODS)
        raise DemoError(f"unknown demo method {name!r}; choose from {choices}")
    return base, "align" if base in ("weight_matching", "activation_matching") else "zip"


def run_demo(
    *,
    dataset: str = "mnist5k",
    arch: str = "mlp",
    arch_options: dict[str, Any] | None = None,
    methods: Sequence[str] = DEMO_METHODS,
    alpha: float = 0.5,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    retrain: bool = False,
    calib_samples: int = 500,
    device: str | torch.device = "cpu",
    reporter: Reporter | None = None,
) -> DemoResult:
    """Train (or load from the cache) two models on disjoint class halves, merge them, evaluate.

    ``dataset``: a data spec (``mnist5k``, ``digits``, ``animal_mnist``, ``mnist5k:0-3`` ...);
    its classes are split into two contiguous halves (model A gets the lower one). ``arch`` / ``arch_options``: any registered
    architecture whose factory takes ``num_classes`` (set to the embedding width; for the MLP the
    default is the paper's 1024-1024-1024-512 and ``in_features`` follows the data). ``methods``:
    names from :data:`DEFAULT_METHODS`, each with a variant of :data:`VARIANTS` or not. ``alpha``: MuDSC's weight-space share. ``epochs``, ``lr``,
    ``batch_size``: Adam training of each model. ``cache_dir``: where trained weights are kept
    (default :func:`default_cache_dir`); ``retrain`` ignores and overwrites the cache.
    ``calib_samples``: train images (both halves) used for activation statistics and BatchNorm
    resets. ``reporter`` sees stages ``model A: training``, ``merging`` (one step per method)
    and each merge's own stages prefixed with the method name.
    """
    from mudsc_graph.plugin.registry import get_registry

    reporter = reporter or NullReporter()
    parsed = [(m, *parse_demo_method(m)) for m in methods]
    if epochs < 0 or calib_samples < 1 or batch_size < 1:
        raise DemoError(f"need epochs >= 0, calib_samples >= 1 and batch_size >= 1 (got {epochs}, {calib_samples}, {batch_size})")
    dev = torch.device(device)
    timings: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    architecture = get_registry().architecture(arch)
    data = _DemoData.load(dataset, architecture, arch_options, calib_samples)
    timings["data"] = time.perf_counter() - t0

    config = {
        "version": CACHE_VERSION, "dataset": dataset, "train_samples": len(data.train), "arch": architecture.name,
        "arch_options": data.options, "embed_dim": EMBED_DIM, "scale": DEFAULT_SCALE, "tasks": data.tasks, "epochs": epochs,
        "lr": lr, "batch_size": batch_size, "optimizer": "adam", "seed": seed,
    }
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path = cache_root / f"{architecture.name}-{dataset.replace(':', '_').replace('/', '_')}-{config_key(config)}.pt"
    t0 = time.perf_counter()
    models, trained = _trained_models(architecture, data, config, cache_path, retrain, dev, reporter)
    timings["train" if trained else "load_cache"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows: list[DemoRow] = []

    def add(name: str, kind: str, outputs: torch.Tensor, seconds: float | None = None, sweeps: int | None = None) -> None:
        m = task_metrics(outputs, None, data.test.y, data.tasks)
        rows.append(DemoRow(name, kind, m.joint, m.per_task[0], m.per_task[1], m.mean_per_task, seconds, sweeps))

    for i, m in enumerate(models):
        add(f"model {'AB'[i]}", "base", predict_logits(m, data.test.x, device=dev))
    add("ensemble", "ensemble", ensemble_logits(models, data.test.x, classes=data.tasks, device=dev))
    timings["evaluate_bases"] = time.perf_counter() - t0

    union = torch.tensor([c for t in data.tasks for c in t])
    keep = torch.isin(data.calib.y, union)
    calib_batches = [(x, y) for x, y in zip(data.calib.x[keep].split(100), data.calib.y[keep].split(100))]
    reporter.start("merging", total=len(parsed))
    try:
        for name, method, mode, extras in parsed:
            t0 = time.perf_counter()
            options = MergeOptions(method=method, mode=mode, alpha=alpha, seed=seed, device=dev, **extras)
            merged, sweeps = _merged(models, calib_batches, options, _Prefixed(reporter, f"{name}: "))
            seconds = time.perf_counter() - t0
            add(name, "merged", predict_logits(merged, data.test.x, device=dev), seconds, sweeps)
            timings[f"merge:{name}"] = seconds
            reporter.advance(1, method=name, joint=rows[-1].joint)
    finally:
        reporter.end()
    timings["total"] = time.perf_counter() - t_all
    return DemoResult(
        rows=rows, tasks=data.tasks, config=config, timings=timings, trained=trained, cache_path=str(cache_path),
        samples={"train": len(data.train), "test": len(data.test), "calibration": int(keep.sum())},
    )


@dataclass
class _DemoData:
    """The demo's splits of one dataset, its two tasks and the backbone's options."""

    train: Any
    test: Any
    calib: Any
    tasks: list[list[int]]
    num_classes: int
    options: dict[str, Any]

    @classmethod
    def load(cls, dataset: str, architecture: Any, arch_options: dict[str, Any] | None, calib_samples: int) -> "_DemoData":
        from mudsc_graph.io.data import load_data

        probe = load_data(dataset, split="train")
        if len(probe.classes) < 2:
            raise DemoError(f"{dataset!r} has {len(probe.classes)} class; the demo splits the classes into two halves, so it needs at least 2")
        tasks = [[probe.classes[i] for i in half] for half in split_classes(len(probe.classes), 2)]
        opts = _backbone_options(architecture, arch_options, tuple(probe.x.shape[1:]))
        example = architecture.example_inputs(2)[0]
        input_shape = tuple(probe.x.shape[1:]) if "in_features" in opts else tuple(example.shape[1:])
        return cls(
            load_data(dataset, split="train", input_shape=input_shape), load_data(dataset, split="test", input_shape=input_shape),
            load_data(dataset, split="train", input_shape=input_shape, limit=calib_samples), tasks, max(probe.classes) + 1, opts,
        )


def _trained_models(architecture: Any, data: _DemoData, config: dict, cache_path: Path, retrain: bool, dev: torch.device,
                    reporter: Reporter) -> tuple[list[HeadedModel], bool]:
    """The two base models, from the cache or trained (then cached); whether they were trained."""
    seed = config["seed"]

    def fresh(i: int) -> HeadedModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + i)
            return with_class_head(architecture.build(**data.options), EMBED_DIM, data.num_classes, seed=seed)

    models = [fresh(i) for i in range(len(data.tasks))]
    states = None if retrain else load_cached(cache_path, len(models), config)
    trained = states is None
    if states is None:
        for i, (model, task) in enumerate(zip(models, data.tasks)):
            train_classifier(
                model, data.train.x, data.train.y, task, epochs=config["epochs"], lr=config["lr"], batch_size=config["batch_size"],
                seed=seed * 1000 + i, device=dev, reporter=_Prefixed(reporter, f"model {'AB'[i]}: "),
            )
        states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
        save_cached(cache_path, config, states)
    for m, s in zip(models, states):
        m.load_state_dict(s)
        m.to(dev).eval()
    return models, trained


def _merged(models: list[HeadedModel], batches: list, options: MergeOptions, reporter: Reporter) -> tuple[HeadedModel, int]:
    """The backbones merged, under model A's (shared, fixed) head; and the sweeps it took."""
    from mudsc_graph.merging.api import merge

    result = merge([m.backbone for m in models], data=batches, options=options, reporter=reporter)
    return HeadedModel(result.model, copy.deepcopy(models[0].head)).to(options.device).eval(), result.sweeps
