"""A tiny run of benchmarks.reproduce.partial: rows, FLOPs ratios and the files."""

from __future__ import annotations

import csv
import importlib

import pytest
import torch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    part = importlib.import_module("benchmarks.reproduce.partial")
    acc = importlib.import_module("benchmarks.reproduce.accuracy")
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("partial")
    arch = acc.setting("mlp-tiny", "mlp", epochs=1, train_limit=300, hidden=(32, 32, 16), bias=False)
    res = part.run(datasets=["digits"], archs=[arch], splits=1, data_setting=acc.DataSetting(calib_samples=100, test_limit=200),
                   out=out, cache_dir=tmp_path_factory.mktemp("cache"), log=lambda s: None,
                   stops={"mlp-tiny": ("layers.0", "layers.1", None)})
    return part, out, res


def test_rows_and_flops(tiny):
    part, out, res = tiny
    rows = res["rows"]
    assert [r["method"] for r in rows[:3]] == ["model A", "model B", "ensemble"]
    ratios = {(r["method"], r["stop_at"], r["width"]): r["flops_ratio"] for r in rows}
    assert ratios[("ensemble", "(whole model)", 2.0)] == 2.0
    for m in part.METHODS:
        whole, first, second = (ratios[(m, stop, 1.0)] for stop in ("(whole model)", "layers.0", "layers.1"))
        assert whole == pytest.approx(1.0, abs=0.01)  # the merged model is one model
        assert 2.0 > first > second > whole  # the later the stop, the less is run twice
        wide = [ratios[(m, "(whole model)", w)] for w in part.WIDTHS]
        assert whole < wide[0] < wide[1] < wide[2]  # the wider, the costlier
    for m in part.FULL_ONLY:
        assert ratios[(m, "(whole model)", 1.0)] == pytest.approx(1.0, abs=0.01)
    for r in rows:
        assert 0.0 <= r["joint"] <= 1.0 and 0.0 <= r["mean_per_task"] <= 1.0


def test_files(tiny):
    part, out, _ = tiny
    assert (out / "partial.png").stat().st_size > 1000
    with open(out / "partial.csv", newline="") as f:
        assert next(csv.reader(f)) == part.COLUMNS
    md = (out / "partial.md").read_text()
    assert "### digits / mlp-tiny" in md and "| zipit | merged up to layers.0 |" in md and "| mudsc-zip | whole model |" in md
    assert "| mudsc-zip+refit | merged up to layers.0 |" in md and "| mudsc-zip | width 1.5 |" in md
    assert "Frontier: at " in md and "of the ensemble's" in md
