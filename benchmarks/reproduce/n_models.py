"""N models on real data: 3 and 4 models trained on disjoint class subsets, merged into one.

Run::

    python -m benchmarks.reproduce.n_models [--quick] [--out DIR] [--splits N] [--models 3 4]

For N in ``--models``, the 10 classes of mnist5k are split into N tasks (``split_classes(10, N,
seed=k)``: 3+4+3 or 2+3+2+3 classes); model ``i`` (the reproduction's MLP setting, its own init
seed, the shared fixed class-embedding head) is trained on task ``i``. The N backbones are merged
with every method (MuDSC at alpha 0.5; zip with its ``a=0.5``), with and without REPAIR, and
evaluated on the test split: joint accuracy over all classes, each task's accuracy within its
classes, and their mean. The N base models and their ensemble (each model votes on its own
classes) are the references; the ensemble is the upper bound merging aims at with one model's
cost.

Writes ``n_models.csv`` (one row per N / split / method) and ``n_models.md`` (mean ± std over
splits) into ``--out`` (default ``benchmark-results/n_models``).
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
from benchmarks.reproduce import accuracy as acc
from benchmarks.reproduce.common import input_shape_for, mean_std, model_pair, prepare_data, summarize_by
from mudsc_experiments.demo import DEFAULT_METHODS, parse_method
from mudsc_experiments.evaluate import ensemble_logits, predict_logits, task_metrics
from mudsc_experiments.tasks import HeadedModel
from mudsc_graph.merging.api import prepare

ALPHA = 0.5
#: The files :func:`run` writes into its output folder.
OUTPUT_FILES = ("n_models.csv", "n_models.md", "n_models_run.json")
COLUMNS = ["n_models", "split", "tasks", "method", "kind", "joint", "mean_per_task", "per_task", "merge_seconds"]


def run_set(dataset: str, arch: acc.ArchSetting, n: int, split: int, ds: acc.DataSetting, *,
            methods: Sequence[str] = DEFAULT_METHODS, repair: bool = True, cache_dir: Path | None = None,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every row of one set of ``n`` models (one class split)."""
    ds = arch.data or ds
    shape, _ = input_shape_for(dataset, arch)
    data = prepare_data(dataset, split, shape, ds, n_tasks=n)
    tasks = data.tasks
    models = model_pair(dataset, arch, split, data, ds, cache_dir=cache_dir, log=log).models
    x, y = data.test.x, data.test.y
    rows = []

    def add(method: str, kind: str, outputs: torch.Tensor, seconds: float | None = None) -> None:
        m = task_metrics(outputs, None, y, tasks)
        rows.append({"n_models": n, "split": split, "tasks": json.dumps(tasks), "method": method, "kind": kind,
                     "joint": m.joint, "mean_per_task": m.mean_per_task, "per_task": json.dumps([round(v, 4) for v in m.per_task]),
                     "merge_seconds": seconds})

    for i, m in enumerate(models):
        add(f"model {'ABCDEFGH'[i]}", "base", predict_logits(m, x))
    add("ensemble", "ensemble", ensemble_logits(models, x, classes=tasks))
    prepared = prepare([m.backbone for m in models], data=data.calib_batches)
    head = models[0].head
    for name in methods:
        method, mode = parse_method(name)
        for repaired in (False, True) if repair else (False,):
            t0 = time.perf_counter()
            result = prepared.merge(method=method, mode=mode, alpha=ALPHA, seed=split, repair=repaired)
            seconds = time.perf_counter() - t0
            merged = HeadedModel(result.model, copy.deepcopy(head)).eval()
            add(name + (acc.REPAIRED if repaired else ""), "merged", predict_logits(merged, x), seconds)
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return summarize_by(rows, ("n_models", "method", "kind"))


def markdown(summary: Sequence[dict[str, Any]], header: str = "") -> str:
    lines = [header] if header else []
    for n in dict.fromkeys(s["n_models"] for s in summary):
        group = [s for s in summary if s["n_models"] == n]
        bases = [s for s in group if s["kind"] == "base"]
        lines += [f"### {n} models, {n} disjoint tasks ({group[0]['n_splits']} split(s))", "",
                  "| method | joint | per-task mean |", "|---|---|---|"]
        if bases:  # the base models each know one task: their joint accuracy is bounded by its share
            j = mean_std([s["joint_mean"] for s in bases])[0]
            p = mean_std([s["mean_per_task_mean"] for s in bases])[0]
            lines.append(f"| base models (mean of {len(bases)}) | {100 * j:.1f} | {100 * p:.1f} |")
        for s in group:
            if s["kind"] != "base":
                lines.append(f"| {s['method']} | {100 * s['joint_mean']:.1f} ± {100 * s['joint_std']:.1f} | "
                             f"{100 * s['mean_per_task_mean']:.1f} ± {100 * s['mean_per_task_std']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run(*, arch: acc.ArchSetting, counts: Sequence[int], splits: int, data_setting: acc.DataSetting, out: Path,
        methods: Sequence[str] = DEFAULT_METHODS, cache_dir: Path | None = None, log: Callable[[str], None] = print,
        command: str = "python -m benchmarks.reproduce.n_models") -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for n in counts:
        for k in range(splits):
            log(f"[{time.perf_counter() - t0:7.1f}s] {n} models / split {k}")
            rows += run_set("mnist5k", arch, n, k, data_setting, methods=methods, cache_dir=cache_dir, log=log)
    with open(out / "n_models.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    summary = summarize(rows)
    header = (f"<!-- generated by `{command}` ({arch.label}); test accuracies in %, mean ± sample std over splits; "
              f"MuDSC at alpha {ALPHA} -->\n")
    (out / "n_models.md").write_text(markdown(summary, header))
    total = time.perf_counter() - t0
    (out / "n_models_run.json").write_text(json.dumps({"arch": arch.label, "counts": list(counts), "splits": splits, "seconds": total}))
    return {"rows": rows, "summary": summary, "seconds": total}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce.n_models", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the small MLP, one split (a minute)")
    p.add_argument("--out", default=None)
    p.add_argument("--splits", type=int, default=None, help="class splits (default 3; quick 1)")
    p.add_argument("--models", nargs="+", type=int, default=[3, 4], help="numbers of models (default 3 4)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if any(n < 2 or n > 8 for n in args.models):
        p.error("--models takes numbers from 2 to 8")
    arch = acc.QUICK_ARCHS["mlp-small"] if args.quick else acc.FULL_ARCHS["mlp"]
    out = Path(args.out) if args.out else default_out("n_models", args.quick)
    res = run(arch=arch, counts=args.models, splits=args.splits or (1 if args.quick else 3),
              data_setting=acc.QUICK_DATA if args.quick else acc.FULL_DATA, out=out, log=lambda s: print(s, flush=True),
              command=f"python -m benchmarks.reproduce.n_models{' --quick' if args.quick else ''}")
    print(markdown(res["summary"]))
    print(f"wrote {out}/n_models.csv, n_models.md in {res['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
