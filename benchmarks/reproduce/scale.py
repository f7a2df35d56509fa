"""Speed and scale of merging (issue 5, section 4): per-stage time, ratio to the calibration
forward passes, and growth of time and peak memory with width, number of models and samples.

Run::

    python -m benchmarks.reproduce.scale [--quick] [--out DIR] [--threads 2] [--device cpu|cuda]
                                         [--budget SECONDS]

Models are independently (randomly) initialised -- timing does not depend on training -- and
calibration inputs are random tensors of the architecture's input shape. Every configuration runs
in a fresh subprocess (``python -m benchmarks.reproduce.scale --one JSON``) so that its peak memory is its own: on CPU the
child reports its peak resident set size (``ru_maxrss``) and its resident size just before the
merge; on CUDA ``torch.cuda.max_memory_allocated`` during the merge.

Experiments (full / ``--quick``):

1. ``stages``: ResNet-20 x4, 2 models, 200 samples (quick: x2, 100): every stage of
   ``mudsc_graph.merge(reset_bn=True)`` for MuDSC-zip, MuDSC-align and ZipIt!, and the ratio of
   the whole merge to the calibration forward passes alone (the N models run once over the same
   data, after a warm-up batch, timed in the same child before the merge).
2. ``width``: ResNet-20 x1, x2, x4, x8, x16 (quick: x1, x2), 2 models, 100 samples, the three
   methods. x16 runs last, and only if its projected time (from x8) fits the remaining budget;
   the markdown says when it was skipped.
3. ``models``: N = 2, 3, 4, 6, 8 (quick: 2, 3, 4) models of ResNet-20 x2, 100 samples, MuDSC-zip and MuDSC-align.
4. ``samples``: 50, 100, 200, 400 calibration samples (quick: 50, 100), ResNet-20 x2, 2 models,
   the three methods.
5. ``vit``: ViT-Ti/16, ViT-S/16 and ViT-B/16 at 224 x 224, 2 models, 16 images, default settings,
   the three methods (full mode only).
6. The fitted exponent of time, floor, forward passes and peak memory against the variable of
   each of tables 2-5.

Every row also has the cost model's floor (:func:`cost_floor`): forward passes + the statistics'
multiply-adds at the matrix-multiply rate measured in the child + one assignment per group.

Writes ``scale.csv`` (one row per measurement) and ``scale.md`` (tables) into ``--out``
(default ``benchmark-results/scale``; quick: ``benchmark-results/scale-quick``; docs/results/
gets them through ``run_all --publish``, or ``--publish`` here) and prints the tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import ROOT, default_out

STAGES = ("check", "bn_reset_bases", "analysis", "statistics", "matching", "merge", "bn_reset_merged")
METHODS = {"mudsc-zip": ("mudsc", "zip"), "mudsc-align": ("mudsc", "align"), "zipit": ("zipit", "zip")}
FIELDS = ("experiment", "arch", "width", "n_models", "samples", "method", *STAGES, "total_s", "forward_s",
          "ratio", "floor_s", "floor_ratio", "forward_gflop", "stats_gflop", "gemm_gflops", "assign_s", "sweeps", "peak_mb",
          "base_mb", "device", "threads")


# --------------------------------------------------------------------------- one configuration (child)


def _rss_mb() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build ``n_models`` fresh models, time their forward passes (optional) and one merge; with
    ``cfg["floor"]`` also the cost model's floor (:func:`cost_floor`)."""
    import torch

    from benchmarks.reproduce.common import forward_seconds, sync
    from mudsc_graph import get_registry
    from mudsc_graph.merging.api import prepare

    torch.set_num_threads(int(cfg.get("threads", 2)))
    dev = torch.device(cfg.get("device", "cpu"))
    arch = get_registry().architecture(cfg["arch"])
    opts = {"width": cfg["width"]} if isinstance(cfg.get("width"), int) else {}
    opts.update(cfg.get("arch_opts") or {})
    models = []
    for seed in range(cfg["n_models"]):
        torch.manual_seed(seed)
        models.append(arch.build(**opts).to(dev).eval())
    shape = _input_shape(arch, opts)
    samples, batch = cfg["samples"], min(cfg.get("batch", 50), cfg["samples"])
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(min(batch, samples - i), *shape, generator=g).to(dev) for i in range(0, samples, batch)]

    forward = forward_seconds(models, data, dev) if cfg.get("forward", True) else None
    method, mode = METHODS[cfg["method"]]
    base = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    sync(dev)
    t0 = time.perf_counter()
    prepared = prepare(models, data=data, method=method, mode=mode, alpha=0.5, device=dev, reset_bn=bool(cfg.get("reset_bn", True)),
                       max_iter=int(cfg.get("max_iter", 100)))
    result = prepared.merge()
    sync(dev)
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _rss_mb()
    out = {"timings": {**prepared.timings, **result.timings}, "total_s": total, "forward_s": forward, "sweeps": result.sweeps,
           "peak_mb": peak, "base_mb": base}
    if cfg.get("floor"):
        out.update(cost_floor(prepared, result, models, data, dev))
    return out


def _input_shape(arch: Any, opts: dict[str, Any]) -> tuple[int, ...]:
    """One input's shape: the architecture's example, or the ``image_size`` an option gives it."""
    return tuple(arch.example_inputs(1)[0].shape[1:]) if not opts.get("image_size") else (3, opts["image_size"], opts["image_size"])


def cost_floor(prepared: Any, result: Any, models: list, data: list, dev: Any) -> dict[str, Any]:
    """What a merge cannot go below on this machine: the calibration forward passes, the
    multiply-adds the statistics need (zip: the upper half of every group's ``(N*O)^2`` scatter;
    align: the ``(N-1) O^2`` cross blocks and the variances) at the measured matrix-multiply rate,
    and one solve of the matcher per group (on the real activation similarities). ``weight_gflop``:
    the floating-point operations of the weight similarities this merge's sweeps built (their cross
    products, ``result.weight_macs``), which a method with sweeps adds to that floor."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.reproduce.common import sync
    from mudsc_graph.merging.methods import resolve_method
    from mudsc_graph.merging.solver import couplings

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        models[0](data[0])
    forward_flops = counter.get_total_flops() * len(models) * sum(len(x) for x in data) / len(data[0])
    n = len(models)
    act = prepared.activations(within_model=False) if prepared.calib is not None else {}
    macs = 0.0
    for gid in result.matchings:
        if gid not in act:
            continue
        o, t = prepared.spec.groups[gid].size, act.samples[gid]
        macs += t * ((n * o) * (n * o + 1) / 2 if act.within_model else (n - 1) * o * o + n * o)
    a = torch.randn(2048, 2048, device=dev)
    a @ a
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    sync(dev)
    rate = 5 * 2 * 2048**3 / (time.perf_counter() - t0)
    matcher = resolve_method(prepared.registry, prepared.options).matcher
    t0 = time.perf_counter()
    for unit in couplings(prepared.spec, [g for g in result.matchings if g in act]):
        matcher.match([act[g] for g in unit], n, prepared.spec.groups[unit[0]].blocks)
    assign = time.perf_counter() - t0
    return {"forward_gflop": forward_flops / 1e9, "stats_gflop": 2 * macs / 1e9, "gemm_gflops": rate / 1e9, "assign_s": assign,
            "weight_gflop": 2 * result.weight_macs / 1e9}


# --------------------------------------------------------------------------- parent


def spawn(cfg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; returns its JSON (last stdout line)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.get("threads", 2))}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reproduce.scale", "--one", json.dumps(cfg)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"configuration {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(quick: bool) -> list[dict[str, Any]]:
    """Configurations in run order. The first child of each (arch, width, N, samples) times the forward
    passes; a configuration already run for another experiment is reported again, not rerun."""
    three = list(METHODS)
    cfgs: list[dict[str, Any]] = []

    def add(experiment: str, methods: list[str], **kw: Any) -> None:
        for m in methods:
            cfgs.append({"experiment": experiment, "method": m, **kw})

    if quick:
        add("stages", three, arch="resnet20", width=2, n_models=2, samples=100)
        for w in (1, 2):
            add("width", three, arch="resnet20", width=w, n_models=2, samples=100)
        for n in (2, 3, 4):
            add("models", ["mudsc-zip", "mudsc-align"], arch="resnet20", width=2, n_models=n, samples=100)
        for s in (50, 100):
            add("samples", three, arch="resnet20", width=2, n_models=2, samples=s)
        return cfgs
    add("stages", three, arch="resnet20", width=4, n_models=2, samples=200)
    for w in (1, 2, 4, 8):
        add("width", three, arch="resnet20", width=w, n_models=2, samples=100)
    for n in (2, 3, 4, 6, 8):
        add("models", ["mudsc-zip", "mudsc-align"], arch="resnet20", width=2, n_models=n, samples=100)
    for s in (50, 100, 200, 400):
        add("samples", three, arch="resnet20", width=2, n_models=2, samples=s)
    for name, opts in VITS.items():  # ViT-Ti/S/B 16 at 224 px, 16 images, default settings
        add("vit", three, arch=opts.get("arch", "vit_tiny"), width=name, n_models=2, samples=16, batch=16,
            arch_opts={k: v for k, v in opts.items() if k != "arch"})
    add("width", three, arch="resnet20", width=16, n_models=2, samples=100)  # last: only if it fits the budget (main)
    return cfgs


#: The ViT widths of the growth table: ViT-Ti/16 and ViT-S/16 through the vit_tiny factory, ViT-B/16 itself.
VITS = {
    "Ti/16 (192)": dict(image_size=224, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=1000),
    "S/16 (384)": dict(image_size=224, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536, num_classes=1000),
    "B/16 (768)": dict(arch="vit_b16"),
}


def width_value(r: dict[str, Any]) -> float:
    """The growth variable of a row: ResNet width multiplier, ViT hidden size, N or samples."""
    if r["experiment"] == "models":
        return float(r["n_models"])
    if r["experiment"] == "samples":
        return float(r["samples"])
    w = str(r["width"])
    return float(w.split("(")[1].rstrip(")")) if "(" in w else float(w)


def exponents(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Least-squares slope of log(y) on log(x) for time, floor and peak memory, per experiment and
    method (x: width, hidden size, N or samples); ``None`` with fewer than two points."""
    import math

    out = []
    for exp in ("width", "vit", "models", "samples"):
        for method in METHODS:
            sel = [r for r in rows if r["experiment"] == exp and r["method"] == method]
            if len(sel) < 2:
                continue
            xs = [math.log(width_value(r)) for r in sel]

            def slope(key: str) -> float | None:
                ys = [r.get(key) for r in sel]
                if any(y is None or y <= 0 for y in ys):
                    return None
                ly = [math.log(y) for y in ys]
                mx, my = sum(xs) / len(xs), sum(ly) / len(ly)
                den = sum((x - mx) ** 2 for x in xs)
                return sum((x - mx) * (y - my) for x, y in zip(xs, ly)) / den if den else None

            out.append({"experiment": exp, "method": method, "points": len(sel), "time": slope("total_s"), "floor": slope("floor_s"),
                        "forward": slope("forward_s"), "memory": slope("peak_mb")})
    return out


def fmt(v: Any, nd: int = 2) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def to_markdown(rows: list[dict[str, Any]], notes: list[str], header: str) -> str:
    titles = {
        "stages": "1. Per-stage time and ratio of the whole merge to the calibration forward passes",
        "width": "2. Growth with width (ResNet-20, 2 models, 100 samples)",
        "models": "3. Growth with the number of models (ResNet-20 x2, 100 samples)",
        "samples": "4. Growth with calibration samples (ResNet-20 x2, 2 models)",
        "vit": "5. Growth with ViT width (ViT-Ti/16, S/16, B/16 at 224 px, 2 models, 16 images, default settings)",
    }
    mem = "peak MB (GPU alloc)" if rows and rows[0]["device"].startswith("cuda") else "peak RSS MB"
    cols = ["arch", "width", "N", "samples", "method", *STAGES, "total s", "forward s", "ratio", "floor s", "floor ratio", "sweeps", mem]
    out = [header, ""]
    for exp, title in titles.items():
        sel = [r for r in rows if r["experiment"] == exp]
        out += [f"## {title}", ""]
        if not sel:
            out += ["(not run)", ""]
            continue
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in sel:
            vals = [r["arch"], fmt(r["width"]), fmt(r["n_models"]), fmt(r["samples"]), r["method"],
                    *(fmt(r[s]) for s in STAGES), fmt(r["total_s"]), fmt(r["forward_s"]), fmt(r["ratio"], 1),
                    fmt(r.get("floor_s")), fmt(r.get("floor_ratio"), 1), fmt(r["sweeps"]), fmt(r["peak_mb"], 0)]
            out.append("| " + " | ".join(vals) + " |")
        out.append("")
    out += exponent_table(rows)
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def exponent_table(rows: list[dict[str, Any]]) -> list[str]:
    """The fitted growth exponents (time ~ x^k) as markdown lines."""
    exps = exponents(rows)
    if not exps:
        return []
    var = {"width": "ResNet-20 width multiplier", "vit": "ViT hidden size", "models": "number of models N", "samples": "calibration samples"}
    out = ["## 6. Fitted growth exponents", "",
           "Slope of log(y) on log(x) over the rows of each table: y ~ x^k. `floor`: the cost model's floor (forward passes + "
           "statistics multiply-adds at the measured matrix-multiply rate + one assignment per group); `forward`: the "
           "calibration forward passes alone; `memory`: peak RSS (which includes the interpreter and torch, so it grows "
           "slower than the merge's own memory).", "",
           "| grows with | method | points | time k | floor k | forward k | memory k |", "|---|---|---|---|---|---|---|"]
    for e in exps:
        out.append(f"| {var[e['experiment']]} | {e['method']} | {e['points']} | {fmt(e['time'])} | {fmt(e['floor'])} | "
                   f"{fmt(e['forward'])} | {fmt(e['memory'])} |")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce.scale", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, about 1-2 minutes on 2 cores")
    p.add_argument("--out", default=None, help="output folder (default benchmark-results/scale; quick: benchmark-results/scale-quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--budget", type=float, default=1200.0,
                   help="seconds: the x16 width runs only if its projection fits what is left (full mode)")
    p.add_argument("--publish", action="store_true", help="copy scale.md and scale.csv into docs/results/ (full runs only)")
    p.add_argument("--one", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    start = time.perf_counter()
    rows, notes = _measure(args, start)
    out = _write(args, rows, notes, time.perf_counter() - start)
    if args.publish and not args.quick:
        from benchmarks import DOCS_DIR
        from benchmarks.publish import copy_into_docs

        copy_into_docs([(out / name, DOCS_DIR / "results" / name) for name in ("scale.md", "scale.csv")])
    return 0


def _measure(args: argparse.Namespace, start: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Every configuration of the plan in its own process (identical ones once); the rows and notes."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if args.quick:
        notes.append("quick mode: the ViT widths are left out (full mode only: about 5 minutes on 2 cores).")
    forward: dict[tuple, float] = {}
    done: dict[tuple, dict[str, Any]] = {}  # identical configurations of several experiments run once
    skip_x16: bool | None = None
    for cfg in plan(args.quick):
        cfg = {**cfg, "threads": args.threads, "device": args.device}
        key = (cfg["arch"], cfg["width"], cfg["n_models"], cfg["samples"])
        if cfg["width"] == 16 and skip_x16 is None:
            prev = [r for r in rows if r["experiment"] == "width" and r["width"] == 8]
            # conv cost grows with width^2 (the matching faster still): x16 ~ 4.5x the x8 runs, 3 methods
            projected = 4.5 * sum(r["total_s"] + (r["forward_s"] or 0) + 5.0 for r in prev)
            left = args.budget - (time.perf_counter() - start)
            skip_x16 = projected > left
            if skip_x16:
                note = (f"ResNet-20 x16 skipped: projected {projected:.0f} s for its three merges (4.5x the x8 runs) "
                        f"exceeds the {max(left, 0):.0f} s left of the {args.budget:.0f} s budget (`--budget`)")
                notes.append(note)
                print(note, flush=True)
        if cfg["width"] == 16 and skip_x16:
            continue
        ckey = (*key, cfg["method"], cfg.get("batch"), cfg.get("max_iter"))
        if ckey in done:
            res = done[ckey]
        else:
            cfg["forward"], cfg["floor"] = key not in forward, True
            res = done[ckey] = spawn(cfg)
        if res["forward_s"] is not None and key not in forward:
            forward[key] = res["forward_s"]
        fwd = forward.get(key)
        row = {"experiment": cfg["experiment"], "arch": cfg["arch"], "width": cfg["width"] or "",
               "n_models": cfg["n_models"], "samples": cfg["samples"], "method": cfg["method"],
               **{s: res["timings"].get(s, 0.0) for s in STAGES}, "total_s": res["total_s"], "forward_s": fwd,
               "ratio": res["total_s"] / fwd if fwd else None, **_floor(res, fwd), "sweeps": res["sweeps"], "peak_mb": res["peak_mb"],
               "base_mb": res["base_mb"], "device": args.device, "threads": args.threads}
        rows.append(row)
        print(f"[{time.perf_counter() - start:6.0f} s] {row['experiment']:7s} {row['arch']}x{row['width'] or '-'} "
              f"N={row['n_models']} samples={row['samples']} {row['method']:11s} total {row['total_s']:7.2f} s "
              f"ratio {fmt(row['ratio'], 1):>5s} peak {row['peak_mb']:7.0f} MB", flush=True)
    return rows, notes


def _floor(res: dict[str, Any], forward: float | None) -> dict[str, Any]:
    """The cost model's floor of one row (see :func:`cost_floor`) in seconds and over the forward passes."""
    keys = ("forward_gflop", "stats_gflop", "gemm_gflops", "assign_s")
    out = {k: res.get(k) for k in keys}
    if forward and res.get("stats_gflop") is not None:
        out["floor_s"] = forward + res["stats_gflop"] / res["gemm_gflops"] + res["assign_s"]
        out["floor_ratio"] = out["floor_s"] / forward
    else:
        out["floor_s"] = out["floor_ratio"] = None
    return out


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], notes: list[str], elapsed: float) -> Path:
    """scale.csv and scale.md in the output folder (and both printed)."""
    import torch

    header = (f"# Speed and scale ({'quick' if args.quick else 'full'} run)\n\n"
              f"Device {args.device}, {args.threads} threads, torch {torch.__version__}; models randomly "
              f"initialised, random calibration inputs, `merge(..., alpha=0.5, reset_bn=True)`. Stage times in "
              f"seconds; `forward s`: the N models once over the calibration data (after a warm-up); `ratio`: "
              f"whole merge / forward. Peak memory per configuration, each in a fresh process "
              f"({'CUDA max_memory_allocated during the merge' if args.device == 'cuda' else 'peak RSS of the whole process, torch and data included'}). "
              f"A configuration that appears in several tables is measured once. "
              f"Generated by `python -m benchmarks.reproduce.scale{' --quick' if args.quick else ''}` in {elapsed:.0f} s.")
    out = Path(args.out) if args.out else default_out("scale", args.quick)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scale.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()})
    md = to_markdown(rows, notes, header)
    (out / "scale.md").write_text(md)
    print()
    print((out / "scale.csv").read_text())
    print(md)
    return out


if __name__ == "__main__":
    sys.exit(main())
