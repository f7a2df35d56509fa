"""Partial zip curves: joint accuracy and FLOPs against the layer where merging stops.

Run::

    python -m benchmarks.reproduce.partial [--quick] [--out DIR] [--splits N] [--archs mlp resnet20x1]

ZipIt! (Stoica et al. 2023) shows that merging only the first layers (``stop_at``: each model
keeps its own layers after the stop point, fed by its unmerged features) closes most of the gap
to the ensemble at a fraction of its cost. For the reproduction's model pairs (disjoint 5+5 class
splits of mnist5k, the same cached models as :mod:`accuracy`), ZipIt! and MuDSC-zip (alpha 0.5),
each plain and with the least-squares refit, merge up to each stop point in turn, and the whole model; each row gives the test joint and
per-task mean accuracy (each model's output through the shared class-embedding head, the
separate-heads protocol) and the merged model's forward FLOPs relative to one base model
(``torch.utils.flop_counter``; the ensemble is 2.0).

Writes ``partial.csv``, ``partial.md`` and ``partial.png`` (joint accuracy against FLOPs, one
line per method, the ensemble and the base models as references) into ``--out`` (default
``benchmark-results/partial``).
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
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import default_out
from benchmarks.reproduce import accuracy as acc
from benchmarks.reproduce.common import mean_std, model_pair, prepare_data, input_shape_for
from mudsc_experiments.evaluate import ensemble_logits, predict_logits, task_metrics
from mudsc_graph.merging.api import prepare

#: stop points per architecture setting, in forward order (None: the whole model merged)
STOPS: dict[str, tuple[str | None, ...]] = {
    "mlp": ("layers.0", "layers.1", "layers.2", "layers.3", None),
    "mlp-small": ("layers.0", "layers.1", None),
    "resnet20x1": ("layer1", "layer2.0", "layer2", "layer3.0", "layer3", None),
}
#: each curve: a method, plain or with a variant of :data:`accuracy.VARIANTS` (the least-squares refit)
METHODS = ("zipit", "mudsc-zip", "zipit+refit", "mudsc-zip+refit")
ALPHA = 0.5
#: The files :func:`run` writes into its output folder.
OUTPUT_FILES = ("partial.csv", "partial.md", "partial.png", "partial_run.json")
COLUMNS = ["dataset", "arch", "split", "method", "stop_at", "flops_ratio", "joint", "mean_per_task", "task_a", "task_b"]


class _Heads(torch.nn.Module):
    """A partial-zip backbone (one feature tensor per model) with the shared head on each."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> Any:
        out = self.backbone(x)
        return tuple(self.head(f) for f in out) if isinstance(out, (tuple, list)) else self.head(out)


def flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs of ``model`` on ``x``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def run_pair(dataset: str, arch: acc.ArchSetting, split: int, ds: acc.DataSetting, *, stops: Sequence[str | None],
             methods: Sequence[str] = METHODS, cache_dir: Path | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every (method, stop point) row of one model pair, and the references (kind base/ensemble)."""
    ds = arch.data or ds
    shape, _ = input_shape_for(dataset, arch)
    data = prepare_data(dataset, split, shape, ds)
    tasks = data.tasks
    pair = model_pair(dataset, arch, split, data, ds, cache_dir=cache_dir, log=log)
    models = pair.models
    x, y = data.test.x, data.test.y
    probe = x[:1]
    one = flops(models[0], probe)
    base = {"dataset": dataset, "arch": arch.label, "split": split}
    rows = []

    def add(method: str, stop: str | None, outputs: Any, ratio: float) -> None:
        heads = "separate" if isinstance(outputs, tuple) else "shared"
        m = task_metrics(outputs, None, y, tasks, heads=heads, head_classes="class_id" if heads == "separate" else None)
        rows.append({**base, "method": method, "stop_at": stop or "(whole model)", "flops_ratio": ratio,
                     "joint": m.joint, "mean_per_task": m.mean_per_task, "task_a": m.per_task[0], "task_b": m.per_task[1]})

    for i, m in enumerate(models):
        add(f"model {'AB'[i]}", None, predict_logits(m, x), 1.0)
    add("ensemble", None, ensemble_logits(models, x, classes=tasks), 2.0)
    prepared = prepare([m.backbone for m in models], data=data.calib_batches)
    for name in methods:
        base_name, plus, variant = name.partition("+")
        method, mode = acc.parse_method(base_name)
        extras = acc.VARIANTS[plus + variant] if plus else {}
        for stop in stops:
            result = prepared.merge(method=method, mode=mode, alpha=ALPHA, seed=split, stop_at=stop, **extras)
            model = _Heads(result.model, copy.deepcopy(models[0].head)).eval()
            add(name, stop, predict_logits(model, x), flops(model, probe) / one)
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over splits per (dataset, arch, method, stop point), in row order."""
    keys = list(dict.fromkeys((r["dataset"], r["arch"], r["method"], r["stop_at"]) for r in rows))
    out = []
    for k in keys:
        group = [r for r in rows if (r["dataset"], r["arch"], r["method"], r["stop_at"]) == k]
        s = dict(zip(("dataset", "arch", "method", "stop_at"), k))
        s["n_splits"] = len(group)
        s["flops_ratio"] = mean_std([r["flops_ratio"] for r in group])[0]
        for metric in ("joint", "mean_per_task"):
            s[f"{metric}_mean"], s[f"{metric}_std"] = mean_std([r[metric] for r in group])
        out.append(s)
    return out


def markdown(summary: Sequence[dict[str, Any]], header: str = "") -> str:
    lines = [header] if header else []
    for ds, arch in dict.fromkeys((s["dataset"], s["arch"]) for s in summary):
        group = [s for s in summary if (s["dataset"], s["arch"]) == (ds, arch)]
        lines += [f"### {ds} / {arch} ({group[0]['n_splits']} split(s))", "",
                  "| method | merged up to | FLOPs / one model | joint | per-task mean |", "|---|---|---|---|---|"]
        for s in group:
            lines.append(f"| {s['method']} | {s['stop_at'] if s['method'] in METHODS else '–'} | {s['flops_ratio']:.2f} | "
                         f"{100 * s['joint_mean']:.1f} ± {100 * s['joint_std']:.1f} | "
                         f"{100 * s['mean_per_task_mean']:.1f} ± {100 * s['mean_per_task_std']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(summary: Sequence[dict[str, Any]], path: Path) -> None:
    """Joint accuracy against FLOPs, one panel per (dataset, arch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((s["dataset"], s["arch"]) for s in summary))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (ds, arch) in zip(axes[0], panels):
        group = [s for s in summary if (s["dataset"], s["arch"]) == (ds, arch)]
        for method in METHODS:
            pts = sorted((s["flops_ratio"], 100 * s["joint_mean"]) for s in group if s["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        for s in group:
            if s["method"] not in METHODS:
                ax.scatter([s["flops_ratio"]], [100 * s["joint_mean"]], marker="*" if s["method"] == "ensemble" else "x", s=80,
                           label=s["method"], zorder=3)
        ax.set(title=f"{ds} / {arch}", xlabel="FLOPs / one model", ylabel="joint accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(*, datasets: Sequence[str], archs: Sequence[acc.ArchSetting], splits: int, data_setting: acc.DataSetting, out: Path,
        cache_dir: Path | None = None, log: Callable[[str], None] = print, command: str = "python -m benchmarks.reproduce.partial",
        stops: dict[str, Sequence[str | None]] | None = None) -> dict[str, Any]:
    """Every pair's rows (stop points from ``stops``, default :data:`STOPS`, by arch label); writes the files."""
    stops = stops or STOPS
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for ds in datasets:
        for arch in archs:
            for k in range(splits):
                log(f"[{time.perf_counter() - t0:7.1f}s] {ds} / {arch.label} / split {k}")
                rows += run_pair(ds, arch, k, data_setting, stops=stops[arch.label], cache_dir=cache_dir, log=log)
    summary = summarize(rows)
    with open(out / "partial.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    header = (f"<!-- generated by `{command}`; test accuracies in %, mean ± sample std over splits; "
              f"ZipIt! and MuDSC-zip (alpha {ALPHA}) merged up to each stop point -->\n")
    (out / "partial.md").write_text(markdown(summary, header))
    plot(summary, out / "partial.png")
    total = time.perf_counter() - t0
    (out / "partial_run.json").write_text(json.dumps({"datasets": list(datasets), "archs": [a.label for a in archs],
                                                      "splits": splits, "seconds": total}, indent=1))
    return {"rows": rows, "summary": summary, "seconds": total}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce.partial", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small MLP and ResNet-20x1, one split (minutes)")
    p.add_argument("--out", default=None)
    p.add_argument("--splits", type=int, default=None, help="class splits (default 3; quick 1)")
    p.add_argument("--archs", nargs="+", default=None, help=f"arch settings with stop points: {', '.join(STOPS)}")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    table = acc.QUICK_ARCHS if args.quick else acc.FULL_ARCHS
    labels = args.archs or [a for a in table if a in STOPS]
    unknown = [a for a in labels if a not in table or a not in STOPS]
    if unknown:
        p.error(f"no stop points or no setting for {unknown}; choose from {', '.join(a for a in table if a in STOPS)}")
    out = Path(args.out) if args.out else default_out("partial", args.quick)
    res = run(datasets=["mnist5k"], archs=[table[a] for a in labels], splits=args.splits or (1 if args.quick else 3),
              data_setting=acc.QUICK_DATA if args.quick else acc.FULL_DATA, out=out, log=lambda s: print(s, flush=True),
              command=f"python -m benchmarks.reproduce.partial{' --quick' if args.quick else ''}")
    print(markdown(res["summary"]))
    print(f"wrote {out}/partial.csv, partial.md, partial.png in {res['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
