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


def test_the_cost_floor_counts_forward_and_statistics_work() -> None:
    """With ``floor`` the child reports the forward FLOPs, the statistics' FLOPs (for two models
    align needs one O^2 cross block and the variances, zip the upper half of (2 O)^2: about half)
    and the time of one assignment per group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    out = {}
    for method in ("mudsc-zip", "mudsc-align"):
        cfg = {"arch": "resnet20", "width": 1, "n_models": 2, "samples": 16, "method": method, "threads": 1, "floor": True,
               "reset_bn": False, "max_iter": 2}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.reproduce.scale", "--one", json.dumps(cfg)], capture_output=True,
                              text=True, env=env, timeout=120, cwd=str(ROOT))
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    zip_, align = out["mudsc-zip"], out["mudsc-align"]
    assert zip_["forward_gflop"] == align["forward_gflop"] > 0
    assert zip_["gemm_gflops"] > 0 and zip_["assign_s"] > 0
    assert 0.4 < align["stats_gflop"] / zip_["stats_gflop"] < 0.55


def test_fitted_exponents_recover_a_power_law() -> None:
    from benchmarks.reproduce.scale import exponents

    rows = [{"experiment": "width", "method": "zipit", "width": w, "n_models": 2, "samples": 100, "total_s": 3.0 * w**2,
             "floor_s": 2.0 * w**1.5, "forward_s": w**2.0, "peak_mb": 100.0 * w} for w in (1, 2, 4, 8)]
    (e,) = exponents(rows)
    assert abs(e["time"] - 2) < 1e-9 and abs(e["floor"] - 1.5) < 1e-9 and abs(e["memory"] - 1) < 1e-9 and e["points"] == 4
    vit = [{**r, "experiment": "vit", "width": f"B/16 ({d})", "total_s": d**3.0} for r, d in zip(rows, (192, 384, 768, 1536))]
    assert abs(exponents(vit)[0]["time"] - 3) < 1e-9


def test_targets_are_judged_on_ratio_and_memory() -> None:
    from benchmarks.targets import row, to_markdown

    res = {"forward_s": 10.0, "total_s": 25.0, "sweeps": 3, "peak_mb": 2000.0, "timings": {"statistics": 12.0},
           "stats_gflop": 100.0, "gemm_gflops": 50.0, "assign_s": 1.0, "weight_gflop": 25.0}
    met = row("vit", "zipit", res, 2.5, 3072.0)
    assert met["met"] and abs(met["ratio"] - 2.5) < 1e-12 and abs(met["floor_ratio"] - 1.3) < 1e-12
    assert abs(met["sweeps_floor_ratio"] - 1.35) < 1e-12  # + 25 GFLOP of weight similarities at 50 GFLOP/s
    assert not row("vit", "zipit", res, 2.0, 3072.0)["met"]  # too slow
    assert not row("vit", "zipit", {**res, "peak_mb": 4000.0}, 2.5, 3072.0)["met"]  # too much memory
    md = to_markdown([met, row("vit", "zipit", res, 2.0, None)], "# t")
    assert "| yes |" in md and "| **no** |" in md and "1.30x" in md and "1.35x" in md
