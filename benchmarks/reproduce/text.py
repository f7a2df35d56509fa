"""Text: small BERT classifiers trained on corpora bundled in a package, merged every way, and one
pair merged through the command line on its saved Hugging Face directories.

Run::

    python -m benchmarks.reproduce.text [--quick] [--out DIR] [--threads N]

The library part is :func:`mudsc_experiments.text.run_text` (models A on sentiment, B on
party, C on sentiment from another seed; every method plain, with REPAIR and, for the two tasks,
with per-task REPAIR). The command-line part does what a user with two trained checkpoints does:
models A and C are written with ``save_pretrained`` (model and tokenizer) into their own
directories, the calibration sentences and the test set into ``LABEL<TAB>text`` files, and then::

    mudsc merge A C --data calib.txt --samples N --max-length L --method mudsc --mode zip --out M [--repair]
    mudsc eval M --data test.txt --max-length L --json

run as subprocesses. Its rows (``... (CLI, saved directories)``) sit beside the library's; the
command line pads each file to its longest line where the library pads to ``max_length``, and
padded positions enter the activation statistics, so the two merges may differ slightly. The CLI's
evaluation of A and C must equal the library's (checked: the run fails otherwise).

Writes ``text.csv`` (one row per setting and method), ``text.md`` and ``text_run.json`` into
``--out`` (default ``benchmark-results/text``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks import ROOT, default_out
from mudsc_experiments.text import TWO_TASKS, TextConfig, TextResult, TextRow, run_text

#: The files :func:`run` writes into its output folder.
OUTPUT_FILES = ("text.csv", "text.md", "text_run.json")
COLUMNS = ["setting", "method", "kind", "joint", "per_task", "mean_per_task", "merge_seconds"]
ALPHA = 0.5
FULL = TextConfig()
QUICK = TextConfig(train_samples=4000, test_samples=500, calib_samples=128, epochs=3)
CLI_SUFFIX = " (CLI, saved directories)"


def _cli(args: Sequence[str], log: Callable[[str], None]) -> dict[str, Any]:
    """``python -m mudsc_cli ARGS --json``: its JSON output (the run fails when the command does)."""
    cmd = [sys.executable, "-m", "mudsc_cli", *args, "--json"]
    log("$ mudsc " + " ".join(args))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    if done.returncode != 0:
        raise RuntimeError(f"mudsc {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def _write_labelled(path: Path, examples: Sequence[tuple[int, str]]) -> None:
    # whitespace runs become one space: the tokenizer splits on whitespace, so no token changes
    path.write_text("".join(f"{y}\t{' '.join(s.split())}\n" for y, s in examples), encoding="utf-8")


CLI_VARIANTS = (("", ()), ("+repair", ("--repair",)))


def cli_rows(result: TextResult, config: TextConfig, *, seed: int = 0, log: Callable[[str], None] = print,
             variants: Sequence[tuple[str, Sequence[str]]] = CLI_VARIANTS) -> list[TextRow]:
    """Models A and C saved as Hugging Face directories and merged with ``mudsc merge`` (MuDSC-zip,
    once per ``variants`` entry: row suffix, extra flags), evaluated with ``mudsc eval``; checks the
    CLI's accuracy of A and C against the library's."""
    from mudsc_graph.io.hf import quiet_transformers

    art = result.artifacts
    with tempfile.TemporaryDirectory(prefix="mudsc-text-cli-") as tmp:
        root = Path(tmp)
        for name in "AC":
            with quiet_transformers():
                art["models"][name].save_pretrained(root / name)
                art["tokenizer"].save_pretrained(root / name)
        n_calib = min(config.calib_samples, len(art["train"]["sentiment"]))
        _write_labelled(root / "calib.txt", art["train"]["sentiment"][:n_calib])
        _write_labelled(root / "test.txt", art["test"]["sentiment"])
        length = ["--max-length", str(config.max_length)]
        for name in "AC":
            got = _cli(["eval", str(root / name), "--data", str(root / "test.txt"), *length], log)["accuracy"]
            want = result.row("one task", f"model {name} (sentiment)").joint
            if abs(got - want) > 1e-6:
                raise RuntimeError(f"mudsc eval gives model {name} {got:.4f} on the test file, the library {want:.4f}")
        rows = []
        for suffix, extra in variants:
            out = root / f"merged{suffix}"
            t0 = time.perf_counter()
            _cli(["merge", str(root / "A"), str(root / "C"), "--data", str(root / "calib.txt"), "--samples", str(n_calib),
                  "--batch-size", str(config.batch_size), *length, "--method", "mudsc", "--mode", "zip", "--alpha", str(ALPHA),
                  "--seed", str(seed), "--out", str(out), "--quiet", *extra], log)
            seconds = time.perf_counter() - t0  # the whole command: start-up, loading, merge and saving
            acc = _cli(["eval", str(out), "--data", str(root / "test.txt"), *length], log)["accuracy"]
            rows.append(TextRow("one task", f"mudsc-zip{suffix}{CLI_SUFFIX}", "merged", acc, [acc], acc, seconds, ["sentiment"]))
    return rows


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def markdown(rows: Sequence[TextRow], result: TextResult, header: str = "") -> str:
    n, cfg = result.samples, result.config["config"]
    arch = f"BERT {cfg['layers']} layers x {cfg['hidden']} ({cfg['heads']} heads, MLP {cfg['intermediate']}, {cfg['max_length']} tokens)"
    lines = [header] if header else []
    lines += [f"Models: {arch}, trained {cfg['epochs']} epochs from random initialisations on {n['train sentiment']} review "
              f"snippets (sentiment) / {n['train party']} speech sentences (party); vocabulary {n['vocabulary']} words; "
              f"{n['calibration per task']} calibration sentences per task; MuDSC at alpha {ALPHA}. Test accuracy in %.", "",
              f"### Two tasks: A on sentiment, B on party (merged encoder, each model's own head; {n['test sentiment']} + "
              f"{n['test party']} test sentences)", "",
              "| model | joint | sentiment | party | mean per task | merge s |", "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r.setting == "two tasks"):
        cells = [_pct(r.accuracy_of(t)) for t in TWO_TASKS]
        mean = "" if r.kind == "base" else _pct(r.mean_per_task)
        seconds = "" if r.merge_seconds is None else f"{r.merge_seconds:.1f}"
        lines.append(f"| {r.name} | {_pct(r.joint)} | {' | '.join(cells)} | {mean} | {seconds} |")
    lines += ["", f"### One task, two seeds: A and C on sentiment (whole models merged; {n['test sentiment']} test sentences)", "",
              "| model | sentiment | merge s |", "|---|---|---|"]
    for r in (r for r in rows if r.setting == "one task"):
        lines.append(f"| {r.name} | {_pct(r.joint)} | {'' if r.merge_seconds is None else f'{r.merge_seconds:.1f}'} |")
    lines += ["", f"Rows marked *{CLI_SUFFIX.strip()}*: `mudsc merge` on the two models' `save_pretrained` directories and "
              "`mudsc eval` on a `LABEL<TAB>text` test file; their merge seconds are the whole command (start-up, loading, "
              "saving). The command line pads a file to its longest line, the library to the fixed length, so their "
              "activation statistics (and merges) can differ slightly.", ""]
    return "\n".join(lines)


def run(*, config: TextConfig, out: Path, seed: int = 0, cache_dir: Path | None = None, cli: bool = True,
        methods: Sequence[str] | None = None, cli_variants: Sequence[tuple[str, Sequence[str]]] = CLI_VARIANTS,
        log: Callable[[str], None] = print, command: str = "python -m benchmarks.reproduce.text") -> dict[str, Any]:
    """The library's rows (every method unless ``methods`` says otherwise) and, with ``cli``, the
    command line's (:func:`cli_rows`); writes :data:`OUTPUT_FILES` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = run_text(methods=methods, config=config, alpha=ALPHA, seed=seed, cache_dir=cache_dir, log=log)
    rows = list(result.rows)
    if cli:
        rows += cli_rows(result, config, seed=seed, log=log, variants=cli_variants)
    with open(out / "text.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({"setting": r.setting, "method": r.name, "kind": r.kind, "joint": r.joint,
                        "per_task": json.dumps([round(v, 4) for v in r.per_task]), "mean_per_task": r.mean_per_task,
                        "merge_seconds": r.merge_seconds})
    (out / "text.md").write_text(markdown(rows, result, f"<!-- generated by `{command}` -->\n"))
    total = time.perf_counter() - t0
    (out / "text_run.json").write_text(json.dumps({"config": asdict(config), "seed": seed, "samples": result.samples,
                                                   "timings": result.timings, "trained": result.trained, "seconds": total}, indent=1))
    return {"rows": rows, "result": result, "seconds": total}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce.text", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4,000 training sentences per task, 3 epochs, 500 test sentences (about two minutes)")
    p.add_argument("--out", default=None)
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {FULL.epochs}; quick {QUICK.epochs})")
    p.add_argument("--no-cli", action="store_true", help="leave out the command-line rows")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    config = QUICK if args.quick else FULL
    if args.epochs is not None:
        config = replace(config, epochs=args.epochs)
    out = Path(args.out) if args.out else default_out("text", args.quick)
    res = run(config=config, out=out, cli=not args.no_cli, log=lambda s: print(s, flush=True),
              command=f"python -m benchmarks.reproduce.text{' --quick' if args.quick else ''}")
    print(markdown(res["rows"], res["result"]))
    print(f"wrote {out}/text.csv, text.md in {res['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
