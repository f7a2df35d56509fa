"""The speed and memory targets of issue 12, measured: each configuration in its own process.

Run::

    python -m benchmarks.targets [--quick] [--threads 2] [--device cpu|cuda] [--out DIR] [--publish]

Targets (ratio = the whole merge / the N models' calibration forward passes alone):

* ``vit_b16`` pair, 16 images 224x224, default settings: MuDSC-align <= 3x, MuDSC-zip <= 4x,
  ZipIt! <= 2.5x, peak RSS <= 3 GB each;
* ResNet-20x8 pair, 200 images (``reset_bn=False``, as the issue measured it): MuDSC-zip <= 1.5x,
  MuDSC-align <= 1.3x.

Next to each ratio the cost model's floor (:func:`benchmarks.reproduce.scale.cost_floor`: forward
passes + the statistics' multiply-adds at the measured matrix-multiply rate + one assignment per
group), so a missed target shows whether the floor itself is above it, and that floor plus the
weight similarities' multiply-adds of the sweeps as they ran (MuDSC's iterative scheme rebuilds
them in every sweep; ``MergeResult.weight_macs``). ``--quick`` runs small
stand-ins (vit_tiny, ResNet-20x2) to check the command, not the targets. Writes ``targets.md`` and
``targets.json`` into ``--out`` (default ``benchmark-results/targets``); ``--publish`` copies the
markdown to ``docs/results/targets.md`` (full runs only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import DOCS_DIR, default_out

GB = 1024.0  # MiB

#: (label, configuration, {method: target ratio}, peak RSS target in MiB or None)
FULL = [
    ("vit_b16, 16 images", {"arch": "vit_b16", "n_models": 2, "samples": 16, "batch": 16},
     {"mudsc-align": 3.0, "mudsc-zip": 4.0, "zipit": 2.5}, 3 * GB),
    ("resnet20x8, 200 images", {"arch": "resnet20", "width": 8, "n_models": 2, "samples": 200, "reset_bn": False},
     {"mudsc-zip": 1.5, "mudsc-align": 1.3}, None),
]
QUICK = [
    ("vit_tiny, 32 images", {"arch": "vit_tiny", "n_models": 2, "samples": 32, "batch": 16},
     {"mudsc-align": 3.0, "mudsc-zip": 4.0, "zipit": 2.5}, 3 * GB),
    ("resnet20x2, 100 images", {"arch": "resnet20", "width": 2, "n_models": 2, "samples": 100, "reset_bn": False},
     {"mudsc-zip": 1.5, "mudsc-align": 1.3}, None),
]


def row(label: str, method: str, res: dict[str, Any], target: float, rss_target: float | None) -> dict[str, Any]:
    """One measured configuration against its targets."""
    fwd = res["forward_s"]
    floor = fwd + res["stats_gflop"] / res["gemm_gflops"] + res["assign_s"] if "stats_gflop" in res else None
    sweeps_floor = floor + res["weight_gflop"] / res["gemm_gflops"] if floor else None
    ratio = res["total_s"] / fwd
    met = ratio <= target and (rss_target is None or res["peak_mb"] <= rss_target)
    return {"config": label, "method": method, "forward_s": fwd, "total_s": res["total_s"], "ratio": ratio, "target": target,
            "floor_s": floor, "floor_ratio": floor / fwd if floor else None,
            "sweeps_floor_ratio": sweeps_floor / fwd if sweeps_floor else None, "sweeps": res["sweeps"], "peak_mb": res["peak_mb"],
            "rss_target_mb": rss_target, "met": met, "timings": res["timings"]}


def to_markdown(rows: list[dict[str, Any]], header: str) -> str:
    cols = ["configuration", "method", "forward s", "total s", "ratio", "target", "floor ratio", "floor + sweeps", "sweeps", "peak RSS MB", "RSS target",
            "met", "statistics s", "matching s", "merge s"]
    out = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        t = r["timings"]
        vals = [r["config"], r["method"], f"{r['forward_s']:.1f}", f"{r['total_s']:.1f}", f"{r['ratio']:.2f}x", f"<= {r['target']}x",
                f"{r['floor_ratio']:.2f}x" if r["floor_ratio"] else "",
                f"{r['sweeps_floor_ratio']:.2f}x" if r["sweeps_floor_ratio"] else "", str(r["sweeps"]), f"{r['peak_mb']:.0f}",
                f"<= {r['rss_target_mb']:.0f}" if r["rss_target_mb"] else "", "yes" if r["met"] else "**no**",
                f"{t.get('statistics', 0):.1f}", f"{t.get('matching', 0):.1f}", f"{t.get('merge', 0):.1f}"]
        out.append("| " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def measure(plan: list, threads: int, device: str, spawn: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (configuration, method) of ``plan`` through ``spawn`` (a fresh process each)."""
    rows = []
    for label, cfg, targets, rss in plan:
        for method, target in targets.items():
            res = spawn({**cfg, "method": method, "threads": threads, "device": device, "floor": True})
            rows.append(row(label, method, res, target, rss))
            r = rows[-1]
            print(f"{label:24s} {method:12s} ratio {r['ratio']:5.2f}x (target {target}x, floor {r['floor_ratio'] or 0:.2f}x) "
                  f"peak {r['peak_mb']:6.0f} MB  {'met' if r['met'] else 'MISSED'}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from benchmarks.publish import copy_into_docs
    from benchmarks.reproduce.scale import spawn

    p = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small stand-ins, to check the command (a minute)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=None)
    p.add_argument("--publish", action="store_true", help="copy targets.md into docs/results/ (full runs only)")
    args = p.parse_args(argv)
    if args.publish and args.quick:
        p.error("--publish takes a full run, not --quick")
    start = time.perf_counter()
    rows = measure(QUICK if args.quick else FULL, args.threads, args.device, spawn)
    import torch

    header = (f"# Speed and memory targets ({'quick' if args.quick else 'full'} run)\n\n"
              f"Device {args.device}, {args.threads} threads, torch {torch.__version__}; random models and inputs, each "
              f"configuration in a fresh process, default merge settings unless the configuration says otherwise. `ratio`: the whole "
              f"merge over the N models' calibration forward passes; `floor ratio`: the cost model's floor over the same (forward "
              f"passes + statistics multiply-adds at the measured matrix-multiply rate + one assignment per group); `floor + sweeps`: "
              f"that floor plus the multiply-adds of the weight similarities the sweeps built, at the same rate (what MuDSC's "
              f"iterative scheme adds to it, as it ran). Generated by `python -m benchmarks.targets{' --quick' if args.quick else ''}` in {time.perf_counter() - start:.0f} s.")
    md = to_markdown(rows, header)
    out = Path(args.out) if args.out else default_out("targets", args.quick)
    out.mkdir(parents=True, exist_ok=True)
    (out / "targets.md").write_text(md)
    (out / "targets.json").write_text(json.dumps(rows, indent=1))
    print()
    print(md)
    if args.publish:
        copy_into_docs([(out / "targets.md", DOCS_DIR / "results" / "targets.md")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
