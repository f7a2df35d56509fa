"""A tiny run of benchmarks.reproduce.figures: both figures are written as valid PNGs."""

import importlib
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load():
    return importlib.import_module("benchmarks.reproduce.figures")


def test_tiny_figures(tmp_path):
    figures = _load()
    res = figures.run(
        tmp_path / "out", dataset="digits", hidden=(32, 32, 16), epochs=2, grid=3, calib_samples=200,
        test_samples=200, cache=tmp_path / "cache", verbose=False,
    )
    for key, name in (("scatter", "dual_space_scatter.png"), ("landscape", "loss_landscape.png")):
        path = Path(res[key])
        assert path == tmp_path / "out" / name
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC
    assert set(res["high_both"]) == {"MuDSC-zip", "ZipIt", "weight zip"}
    for per_layer in res["high_both"].values():
        assert per_layer and all(math.isnan(f) or 0.0 <= f <= 1.0 for f in per_layer.values())
    for label, pts in res["points"].items():
        assert set(pts) == {"A", "B", label}
        assert all(math.isfinite(p["loss"]) and 0.0 <= p["acc"] <= 1.0 for p in pts.values())
    assert res["grid"] == 3


def test_chosen_pairs_counts_cross_and_within():
    figures = _load()
    from mudsc_graph.merging.matching import Matching

    # 3 units per model; merged units: {A0, B1}, {A1, A2}, {B0}, {B2}
    merge = torch.zeros(4, 6)
    merge[0, [0, 4]] = 0.5
    merge[1, [1, 2]] = 0.5
    merge[2, 3] = 1.0
    merge[3, 5] = 1.0
    m = Matching(merge, (merge > 0).float().T, 0.0, 2)
    pairs, cross, merged_units = figures.chosen_pairs(m)
    assert pairs == [(0, 4), (1, 2)] and cross == 1 and merged_units == 4
