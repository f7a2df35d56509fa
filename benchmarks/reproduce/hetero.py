"""Models that differ on the reproduction's data: ResNet-20 x1 with x2, x2 with x4, MLPs of two widths, ResNet-20 with ResNet-32.

Run::

    python -m benchmarks.reproduce.hetero [--out DIR] [--splits N] [--pairs resnet20x1:resnet20x2 ...]

For each pair of settings and class split of mnist5k, model A is the narrower (shallower)
setting's model trained on task A and model B the wider (deeper) setting's model trained on task B
(the cached models of :mod:`accuracy`, and two settings of this module's own, :data:`EXTRA`): two
models of one architecture, different widths or depths, disjoint tasks. Each method merges them
(:mod:`mudsc_graph.merging.hetero`, :mod:`mudsc_graph.merging.depth`): zip at model A's width, plain
and with the least-squares refit, align at model B's width, always at model A's depth; the rows
give the test joint and per-task accuracy, the merged model's FLOPs relative to model A, and the
references (each model, the ensemble). Writes ``hetero.csv`` and ``hetero.md`` into ``--out``
(default ``benchmark-results/hetero``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from benchmarks import default_out
from benchmarks.reproduce import accuracy as acc
from benchmarks.reproduce.common import input_shape_for, model_pair, prepare_data, summarize_by
from benchmarks.reproduce.partial import flops
from mudsc_experiments.evaluate import ensemble_logits, predict_logits, task_metrics
from mudsc_graph.merging.api import prepare

#: settings of this benchmark alone: an MLP half as wide as the grid's, and a ResNet-32 (trained like ResNet-20 x1)
EXTRA = {s.label: s for s in (
    acc.setting("mlp-half", "mlp", epochs=3, train_limit=1000, batch_size=64, hidden=(512, 512, 512, 256), bias=False),
    acc.setting("resnet32x1", "resnet20", epochs=3, train_limit=800, batch_size=64, width=1, num_blocks=(5, 5, 5),
                data=acc.FULL_ARCHS["resnet20x1"].data),
)}
PAIRS = (("resnet20x1", "resnet20x2"), ("resnet20x2", "resnet20x4"), ("mlp-half", "mlp"), ("resnet20x1", "resnet32x1"))
METHODS = ("zipit", "mudsc-zip", "zipit+refit", "mudsc-zip+refit", "weight_matching", "mudsc-align")
ALPHA = 0.5
COLUMNS = ["dataset", "pair", "split", "method", "flops_ratio", "joint", "mean_per_task", "task_a", "task_b"]


def run_pair(narrow: acc.ArchSetting, wide: acc.ArchSetting, split: int, *, dataset: str = "mnist5k",
             cache_dir: Path | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    ds = narrow.data or acc.FULL_DATA
    shape, _ = input_shape_for(dataset, narrow)
    data = prepare_data(dataset, split, shape, ds)
    a = model_pair(dataset, narrow, split, data, narrow.data or ds, cache_dir=cache_dir, log=log).models[0]
    b = model_pair(dataset, wide, split, data, wide.data or ds, cache_dir=cache_dir, log=log).models[1]
    x, y = data.test.x, data.test.y
    one = flops(a, x[:1])
    base = {"dataset": dataset, "pair": f"{narrow.label} + {wide.label}", "split": split}
    rows = []

    def add(method: str, outputs: Any, ratio: float) -> None:
        m = task_metrics(outputs, None, y, data.tasks)
        rows.append({**base, "method": method, "flops_ratio": ratio, "joint": m.joint, "mean_per_task": m.mean_per_task,
                     "task_a": m.per_task[0], "task_b": m.per_task[1]})

    add(f"model A ({narrow.label})", predict_logits(a, x), 1.0)
    add(f"model B ({wide.label})", predict_logits(b, x), flops(b, x[:1]) / one)
    add("ensemble", ensemble_logits([a, b], x, classes=data.tasks), (one + flops(b, x[:1])) / one)
    prepared = prepare([a.backbone, b.backbone], data=data.calib_batches)
    for name in METHODS:
        base_name, plus, variant = name.partition("+")
        method, mode = acc.parse_method(base_name)
        extras = acc.VARIANTS[plus + variant] if plus else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = prepared.merge(method=method, mode=mode, alpha=ALPHA, seed=split, **extras)
        head = copy.deepcopy(a.head)
        model = torch.nn.Sequential(result.model, head).eval()
        add(name, predict_logits(model, x), flops(model, x[:1]) / one)
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return summarize_by(rows, ("dataset", "pair", "method"), averaged=("flops_ratio",))


def markdown(summary: Sequence[dict[str, Any]], header: str = "") -> str:
    lines = [header] if header else []
    for ds, pair in dict.fromkeys((s["dataset"], s["pair"]) for s in summary):
        group = [s for s in summary if (s["dataset"], s["pair"]) == (ds, pair)]
        lines += [f"### {ds} / {pair} ({group[0]['n_splits']} split(s))", "",
                  "| method | FLOPs / model A | joint | per-task mean |", "|---|---|---|---|"]
        for s in group:
            lines.append(f"| {s['method']} | {s['flops_ratio']:.2f} | {100 * s['joint_mean']:.1f} ± {100 * s['joint_std']:.1f} | "
                         f"{100 * s['mean_per_task_mean']:.1f} ± {100 * s['mean_per_task_std']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run(*, pairs: Sequence[tuple[str, str]] = PAIRS, splits: int = 3, out: Path, cache_dir: Path | None = None,
        log: Callable[[str], None] = print, command: str = "python -m benchmarks.reproduce.hetero",
        table: dict[str, acc.ArchSetting] | None = None, dataset: str = "mnist5k") -> dict[str, Any]:
    table = table or {**acc.FULL_ARCHS, **EXTRA}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for narrow, wide in pairs:
        for k in range(splits):
            log(f"[{time.perf_counter() - t0:7.1f}s] {narrow} + {wide} / split {k}")
            rows += run_pair(table[narrow], table[wide], k, dataset=dataset, cache_dir=cache_dir, log=log)
    with open(out / "hetero.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    summary = summarize(rows)
    header = (f"<!-- generated by `{command}`; test accuracies in %, mean ± sample std over splits; model A the narrower "
              f"setting's model on task A, model B the wider one's on task B; zip at model A's width, align at model B's -->\n")
    (out / "hetero.md").write_text(markdown(summary, header))
    return {"rows": rows, "summary": summary, "seconds": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce.hetero", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--splits", type=int, default=3)
    p.add_argument("--pairs", nargs="+", default=None, help="NARROW:WIDE settings, e.g. resnet20x1:resnet20x2")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    pairs = [tuple(x.split(":", 1)) for x in args.pairs] if args.pairs else list(PAIRS)
    known = {**acc.FULL_ARCHS, **EXTRA}
    unknown = [s for pair in pairs for s in pair if s not in known]
    if unknown or any(len(pair) != 2 for pair in pairs):
        p.error(f"give pairs as NARROW:WIDE of {', '.join(known)}")
    out = Path(args.out) if args.out else default_out("hetero", False)
    res = run(pairs=pairs, splits=args.splits, out=out, log=lambda s: print(s, flush=True))
    print(markdown(res["summary"]))
    print(f"wrote {out}/hetero.csv, hetero.md in {res['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
