"""Time and peak memory of what mudsc refuses or bounds (issue 28): configs that describe huge
models, a 100 MB line of text, a million-line text file. Each case runs ``mudsc`` in its own
process; the table gives its exit code, seconds and peak RSS.

    python -m benchmarks.investigations.hostile_inputs

Tiny BERT classifier directories and a tokenizer are built in a temporary directory (nothing is
downloaded). It prints a markdown table and writes no file outside that directory.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _run(args: list[str]) -> tuple[int, float, float]:
    """``(exit code, seconds, peak RSS in GiB)`` of ``mudsc ARGS`` in a fresh child."""
    from test_adversarial_dirs import _peak  # noqa: E402  (the tests' measurement)

    t0 = time.perf_counter()
    result, gib = _peak(args, timeout=3600)
    return result.returncode, time.perf_counter() - t0, gib


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from test_cli_hf import LABELLED, _bert, _save, _tokenizer  # noqa: E402  (the tests' tiny models)

    root = Path(tempfile.mkdtemp(prefix="mudsc-hostile-"))
    try:
        tok = _tokenizer()
        _save(_bert(0), root / "a", tok)
        _save(_bert(1), root / "b", tok)
        cases: list[tuple[str, list[str]]] = [("baseline: mudsc inspect a --check", ["inspect", str(root / "a"), "--check"])]
        for name, change in (("num_hidden_layers 1e6", {"num_hidden_layers": 10**6}), ("num_labels 1e8", {"num_labels": 10**8}),
                             ("hidden_size 1e10", {"hidden_size": 10**10, "num_attention_heads": 1}), ("vocab_size 1e9", {"vocab_size": 10**9})):
            d = root / name.replace(" ", "_")
            shutil.copytree(root / "a", d)
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(change)
            (d / "config.json").write_text(json.dumps(cfg))
            cases.append((f"config {name}: inspect --check", ["inspect", str(d), "--check"]))
        huge = root / "huge.txt"
        with open(huge, "w", encoding="utf-8") as f:
            f.write("0\t" + "cat " * 25_000_000 + "\n" + "\n".join(LABELLED) + "\n")
        many = root / "many.txt"
        with open(many, "w", encoding="utf-8") as f:
            f.writelines(f"{i % 2}\tthe cat sat on the mat {i}\n" for i in range(1_000_000))
        merge = ["--method", "weight_matching", "--max-iter", "2", "--quiet", "--samples", "32"]
        cases.append(("a 100 MB line: merge --samples 32", ["merge", str(root / "a"), str(root / "b"), "--data", str(huge), "--out", str(root / "m1"), *merge]))
        cases.append(("a million lines: merge --samples 32", ["merge", str(root / "a"), str(root / "b"), "--data", str(many), "--out", str(root / "m2"), *merge]))
        print("| case | exit | seconds | peak RSS GiB |")
        print("|---|---|---|---|")
        for name, args in cases:
            code, seconds, gib = _run(args)
            print(f"| {name} | {code} | {seconds:.1f} | {gib:.2f} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
