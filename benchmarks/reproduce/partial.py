"""The accuracy/FLOPs frontier: partial zip, width budgets and the refit against the ensemble.

Run::

    python -m benchmarks.reproduce.partial [--quick] [--out DIR] [--splits N] [--archs mlp resnet20x1]

How close to the ensemble can a merge get for the compute it costs? For the reproduction's model
pairs (disjoint 5+5 class splits of mnist5k, the same cached models as :mod:`accuracy`), every
configuration below gives a row with the test joint and per-task mean accuracy and the merged
model's forward FLOPs relative to one base model (``torch.utils.flop_counter``; the ensemble is 2.0):

- every method's full merge (width 1, one model's FLOPs), plain and with the least-squares refit;
- partial zip (ZipIt!, Stoica et al. 2023: merged up to a stop point, each model keeps its own
  layers after it, fed by its unmerged features), ZipIt! and MuDSC-zip, plain and refit;
- width budgets (:mod:`mudsc_graph.merging.widths`: the whole model merged wider than one model,
  its least similar units left apart), ZipIt! and MuDSC-zip at each of :data:`WIDTHS`, plain and refit.

Outputs through the shared class-embedding head (a partial zip's one per model: the separate-heads
protocol). Alpha is 0.5 for the MuDSC rows. Writes ``partial.csv``, ``partial.md`` (per setting:
every row by FLOPs, and the frontier's verdicts: whether the best width/refit configuration at or
below each partial zip's FLOPs beats it, and the best at 1.5x FLOPs or less as a share of the
ensemble) and ``partial.png`` (joint accuracy against FLOPs, one panel per setting) into
``--out`` (default ``benchmark-results/partial``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import default_out
from benchmarks.reproduce import accuracy as acc
from benchmarks.reproduce.common import input_shape_for, model_pair, prepare_data, summarize_by
from mudsc_experiments.evaluate import ensemble_logits, predict_logits, task_metrics
from mudsc_graph.merging.api import prepare

_RESNET_STOPS = ("layer1", "layer2.0", "layer2", "layer3.0", "layer3", None)
#: stop points per architecture setting, in forward order (None: the whole model merged)
STOPS: dict[str, tuple[str | None, ...]] = {
    "mlp": ("layers.0", "layers.1", "layers.2", "layers.3", None),
    "mlp-small": ("layers.0", "layers.1", None),
    "resnet20x1": _RESNET_STOPS, "resnet20x2": _RESNET_STOPS, "resnet20x4": _RESNET_STOPS, "resnet20gn": _RESNET_STOPS,
    "vit_tiny": ("encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", None),
}
#: each curve (partial zip and width budgets): a method, plain or with a variant of :data:`accuracy.VARIANTS` (the refit)
METHODS = ("zipit", "mudsc-zip", "zipit+refit", "mudsc-zip+refit")
#: the other methods' full merges (width 1), plain and refit
FULL_ONLY = ("weight_matching", "activation_matching", "mudsc-align", "weight_matching+refit", "activation_matching+refit",
             "mudsc-align+refit")
#: the width budgets of the curves (width 1 is the full merge, a stop point of None)
WIDTHS = (1.25, 1.5, 2.0)
ALPHA = 0.5
#: The files :func:`run` writes into its output folder.
OUTPUT_FILES = ("partial.csv", "partial.md", "partial.png", "partial_run.json")
COLUMNS = ["dataset", "arch", "split", "method", "stop_at", "width", "flops_ratio", "joint", "mean_per_task", "task_a", "task_b"]
WHOLE = "(whole model)"


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
             methods: Sequence[str] = METHODS, widths: Sequence[float] = WIDTHS, full_only: Sequence[str] = FULL_ONLY,
             cache_dir: Path | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every configuration's row of one model pair, and the references (the base models, the ensemble)."""
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

    def add(method: str, stop: str | None, width: float, outputs: Any, ratio: float) -> None:
        heads = "separate" if isinstance(outputs, tuple) else "shared"
        m = task_metrics(outputs, None, y, tasks, heads=heads, head_classes="class_id" if heads == "separate" else None)
        rows.append({**base, "method": method, "stop_at": stop or WHOLE, "width": width, "flops_ratio": ratio,
                     "joint": m.joint, "mean_per_task": m.mean_per_task, "task_a": m.per_task[0], "task_b": m.per_task[1]})

    for i, m in enumerate(models):
        add(f"model {'AB'[i]}", None, 1.0, predict_logits(m, x), 1.0)
    add("ensemble", None, 2.0, ensemble_logits(models, x, classes=tasks), 2.0)
    prepared = prepare([m.backbone for m in models], data=data.calib_batches)

    def merged(name: str, stop: str | None = None, width: float = 1.0) -> None:
        base_name, plus, variant = name.partition("+")
        method, mode = acc.parse_method(base_name)
        extras = acc.VARIANTS[plus + variant] if plus else {}
        with warnings.catch_warnings():  # groups a width cannot reach (a ViT's heads) are said once per run, not per merge
            warnings.simplefilter("ignore")
            result = prepared.merge(method=method, mode=mode, alpha=ALPHA, seed=split, stop_at=stop, width=width, **extras)
        model = _Heads(result.model, copy.deepcopy(models[0].head)).eval()
        add(name, stop, width, predict_logits(model, x), flops(model, probe) / one)

    for name in methods:
        for stop in stops:
            merged(name, stop)
        for width in widths:
            merged(name, None, width)
    for name in full_only:
        merged(name)
    return rows


def _how(s: dict[str, Any]) -> str:
    """What a row's merge is: a stop point, a width, or the whole model at one model's width."""
    if s["stop_at"] != WHOLE:
        return f"merged up to {s['stop_at']}"
    return f"width {s['width']:g}" if s["width"] != 1.0 else "whole model"


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over splits per (dataset, arch, method, stop point, width), in row order."""
    return summarize_by(rows, ("dataset", "arch", "method", "stop_at", "width"), averaged=("flops_ratio",))


def is_reference(s: dict[str, Any]) -> bool:
    return s["method"] == "ensemble" or s["method"].startswith("model ")


def verdicts(group: Sequence[dict[str, Any]], slack: float = 0.02) -> dict[str, Any]:
    """The frontier of one setting: for each partial zip (its FLOPs f), the best width-budget or
    refit configuration of the whole model at FLOPs <= f + ``slack`` against the best partial zip at
    FLOPs <= f (plain and refit); and the best merge at 1.5x FLOPs or less as a share of the ensemble."""
    merges = [s for s in group if not is_reference(s)]
    partial = [s for s in merges if s["stop_at"] != WHOLE and "+" not in s["method"]]
    whole = [s for s in merges if s["stop_at"] == WHOLE and (s["width"] != 1.0 or "+refit" in s["method"])]
    ensemble = next(s["joint_mean"] for s in group if s["method"] == "ensemble")
    levels = []
    for f in sorted({round(s["flops_ratio"], 2) for s in partial}, reverse=True):
        best_whole = max((s for s in whole if s["flops_ratio"] <= f + slack), key=lambda s: s["joint_mean"], default=None)
        best_partial = max((s for s in partial if s["flops_ratio"] <= f + slack), key=lambda s: s["joint_mean"])
        levels.append({"flops": f, "partial": best_partial, "whole": best_whole,
                       "ahead": best_whole is not None and best_whole["joint_mean"] >= best_partial["joint_mean"]})
    cheap = max((s for s in merges if s["flops_ratio"] <= 1.5 + slack), key=lambda s: s["joint_mean"], default=None)
    return {"levels": levels, "best_at_1_5": cheap, "ensemble": ensemble,
            "share_at_1_5": cheap["joint_mean"] / ensemble if cheap is not None and ensemble > 0 else None}


def _label(s: dict[str, Any]) -> str:
    return f"{s['method']} ({_how(s)}, {s['flops_ratio']:.2f}x)"


def markdown(summary: Sequence[dict[str, Any]], header: str = "") -> str:
    lines = [header] if header else []
    for ds, arch in dict.fromkeys((s["dataset"], s["arch"]) for s in summary):
        group = [s for s in summary if (s["dataset"], s["arch"]) == (ds, arch)]
        v = verdicts(group)
        lines += [f"### {ds} / {arch} ({group[0]['n_splits']} split(s))", ""]
        ahead = sum(lv["ahead"] for lv in v["levels"])
        lines += [f"Frontier: at {ahead} of {len(v['levels'])} partial-zip FLOPs levels the best width-budget or refit merge of "
                  "the whole model, at no more FLOPs, is at least as accurate (joint) as the best partial zip."]
        if v["best_at_1_5"] is not None:
            lines += [f"Best at 1.5x FLOPs or less: {_label(v['best_at_1_5'])}, {100 * v['best_at_1_5']['joint_mean']:.1f} % joint = "
                      f"{100 * v['share_at_1_5']:.0f} % of the ensemble's {100 * v['ensemble']:.1f} %."]
        lines += ["", "| FLOPs level | best partial zip | best width / refit | |", "|---|---|---|---|"]
        for lv in v["levels"]:
            w = lv["whole"]
            lines.append(f"| {lv['flops']:.2f} | {_label(lv['partial'])}: {100 * lv['partial']['joint_mean']:.1f} | "
                         + (f"{_label(w)}: {100 * w['joint_mean']:.1f} | {'≥' if lv['ahead'] else '<'} |" if w else "– | |"))
        lines += ["", "| method | merge | FLOPs / one model | joint | per-task mean |", "|---|---|---|---|---|"]
        for s in sorted(group, key=lambda s: (s["flops_ratio"], -s["joint_mean"])):
            lines.append(f"| {s['method']} | {'–' if is_reference(s) else _how(s)} | {s['flops_ratio']:.2f} | "
                         f"{100 * s['joint_mean']:.1f} ± {100 * s['joint_std']:.1f} | "
                         f"{100 * s['mean_per_task_mean']:.1f} ± {100 * s['mean_per_task_std']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(summary: Sequence[dict[str, Any]], path: Path) -> None:
    """Joint accuracy against FLOPs, one panel per (dataset, arch): partial-zip and width curves per
    method (refit dashed), the other methods' full merges as points, the references as stars/crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((s["dataset"], s["arch"]) for s in summary))
    cols = min(3, len(panels))
    rows_ = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(5.5 * cols, 4.2 * rows_), squeeze=False)
    for ax, (ds, arch) in zip(axes.flat, panels):
        group = [s for s in summary if (s["dataset"], s["arch"]) == (ds, arch)]
        for k, method in enumerate(METHODS):
            style = dict(color=f"C{k % 2}", linestyle="--" if "+" in method else "-")
            for kind, marker, pick in (("partial", "o", lambda s: s["stop_at"] != WHOLE or s["width"] == 1.0),
                                       ("width", "s", lambda s: s["stop_at"] == WHOLE)):
                pts = sorted((s["flops_ratio"], 100 * s["joint_mean"]) for s in group if s["method"] == method and pick(s))
                if pts:
                    ax.plot(*zip(*pts), marker=marker, label=f"{method} {kind}", **style)
        for s in group:
            if is_reference(s):
                ax.scatter([s["flops_ratio"]], [100 * s["joint_mean"]], marker="*" if s["method"] == "ensemble" else "x", s=80,
                           label=s["method"], zorder=3, color="k" if s["method"] == "ensemble" else "grey")
            elif s["method"] in FULL_ONLY:
                ax.scatter([s["flops_ratio"]], [100 * s["joint_mean"]], marker="^", s=30, label=s["method"], zorder=3)
        ax.set(title=f"{ds} / {arch}", xlabel="FLOPs / one model", ylabel="joint accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(*, datasets: Sequence[str], archs: Sequence[acc.ArchSetting], splits: int, data_setting: acc.DataSetting, out: Path,
        cache_dir: Path | None = None, log: Callable[[str], None] = print, command: str = "python -m benchmarks.reproduce.partial",
        stops: dict[str, Sequence[str | None]] | None = None, widths: Sequence[float] = WIDTHS) -> dict[str, Any]:
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
                rows += run_pair(ds, arch, k, data_setting, stops=stops[arch.label], widths=widths, cache_dir=cache_dir, log=log)
    summary = summarize(rows)
    with open(out / "partial.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    header = (f"<!-- generated by `{command}`; test accuracies in %, mean ± sample std over splits; every method's full merge, "
              f"ZipIt! and MuDSC-zip (alpha {ALPHA}) merged up to each stop point and at each width budget, plain and refit -->\n")
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
    p.add_argument("--widths", type=float, nargs="+", default=None, help=f"width budgets of the curves (default {' '.join(map(str, WIDTHS))})")
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
              command=f"python -m benchmarks.reproduce.partial{' --quick' if args.quick else ''}", widths=args.widths or WIDTHS)
    print(markdown(res["summary"]))
    print(f"wrote {out}/partial.csv, partial.md, partial.png in {res['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
