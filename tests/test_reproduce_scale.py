"""The speed-and-scale benchmark's one-configuration entry (python -m benchmarks.reproduce.scale --one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("check", "bn_reset_bases", "analysis", "statistics", "matching", "merge", "bn_reset_merged")


def test_one_configuration_reports_stages_and_peak_memory() -> None:
    cfg = {"experiment": "test", "arch": "resnet20", "width": 1, "n_models": 2, "samples": 16,
           "method": "mudsc-zip", "threads": 1, "device": "cpu"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reproduce.scale", "--one", json.dumps(cfg)], capture_output=True,
                          text=True, env=env, timeout=120, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(STAGES) <= set(res["timings"])
    assert all(v >= 0 for v in res["timings"].values())
    assert res["total_s"] >= sum(res["timings"].values()) * 0.99 > 0
    assert res["forward_s"] > 0
    assert res["sweeps"] >= 1
    assert res["peak_mb"] > 0 and res["peak_mb"] >= res["base_mb"] > 0
