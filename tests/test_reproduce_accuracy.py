"""A tiny run of benchmarks.reproduce.accuracy: files, columns and the validation choice of alpha."""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import pytest
import torch

from mudsc_experiments.tasks import split_classes


@pytest.fixture(scope="module")
def acc():
    return importlib.import_module("benchmarks.reproduce.accuracy")  # importable by name: worker processes need it


@pytest.fixture(scope="module")
def tiny_run(acc, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("results")
    cache = tmp_path_factory.mktemp("cache")
    arch = acc.setting("mlp-tiny", "mlp", epochs=2, train_limit=300, hidden=(32, 32), bias=False)
    data = acc.DataSetting(calib_samples=100, test_limit=200)
    res = acc.run(datasets=["digits"], archs=[arch], splits=1, data_setting=data, methods=["zipit", "mudsc-zip"],
                  alphas=(0.2, 0.8), out=out, cache_dir=cache, log=lambda s: None, mode="test")
    return out, res


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_files_and_columns(acc, tiny_run):
    out, _ = tiny_run
    for name in ("accuracy.csv", "accuracy_summary.csv", "alpha_sweep.csv", "accuracy.md"):
        assert (out / name).is_file(), name
    with open(out / "accuracy.csv", newline="") as f:
        assert next(csv.reader(f)) == acc.CSV_COLUMNS
    with open(out / "accuracy_summary.csv", newline="") as f:
        assert next(csv.reader(f)) == acc.SUMMARY_COLUMNS
    with open(out / "alpha_sweep.csv", newline="") as f:
        assert next(csv.reader(f)) == acc.SWEEP_COLUMNS
    rows = _read(out / "accuracy.csv")
    assert [r["method"] for r in rows] == ["model A", "model B", "ensemble", "zipit", "zipit+repair", "zipit+refit", "mudsc-zip",
                                           "mudsc-zip", "mudsc-zip+repair", "mudsc-zip+refit"]
    assert [r["alpha"] for r in rows if r["method"] == "mudsc-zip"] == ["0.2", "0.8"]
    for r in rows:
        for k in ("joint", "task_a", "task_b", "mean_per_task"):
            assert 0.0 <= float(r[k]) <= 1.0
        assert json.loads(r["tasks"]) == split_classes(10, 2, seed=0)
    summary = _read(out / "accuracy_summary.csv")
    assert [s["method"] for s in summary] == ["model A", "model B", "ensemble", "zipit", "zipit+repair", "zipit+refit", "mudsc-zip",
                                              "mudsc-zip+repair", "mudsc-zip+refit"]
    sweep = _read(out / "alpha_sweep.csv")
    assert [(w["method"], w["alpha"]) for w in sweep] == [("mudsc-zip", "0.2"), ("mudsc-zip", "0.8")]
    md = (out / "accuracy.md").read_text()
    assert "### digits / mlp-tiny" in md and "| mudsc-zip |" in md and "α=0.2" in md and "| mudsc-zip+repair |" in md


@pytest.mark.parametrize("suffix", ["+repair", "+refit"])
def test_variant_rows_vary_the_chosen_merge(tiny_run, suffix):
    """Each method's +repair / +refit row is the merge at that method's chosen alpha, with REPAIR or
    the refit: chosen, out of the alpha sweep."""
    out, _ = tiny_run
    rows = _read(out / "accuracy.csv")
    chosen = next(r for r in rows if r["method"] == "mudsc-zip" and r["chosen"] == "1")
    varied = next(r for r in rows if r["method"] == "mudsc-zip" + suffix)
    assert varied["alpha"] == chosen["alpha"] and varied["chosen"] == "1" and varied["val_joint"] == ""
    zipit = next(r for r in rows if r["method"] == "zipit" + suffix)
    assert zipit["alpha"] == "" and 0.0 <= float(zipit["joint"]) <= 1.0
    assert all(not w["method"].endswith(suffix) for w in _read(out / "alpha_sweep.csv"))


def test_alpha_is_validation_best(tiny_run):
    out, _ = tiny_run
    rows = [r for r in _read(out / "accuracy.csv") if r["method"] == "mudsc-zip"]
    best = max(rows, key=lambda r: (float(r["val_mean_per_task"]), float(r["val_joint"]), -float(r["alpha"])))
    assert [r["chosen"] for r in rows] == ["1" if r is best else "0" for r in rows]
    summary = {s["method"]: s for s in _read(out / "accuracy_summary.csv")}
    assert summary["mudsc-zip"]["alphas"] == f"{float(best['alpha']):.1f}"
    assert float(summary["mudsc-zip"]["joint_mean"]) == pytest.approx(float(best["joint"]), abs=1e-5)


def test_choose_alpha_ties(acc):
    rows = [
        {"alpha": 0.3, "val_mean_per_task": 0.8, "val_joint": 0.5},
        {"alpha": 0.5, "val_mean_per_task": 0.8, "val_joint": 0.6},
        {"alpha": 0.7, "val_mean_per_task": 0.8, "val_joint": 0.6},
        {"alpha": 0.9, "val_mean_per_task": 0.7, "val_joint": 0.9},
    ]
    assert acc.choose_alpha(rows) == 0.5  # best per-task mean, tie -> better joint, tie -> smaller alpha


def test_deterministic(acc, tiny_run, tmp_path):
    out, res = tiny_run
    arch = acc.setting("mlp-tiny", "mlp", epochs=2, train_limit=300, hidden=(32, 32), bias=False)
    again = acc.run_pair("digits", arch, 0, acc.DataSetting(calib_samples=100, test_limit=200), ["mudsc-zip"], (0.2,),
                         cache_dir=tmp_path, log=lambda s: None, variants=())[0]
    first = {(r["method"], r["alpha"]): r for r in res["rows"]}
    for r in again:
        assert r["joint"] == first[(r["method"], r["alpha"])]["joint"]


def test_worker_processes_give_the_sequential_rows_in_grid_order(acc, tmp_path):
    arch = acc.setting("mlp-tiny", "mlp", epochs=1, train_limit=200, hidden=(16,), bias=False)
    data = acc.DataSetting(calib_samples=50, test_limit=100)
    kw = dict(datasets=["digits"], archs=[arch], splits=2, data_setting=data, methods=["average", "mudsc-zip"],
              alphas=(0.3,), cache_dir=tmp_path / "cache", log=lambda s: None)
    seq = acc.run(out=tmp_path / "seq", jobs=1, threads=1, **kw)
    par = acc.run(out=tmp_path / "par", jobs=2, threads=2, **kw)
    key = lambda r: (r["split"], r["method"], r["alpha"], r["joint"], r["mean_per_task"])  # noqa: E731
    assert [key(r) for r in par["rows"]] == [key(r) for r in seq["rows"]]
    assert [r["split"] for r in par["rows"]] == sorted(r["split"] for r in par["rows"])
