"""One-off investigations behind statements of docs/findings.md; not part of the reproduction (``run_all``).

* :mod:`.align_vs_average`: why align (permutation) merges trail plain averaging on the demo's
  disjoint tasks (``python -m benchmarks.investigations.align_vs_average [--quick]``).
* :mod:`.fresh_set`: mudsc's permutable units against the verified hand counts of the fresh set of
  architectures written by others (``python -m benchmarks.investigations.fresh_set``).
"""
