"""A tiny run of benchmarks.reproduce.hetero: two MLPs of different widths on disjoint digit tasks."""

from __future__ import annotations

import importlib

import pytest
import torch


def test_rows_widths_and_files(tmp_path):
    het = importlib.import_module("benchmarks.reproduce.hetero")
    acc = importlib.import_module("benchmarks.reproduce.accuracy")
    torch.set_num_threads(1)
    data = acc.DataSetting(calib_samples=100, test_limit=200)
    table = {"mlp-a": acc.setting("mlp-a", "mlp", epochs=1, train_limit=300, hidden=(32, 16), bias=False, data=data),
             "mlp-b": acc.setting("mlp-b", "mlp", epochs=1, train_limit=300, hidden=(64, 32), bias=False, data=data)}
    res = het.run(pairs=[("mlp-a", "mlp-b")], splits=1, out=tmp_path, cache_dir=tmp_path / "cache", log=lambda s: None,
                  table=table, dataset="digits")
    ratio = {r["method"]: r["flops_ratio"] for r in res["rows"]}
    assert ratio["zipit"] == pytest.approx(1.0, abs=0.01) and ratio["mudsc-zip+refit"] == pytest.approx(1.0, abs=0.01)  # model A's width
    assert ratio["weight_matching"] == pytest.approx(ratio["model B (mlp-b)"], rel=0.01)  # align: the wider model's
    assert ratio["ensemble"] == pytest.approx(1.0 + ratio["model B (mlp-b)"], rel=0.01)
    assert all(0.0 <= r["joint"] <= 1.0 for r in res["rows"])
    md = (tmp_path / "hetero.md").read_text()
    assert "### digits / mlp-a + mlp-b" in md and "| mudsc-zip+refit |" in md
