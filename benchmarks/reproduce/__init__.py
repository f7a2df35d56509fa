"""The reproduction of the paper's experiments: ``python -m benchmarks.reproduce.run_all [--quick]``.

Parts (each also runs alone): :mod:`.figures` (dual-space scatter, loss-landscape plane),
:mod:`.scale` (time and peak memory of merging), :mod:`.accuracy` (every method on disjoint
5 + 5 class splits); :mod:`.common` holds their configs, data splits and cached model pairs.
"""
