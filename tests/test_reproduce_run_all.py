"""benchmarks.reproduce.run_all: the paper's orderings are read off the rows split by split."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture(scope="module")
def run_all():
    return importlib.import_module("benchmarks.reproduce.run_all")


def _rows(joint_ours, joint_theirs, ours="mudsc-zip", theirs="zipit", arch="mlp"):
    rows = []
    for k, (a, b) in enumerate(zip(joint_ours, joint_theirs)):
        rows.append({"dataset": "d", "arch": arch, "split": k, "method": ours, "chosen": True, "joint": a, "mean_per_task": a + 0.1})
        rows.append({"dataset": "d", "arch": arch, "split": k, "method": ours, "chosen": False, "joint": 0.0, "mean_per_task": 0.0})
        rows.append({"dataset": "d", "arch": arch, "split": k, "method": theirs, "chosen": True, "joint": b, "mean_per_task": b})
    return rows


def test_verdicts_pair_splits_and_count_wins(run_all):
    rows = _rows([0.70, 0.60, 0.80], [0.65, 0.62, 0.70])
    rows += _rows([0.5, 0.5, 0.5], [0.6, 0.7, 0.8], ours="mudsc-align", theirs="activation_matching")
    vs = {v["ours"]: v for v in run_all.verdicts(rows)}
    zip_ = vs["mudsc-zip"]
    assert zip_["splits"] == 3 and zip_["joint_wins"] == 2 and zip_["joint_losses"] == 1
    assert zip_["joint_delta"] == pytest.approx((0.05 - 0.02 + 0.10) / 3)  # the unchosen alphas are ignored
    assert zip_["mean_per_task_wins"] == 3
    assert run_all._word(zip_, "joint") == "mixed" and run_all._word(zip_, "mean_per_task") == "agrees"
    assert run_all._word(vs["mudsc-align"], "joint") == "disagrees"
    md = run_all.verdict_markdown(run_all.verdicts(rows))
    assert "| d / mlp | mudsc-zip vs zipit | +4.3 ± 6.0 |" in md
    assert "mudsc-align vs activation_matching, joint**: agrees (ahead on every split) in 0 of 1 settings, disagrees (behind on every split) in 1" in md


def test_a_method_missing_from_a_setting_is_left_out(run_all):
    rows = [r for r in _rows([0.7], [0.6]) if r["method"] != "zipit"]
    assert run_all.verdicts(rows) == []


def test_variant_verdicts_count_each_split_against_the_chosen_plain_merge(run_all):
    rows = []
    for k, (plain, repaired) in enumerate([(0.50, 0.60), (0.50, 0.502), (0.50, 0.40)]):
        common = {"dataset": "d", "arch": "mlp", "split": k, "chosen": True}
        rows.append({**common, "method": "zipit", "kind": "merged", "joint": plain, "mean_per_task": 0.7})
        rows.append({**common, "method": "zipit+repair", "kind": "merged", "joint": repaired, "mean_per_task": 0.8})
        rows.append({**common, "method": "ensemble", "kind": "ensemble", "chosen": None, "joint": 0.9, "mean_per_task": 0.95})
    (v,) = run_all.variant_verdicts(rows, "+repair")
    assert (v["method"], v["n"], v["improves"], v["keeps"], v["hurts"]) == ("zipit", 3, 1, 1, 1)
    assert v["mean"] == pytest.approx((0.10 + 0.002 - 0.10) / 3) and v["worst"] == pytest.approx(-0.10)
    assert v["per_task"] == pytest.approx(0.1) and v["gap_closed"] == pytest.approx((0.25 + 0.005 - 0.25) / 3)
    assert "| zipit | +0.1 ± 10.0 | +10.0 | 0 % | -10.0 | 1 | 1 | 1 |" in run_all.variant_markdown([v], "REPAIR")
    assert run_all.variant_verdicts(rows, "+refit") == []


def test_a_run_with_every_part_skipped_says_so(run_all, tmp_path):
    assert run_all.main(["--out", str(tmp_path), "--skip", *run_all.PARTS]) == 0
    md = (tmp_path / "results.md").read_text()
    for part in run_all.PARTS:
        assert f"`--skip {part}`" in md, part
