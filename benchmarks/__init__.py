"""Benchmarks and the reproduction of the paper's experiments, run as modules from the repository root.

::

    python -m benchmarks.bench_merge --quick                      # a timing script: prints its measurements
    python -m benchmarks.reproduce.run_all --quick                # the reproduction, into benchmark-results/
    python -m benchmarks.publish                                  # copy a full run_all into docs/
    python -m benchmarks.investigations.align_vs_average --quick  # a one-off study behind docs/findings.md

* ``bench_*.py``: timing scripts (analysis, real models, merge, matching); they print, write nothing.
* ``reproduce/``: every table and figure of docs/results.md (``run_all`` runs ``figures``, ``scale``
  and ``accuracy``; ``common`` holds their configs, data splits and cached model pairs).
* ``investigations/``: one-off studies that docs/findings.md cites; not part of ``run_all``.
* ``publish``: the only code that writes into ``docs/``.

Results go to :data:`RESULTS_DIR` (``benchmark-results/``, ignored by git) unless ``--out`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

#: The repository root (the folder that holds ``benchmarks/`` and ``docs/``).
ROOT = Path(__file__).resolve().parents[1]
#: Where every benchmark writes by default.
RESULTS_DIR = ROOT / "benchmark-results"
#: The documentation folder that :mod:`benchmarks.publish` writes into.
DOCS_DIR = ROOT / "docs"


def default_out(name: str, quick: bool = False) -> Path:
    """``benchmark-results/NAME`` (quick runs: ``benchmark-results/NAME-quick``)."""
    return RESULTS_DIR / (f"{name}-quick" if quick else name)


def shown(path: Path) -> str:
    """``path`` relative to the repository root when it is inside it (for text that may end up in docs/)."""
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)
