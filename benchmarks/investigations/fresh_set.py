"""The fresh set of architectures (tests/test_fresh_set.py): mudsc's permutable units against the
hand count that the test verifies outside mudsc, one row per model.

    python -m benchmarks.investigations.fresh_set

Run it with another checkout first on ``PYTHONPATH`` (and ``mudsc_plugins`` linked to its
``plugins``) to get the "before" column of a comparison. It prints a markdown table and writes no file.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from test_fresh_set import FRESH, _model  # noqa: E402  (the test's own cases and models)

    from mudsc_graph import analyze

    print("| model | family | hand count | mudsc | share | warnings | analysis s |")
    print("|---|---|---|---|---|---|---|")
    for case in FRESH:
        model, x = _model(case), case.inputs(2)
        hand = sum(s.size for s in case.spaces())
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                units = analyze(model, x).permutable_units
            except Exception as exc:  # an older checkout may fail where this one does not
                units = f"error: {type(exc).__name__}"
        seconds = time.perf_counter() - t0
        n_warn = sum(1 for w in caught if issubclass(w.category, UserWarning))
        share = f"{100 * units / hand:.0f} %" if isinstance(units, int) else ""
        print(f"| {case.name} | {case.family} | {hand} | {units} | {share} | {n_warn} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
