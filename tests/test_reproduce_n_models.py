"""A tiny run of benchmarks.reproduce.n_models: three models on three disjoint tasks."""

from __future__ import annotations

import csv
import importlib
import json

import torch


def test_three_models_on_three_tasks(tmp_path):
    nm = importlib.import_module("benchmarks.reproduce.n_models")
    acc = importlib.import_module("benchmarks.reproduce.accuracy")
    torch.set_num_threads(1)
    arch = acc.setting("mlp-tiny", "mlp", epochs=2, train_limit=200, hidden=(32, 32), bias=False)
    res = nm.run(arch=arch, counts=[3], splits=1, data_setting=acc.DataSetting(calib_samples=60, test_limit=200),
                 out=tmp_path, methods=["average", "zipit", "mudsc-zip"], cache_dir=tmp_path / "cache", log=lambda s: None)
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["model A", "model B", "model C", "ensemble", "average", "average+repair",
                                           "zipit", "zipit+repair", "mudsc-zip", "mudsc-zip+repair"]
    tasks = json.loads(rows[0]["tasks"])
    assert len(tasks) == 3 and sorted(c for t in tasks for c in t) == list(range(10))
    for r in rows:
        per_task = json.loads(r["per_task"])
        assert len(per_task) == 3 and all(0.0 <= v <= 1.0 for v in per_task)
        assert abs(sum(per_task) / 3 - r["mean_per_task"]) < 1e-3
    # each base model knows only its task: it is well above chance there and near chance elsewhere
    for i, r in enumerate(rows[:3]):
        own = json.loads(r["per_task"])[i]
        assert own > 0.5, r
    with open(tmp_path / "n_models.csv", newline="") as f:
        assert next(csv.reader(f)) == nm.COLUMNS
    md = (tmp_path / "n_models.md").read_text()
    assert "### 3 models, 3 disjoint tasks" in md and "| zipit+repair |" in md and "base models (mean of 3)" in md
