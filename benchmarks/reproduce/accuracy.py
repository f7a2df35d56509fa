"""Reproduce the paper's accuracy tables: every merging method on model pairs trained on disjoint 5+5 class splits.

Run::

    python -m benchmarks.reproduce.accuracy [--quick] [--out DIR] [--datasets mnist5k animal_mnist]
        [--archs mlp resnet20x1 ...] [--splits N] [--threads N] [--jobs N]

For each dataset, architecture setting and class split ``k`` (``split_classes(10, 2, seed=k)``),
model A is trained on task A and model B on task B (different init seeds, the same fixed
class-embedding head; cached, see :mod:`common`). Both backbones are prepared once (BatchNorm
reset, analysis, activation statistics: :func:`mudsc_graph.prepare`) and merged with every method;
MuDSC-align / MuDSC-zip run the alpha sweep (full: 0.1, 0.3, ..., 0.9; ``--alphas`` for a finer one), and alpha is chosen on a 10 % validation
hold-out of the train split (best mean per-task accuracy; ties go to the better joint accuracy,
then to the smaller alpha). Test metrics (joint, task A, task B, mean per task) are reported at the
chosen alpha and for the whole sweep, with the base models and their ensemble as references,
as mean +- sample std over splits.

Outputs in ``--out`` (default ``benchmark-results/accuracy``; quick: ``benchmark-results/accuracy-quick``;
docs/results/ gets them through ``run_all --publish``): ``accuracy.csv`` (one row per
dataset/arch/split/method/alpha), ``accuracy_summary.csv`` (mean +- std per dataset/arch/method),
``alpha_sweep.csv`` (MuDSC's sweep, aggregated over splits), ``accuracy.md`` (one table per
dataset/arch) and ``accuracy_run.json`` (settings, timings, the pairs' training). Everything is seeded: two runs give the same numbers on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from benchmarks import default_out
from benchmarks.reproduce.common import (
    ArchSetting,
    DataSetting,
    as_jsonable,
    input_shape_for,
    mean_std,
    model_pair,
    prepare_data,
    setting,
    timed,
)
from mudsc_experiments.demo import DEFAULT_METHODS, parse_method
from mudsc_experiments.evaluate import ensemble_logits, predict_logits, task_metrics
from mudsc_experiments.tasks import HeadedModel
from mudsc_graph.merging.api import prepare

DATASETS: tuple[str, ...] = ("mnist5k", "animal_mnist")
#: The full sweep covers 0.1...0.9 in steps of 0.2: the 9-point sweep (23 merges per pair instead of
#: 15) does not fit the hour on 2 cores; ``--alphas 0.1 0.2 ... 0.9`` runs it.
FULL_ALPHAS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
QUICK_ALPHAS: tuple[float, ...] = (0.1, 0.5, 0.9)
SWEPT = ("mudsc-align", "mudsc-zip")
#: the suffix of a method's row merged with ``repair=True`` (REPAIR, Jordan et al. 2023)
REPAIRED = "+repair"
#: the suffix of a method's row merged with ``refit=True`` (the least-squares refit, mudsc_graph.merging.refit)
REFIT = "+refit"
#: Every variant row: suffix -> what the merge at the method's chosen alpha adds.
VARIANTS: dict[str, dict[str, Any]] = {REPAIRED: {"repair": True}, REFIT: {"refit": True}}
#: The methods a variant is run for (all when absent): the refit of a 3x3 convolution costs about nine
#: forward passes of it (its Gram matrix over the unfolded patches), so it is measured on the
#: methods that matter most (Git Re-Basin, ZipIt!, both MuDSC variants).
VARIANT_METHODS: dict[str, tuple[str, ...]] = {REFIT: ("weight_matching", "zipit", "mudsc-align", "mudsc-zip")}


def is_variant(method: str) -> bool:
    """Whether a row's method is a variant (``<method>+repair``, ``<method>+refit``) of a swept method's merge."""
    return method.endswith(tuple(VARIANTS))

#: Full-mode settings, sized so that the whole grid (2 datasets x 6 settings x 3 splits, 15 merges
#: per pair) runs in about 40 minutes on 2 cores (one ResNet-20 x4 pair: ~4 min on 1 thread). Training budgets were set so that every base model
#: is well above chance on its own task (checked on split 0 of mnist5k); the evaluation images of
#: the wide ResNets are fewer because their forward passes dominate (1 thread: ~5 / 10 / 20 ms per
#: 32x32 image for x1 / x2 / x4, 23 merged models per pair). Never tuned to make a method win.
_SMALL_EVAL = DataSetting(val_fraction=0.1, val_seed=0, calib_samples=200, test_limit=500, val_limit=300)
FULL_ARCHS: dict[str, ArchSetting] = {
    s.label: s
    for s in (
        setting("mlp", "mlp", epochs=3, train_limit=1000, batch_size=64, hidden=(1024, 1024, 1024, 512), bias=False),
        setting("resnet20x1", "resnet20", epochs=3, train_limit=800, batch_size=64, width=1, data=_SMALL_EVAL),
        setting("resnet20x2", "resnet20", epochs=3, train_limit=600, batch_size=64, width=2,
                data=DataSetting(val_fraction=0.1, val_seed=0, calib_samples=100, test_limit=300, val_limit=200)),
        setting("resnet20x4", "resnet20", epochs=2, train_limit=400, batch_size=64, width=4,
                data=DataSetting(val_fraction=0.1, val_seed=0, calib_samples=100, test_limit=200, val_limit=100)),
        # GroupNorm trains slower than BatchNorm: 3 epochs of 1000 images left the bases at 47-74 % on
        # their own task (mnist5k split 1); 8 epochs of every training image reach 96 % (about 50 s
        # per model on one thread, once: the pairs are cached).
        setting("resnet20gn", "resnet20", epochs=8, batch_size=64, width=1, norm="gn", data=_SMALL_EVAL),
        setting("vit_tiny", "vit_tiny", epochs=8, train_limit=1800, batch_size=64, patch_size=8, num_layers=3),
    )
}
#: The order in which worker processes take the settings: the costliest first, so no worker idles at the end.
FULL_COST_ORDER = ("resnet20x4", "resnet20x2", "mlp", "resnet20x1", "resnet20gn", "vit_tiny")
FULL_DATA = DataSetting(val_fraction=0.1, val_seed=0, calib_samples=200, test_limit=500)

QUICK_ARCHS: dict[str, ArchSetting] = {
    s.label: s
    for s in (
        setting("mlp-small", "mlp", epochs=2, train_limit=600, batch_size=64, hidden=(128, 128), bias=False),
        setting("resnet20x1", "resnet20", epochs=2, train_limit=600, batch_size=64, width=1),
    )
}
QUICK_DATA = DataSetting(val_fraction=0.1, val_seed=0, calib_samples=100, test_limit=300)

CSV_COLUMNS = [
    "dataset", "arch", "split", "tasks", "method", "kind", "alpha", "chosen",
    "val_joint", "val_mean_per_task", "joint", "task_a", "task_b", "mean_per_task", "merge_seconds",
]
SUMMARY_COLUMNS = [
    "dataset", "arch", "method", "kind", "n_splits", "alphas",
    "joint_mean", "joint_std", "task_a_mean", "task_a_std", "task_b_mean", "task_b_std",
    "mean_per_task_mean", "mean_per_task_std", "merge_seconds_mean",
]
#: The files :func:`run` writes into its output folder.
OUTPUT_FILES = ("accuracy.csv", "accuracy_summary.csv", "alpha_sweep.csv", "accuracy.md", "accuracy_run.json")
SWEEP_COLUMNS = [
    "dataset", "arch", "method", "alpha", "n_splits", "times_chosen", "val_mean_per_task_mean",
    "joint_mean", "joint_std", "mean_per_task_mean", "mean_per_task_std",
]


def choose_alpha(rows: Sequence[dict[str, Any]]) -> float:
    """The alpha of the best validation mean per-task accuracy; ties -> better validation joint, then smaller alpha."""
    best = max(rows, key=lambda r: (r["val_mean_per_task"], r["val_joint"], -r["alpha"]))
    return float(best["alpha"])


def _metrics(outputs: torch.Tensor, y: torch.Tensor, tasks: list[list[int]]) -> dict[str, float]:
    m = task_metrics(outputs, None, y, tasks)
    return {"joint": m.joint, "task_a": m.per_task[0], "task_b": m.per_task[1], "mean_per_task": m.mean_per_task}


def run_pair(dataset: str, arch: ArchSetting, split: int, ds: DataSetting, methods: Sequence[str],
             alphas: Sequence[float], *, cache_dir: Path | None = None, log: Callable[[str], None] = print,
             timings: dict[str, float] | None = None, variants: Sequence[str] = tuple(VARIANTS)) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every row of one (dataset, arch, split), and info about the pair (training seconds, cache).

    Each of ``variants`` gives every method one more row: ``<method>+repair``, the same merge (at
    the alpha chosen for the method alone) with ``repair=True``; ``<method>+refit``, with
    ``refit=True``; parents and merged model read on the calibration data.

    The pair is prepared once (:func:`mudsc_graph.prepare`: BatchNorm reset of the bases, analysis,
    activation statistics); every method and alpha then runs only its matching, merged weights and
    the merged model's BatchNorm reset. ``merge_seconds`` of a row is that part; the shared part is
    ``prepare_seconds`` in the info.
    """
    timings = timings if timings is not None else {}
    ds = arch.data or ds
    shape, _ = input_shape_for(dataset, arch)
    data = prepare_data(dataset, split, shape, ds)
    tasks = data.tasks
    with timed(timings, f"train_or_load:{arch.label}"):
        pair = model_pair(dataset, arch, split, data, ds, cache_dir=cache_dir, log=log)
    models = pair.models
    base = {"dataset": dataset, "arch": arch.label, "split": split, "tasks": json.dumps(tasks)}
    rows: list[dict[str, Any]] = []

    def row(method: str, kind: str, test_out: torch.Tensor, val_out: torch.Tensor | None = None,
            alpha: float | None = None, seconds: float | None = None) -> dict[str, Any]:
        r = {**base, "method": method, "kind": kind, "alpha": alpha, "chosen": None,
             "val_joint": None, "val_mean_per_task": None, "merge_seconds": seconds}
        if val_out is not None:
            v = _metrics(val_out, data.val.y, tasks)
            r["val_joint"], r["val_mean_per_task"] = v["joint"], v["mean_per_task"]
        r.update(_metrics(test_out, data.test.y, tasks))
        rows.append(r)
        return r

    with timed(timings, "evaluate"):
        for i, m in enumerate(models):
            row(f"model {'AB'[i]}", "base", predict_logits(m, data.test.x))
        row("ensemble", "ensemble", ensemble_logits(models, data.test.x, classes=tasks))
    head = models[0].head
    t0 = time.perf_counter()
    prepared = prepare([m.backbone for m in models], data=data.calib_batches)
    prepared.activations()
    prepare_seconds = time.perf_counter() - t0
    timings[f"prepare:{arch.label}"] = timings.get(f"prepare:{arch.label}", 0.0) + prepare_seconds
    for name in methods:
        method, mode = parse_method(name)
        sweep = list(alphas) if name in SWEPT else [None]
        method_rows = []
        for alpha in sweep:
            t0 = time.perf_counter()
            result = prepared.merge(method=method, mode=mode, alpha=0.5 if alpha is None else float(alpha), seed=split)
            seconds = time.perf_counter() - t0
            timings[f"merge:{arch.label}"] = timings.get(f"merge:{arch.label}", 0.0) + seconds
            merged = HeadedModel(result.model, copy.deepcopy(head)).eval()
            with timed(timings, "evaluate"):
                r = row(name, "merged", predict_logits(merged, data.test.x),
                        predict_logits(merged, data.val.x) if alpha is not None else None, alpha, seconds)
            method_rows.append(r)
        chosen = None
        if name in SWEPT:
            chosen = choose_alpha(method_rows)
            for r in method_rows:
                r["chosen"] = r["alpha"] == chosen
        else:
            method_rows[0]["chosen"] = True
        for suffix in (v for v in variants if name in VARIANT_METHODS.get(v, (name,))):
            t0 = time.perf_counter()
            result = prepared.merge(method=method, mode=mode, alpha=0.5 if chosen is None else chosen, seed=split, **VARIANTS[suffix])
            seconds = time.perf_counter() - t0
            timings[f"merge:{arch.label}"] = timings.get(f"merge:{arch.label}", 0.0) + seconds
            merged = HeadedModel(result.model, copy.deepcopy(head)).eval()
            with timed(timings, "evaluate"):
                row(f"{name}{suffix}", "merged", predict_logits(merged, data.test.x), None, chosen, seconds)["chosen"] = True
    info = {"train_seconds": pair.train_seconds, "trained": pair.trained, "cache_path": pair.cache_path,
            "prepare_seconds": prepare_seconds,
            "train_images": [min(int(torch.isin(data.train.y, torch.tensor(t)).sum()), arch.train_limit or 10**12)
                             for t in tasks],
            "val_images": len(data.val), "test_images": len(data.test),
            "calib_images": sum(len(y) for _, y in data.calib_batches)}
    return rows, info


def _pair_job(job: tuple) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float], float]:
    """One (dataset, arch, split) in a worker process with its own thread count."""
    threads, dataset, arch, split, ds, methods, alphas, cache_dir, quiet, variants = job
    torch.set_num_threads(threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    log = (lambda s: None) if quiet else (lambda s: print(s, flush=True))
    rows, info = run_pair(dataset, arch, split, ds, methods, alphas, cache_dir=cache_dir, log=log, timings=timings, variants=variants)
    return rows, info, timings, time.perf_counter() - t0


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:.6g}" if v == v else "nan"
    return v


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c)) for c in columns})


def summarize(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(summary rows at the chosen alpha per dataset/arch/method, sweep rows per dataset/arch/method/alpha)."""
    summary, sweep = [], []
    keys: list[tuple[str, str, str, str]] = []
    for r in rows:
        k = (r["dataset"], r["arch"], r["method"], r["kind"])
        if k not in keys:
            keys.append(k)
    for ds, arch, method, kind in keys:
        group = [r for r in rows if (r["dataset"], r["arch"], r["method"]) == (ds, arch, method)]
        chosen = [r for r in group if r["kind"] != "merged" or r["chosen"]]
        s = {"dataset": ds, "arch": arch, "method": method, "kind": kind, "n_splits": len(chosen),
             "alphas": ";".join(f"{r['alpha']:.1f}" for r in chosen if r["alpha"] is not None)}
        for metric in ("joint", "task_a", "task_b", "mean_per_task"):
            s[f"{metric}_mean"], s[f"{metric}_std"] = mean_std([r[metric] for r in chosen])
        secs = [r["merge_seconds"] for r in chosen if r["merge_seconds"] is not None]
        s["merge_seconds_mean"] = mean_std(secs)[0] if secs else None
        summary.append(s)
        alphas = sorted({r["alpha"] for r in group if r["alpha"] is not None and not is_variant(method)})
        for a in alphas:
            at = [r for r in group if r["alpha"] == a]
            w = {"dataset": ds, "arch": arch, "method": method, "alpha": a, "n_splits": len(at),
                 "times_chosen": sum(1 for r in at if r["chosen"]),
                 "val_mean_per_task_mean": mean_std([r["val_mean_per_task"] for r in at])[0]}
            w["joint_mean"], w["joint_std"] = mean_std([r["joint"] for r in at])
            w["mean_per_task_mean"], w["mean_per_task_std"] = mean_std([r["mean_per_task"] for r in at])
            sweep.append(w)
    return summary, sweep


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown(summary: Sequence[dict[str, Any]], sweep: Sequence[dict[str, Any]], *, header: str = "") -> str:
    """One table per dataset/arch (accuracies in %, mean ± std over splits), then MuDSC's alpha sweep."""
    lines = [header] if header else []
    pairs: list[tuple[str, str]] = []
    for s in summary:
        if (s["dataset"], s["arch"]) not in pairs:
            pairs.append((s["dataset"], s["arch"]))
    for ds, arch in pairs:
        group = [s for s in summary if (s["dataset"], s["arch"]) == (ds, arch)]
        lines += [f"### {ds} / {arch} ({group[0]['n_splits']} split(s))", "",
                  "| method | joint | per-task mean | task A | task B | alpha (chosen per split) |",
                  "|---|---|---|---|---|---|"]
        for s in group:
            lines.append(
                f"| {s['method']} | {_pm(s['joint_mean'], s['joint_std'])} | "
                f"{_pm(s['mean_per_task_mean'], s['mean_per_task_std'])} | {_pm(s['task_a_mean'], s['task_a_std'])} | "
                f"{_pm(s['task_b_mean'], s['task_b_std'])} | {s['alphas'].replace(';', ', ') or '–'} |"
            )
        sw = [w for w in sweep if (w["dataset"], w["arch"]) == (ds, arch)]
        if sw:
            methods = list(dict.fromkeys(w["method"] for w in sw))
            alphas = sorted({w["alpha"] for w in sw})
            lines += ["", "Alpha sweep (test joint / per-task mean, %, mean over splits):", "",
                      "| method | " + " | ".join(f"α={a:.1f}" for a in alphas) + " |",
                      "|---|" + "---|" * len(alphas)]
            for m in methods:
                cells = []
                for a in alphas:
                    w = next((w for w in sw if w["method"] == m and w["alpha"] == a), None)
                    cells.append(f"{100 * w['joint_mean']:.1f} / {100 * w['mean_per_task_mean']:.1f}" if w else "")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


#: Methods of plugins the tables include when the plugin is installed (CCA merging: docs/plugins.md).
PLUGIN_METHODS = ("cca",)


def default_methods() -> tuple[str, ...]:
    """The demo's methods, then every method of :data:`PLUGIN_METHODS` the registry knows."""
    from mudsc_graph import get_registry

    known = get_registry().method_names()
    return tuple(DEFAULT_METHODS) + tuple(m for m in PLUGIN_METHODS if m in known)


def run(*, datasets: Sequence[str], archs: Sequence[ArchSetting], splits: int, data_setting: DataSetting,
        methods: Sequence[str] | None = None, alphas: Sequence[float] = FULL_ALPHAS, out: Path,
        cache_dir: Path | None = None, log: Callable[[str], None] = print, mode: str = "custom",
        jobs: int = 1, threads: int | None = None, first: Sequence[str] = (),
        command: str = "python -m benchmarks.reproduce.accuracy", variants: Sequence[str] = tuple(VARIANTS)) -> dict[str, Any]:
    """Run the whole grid and write the output files; returns rows, summary, sweep, timings.

    ``jobs > 1`` runs that many (dataset, arch, split) pairs at once in worker processes, each with
    ``threads // jobs`` torch threads (at least 1); the arch labels in ``first`` are taken first
    (the costliest, so no worker idles at the end). Rows are ordered by dataset, arch, split.
    ``command``: what ``accuracy.md`` says generated it. ``methods``: default :func:`default_methods`.
    """
    methods = tuple(methods) if methods else default_methods()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    threads = threads or torch.get_num_threads()
    per_job = max(1, threads // max(1, jobs))
    rank = {label: i for i, label in enumerate(first)}
    by_cost = sorted(archs, key=lambda a: rank.get(a.label, len(rank)))
    grid = [(ds, arch, k) for arch in by_cost for ds in datasets for k in range(splits)]
    work = [(per_job if jobs > 1 else threads, ds, arch, k, data_setting, tuple(methods), tuple(alphas), cache_dir, jobs > 1, tuple(variants))
            for ds, arch, k in grid]
    timings: dict[str, float] = {}
    pairs_info: list[dict[str, Any]] = []

    def done(key: tuple[str, ArchSetting, int], result: tuple) -> None:
        r, info, t, seconds = result
        ds, arch, k = key
        for name, v in t.items():
            timings[name] = timings.get(name, 0.0) + v
        pairs_info.append({"dataset": ds, "arch": arch.label, "split": k, **info, "seconds": seconds})
        best = {m: x for m, x in ((x["method"], x) for x in r if x["chosen"] or x["kind"] != "merged")}
        log(f"[{time.perf_counter() - t_all:7.1f}s] {ds} / {arch.label} / split {k} ({seconds:.1f}s): "
            + ", ".join(f"{m}={100 * x['joint']:.1f}" for m, x in best.items()))

    results: dict[int, list[dict[str, Any]]] = {}
    if jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_pair_job, w): i for i, w in enumerate(work)}
            for fut in cf.as_completed(futures):
                i = futures[fut]
                res = fut.result()
                results[i] = res[0]
                done(grid[i], res)
    else:
        for i, w in enumerate(work):
            log(f"[{time.perf_counter() - t_all:7.1f}s] {grid[i][0]} / {grid[i][1].label} / split {grid[i][2]}")
            res = _pair_job(w)
            results[i] = res[0]
            done(grid[i], res)
    order = sorted(range(len(grid)), key=lambda i: (list(datasets).index(grid[i][0]), list(archs).index(grid[i][1]), grid[i][2]))  # tables: dataset first
    rows = [r for i in order for r in results[i]]
    position = {(grid[i][0], grid[i][1].label, grid[i][2]): n for n, i in enumerate(order)}
    pairs_info.sort(key=lambda p: position[(p["dataset"], p["arch"], p["split"])])
    summary, sweep = summarize(rows)
    _write_csv(out / "accuracy.csv", CSV_COLUMNS, rows)
    _write_csv(out / "accuracy_summary.csv", SUMMARY_COLUMNS, summary)
    _write_csv(out / "alpha_sweep.csv", SWEEP_COLUMNS, sweep)
    total = time.perf_counter() - t_all
    header = (f"<!-- generated by `{command}` ({mode} mode); accuracies in %, "
              f"mean ± sample std over splits; alpha chosen on a validation hold-out of the train split -->\n")
    (out / "accuracy.md").write_text(markdown(summary, sweep, header=header))
    meta = {"mode": mode, "datasets": list(datasets), "archs": [as_jsonable(a) for a in archs], "splits": splits,
            "data": as_jsonable(data_setting), "methods": list(methods), "alphas": list(alphas), "variants": list(variants),
            "pairs": pairs_info, "timings": timings, "total_seconds": total, "threads": threads, "jobs": jobs}
    (out / "accuracy_run.json").write_text(json.dumps(as_jsonable(meta), indent=1))
    return {"rows": rows, "summary": summary, "sweep": sweep, "timings": timings, "total_seconds": total,
            "pairs": pairs_info}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny grid (one dataset, small MLP + resnet20x1, 1 split) in minutes")
    p.add_argument("--out", default=None, help="output folder (default benchmark-results/accuracy; quick: benchmark-results/accuracy-quick)")
    p.add_argument("--datasets", nargs="+", default=None, help=f"default {' '.join(DATASETS)} (quick: mnist5k)")
    p.add_argument("--archs", nargs="+", default=None, help="labels of the architecture settings (default: all of the mode)")
    p.add_argument("--splits", type=int, default=None, help="number of class splits (default 3; quick 1)")
    p.add_argument("--methods", nargs="+", default=None, help="default: the demo's methods, and cca when its plugin is installed")
    p.add_argument("--alphas", nargs="+", type=float, default=None,
                   help=f"MuDSC's alpha sweep (default {' '.join(map(str, FULL_ALPHAS))}; quick: {' '.join(map(str, QUICK_ALPHAS))})")
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (default 2)")
    p.add_argument("--no-repair", action="store_true", help="leave out the <method>+repair rows (REPAIR after merging)")
    p.add_argument("--no-refit", action="store_true", help="leave out the <method>+refit rows (least-squares refit after merging)")
    p.add_argument("--jobs", type=int, default=2, help="pairs run at once in worker processes, threads split among them (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    table = QUICK_ARCHS if args.quick else FULL_ARCHS
    labels = args.archs or list(table)
    unknown = [a for a in labels if a not in table]
    if unknown:
        p.error(f"unknown arch setting(s) {unknown}; choose from {', '.join(table)}")
    for m in args.methods or ():
        parse_method(m)
    datasets = args.datasets or (["mnist5k"] if args.quick else list(DATASETS))
    splits = args.splits if args.splits is not None else (1 if args.quick else 3)
    out = Path(args.out) if args.out else default_out("accuracy", args.quick)
    res = run(datasets=datasets, archs=[table[a] for a in labels], splits=splits,
              data_setting=QUICK_DATA if args.quick else FULL_DATA, methods=args.methods,
              alphas=args.alphas or (QUICK_ALPHAS if args.quick else FULL_ALPHAS), out=out,
              mode="quick" if args.quick else "full", log=lambda s: print(s, flush=True),
              jobs=max(1, args.jobs), threads=max(1, args.threads), first=() if args.quick else FULL_COST_ORDER,
              command=f"python -m benchmarks.reproduce.accuracy{' --quick' if args.quick else ''}", variants=[v for v, off in ((REPAIRED, args.no_repair), (REFIT, args.no_refit)) if not off])
    print()
    print(markdown(res["summary"], res["sweep"]))
    print(f"wrote {out}/accuracy.csv, accuracy_summary.csv, alpha_sweep.csv, accuracy.md, accuracy_run.json "
          f"in {res['total_seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
