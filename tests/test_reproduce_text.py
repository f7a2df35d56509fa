"""A tiny run of benchmarks.reproduce.text: the library's rows, the command line's merge of two saved
Hugging Face directories, and the files."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json

import pytest
import torch

from tests.text_corpora import require_text_corpora

require_text_corpora()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    part = importlib.import_module("benchmarks.reproduce.text")
    from mudsc_experiments.text import TextConfig

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("text")
    config = TextConfig(hidden=16, layers=1, heads=2, intermediate=32, max_length=24, train_samples=200, test_samples=80,
                        calib_samples=48, epochs=1, batch_size=16)
    res = part.run(config=config, out=out, cache_dir=tmp_path_factory.mktemp("cache"), methods=["zipit", "mudsc-zip"],
                   cli_variants=[("+repair", ["--repair"])], log=lambda s: None)
    return part, out, res


def test_cli_rows_merge_the_saved_directories(tiny):
    part, _, res = tiny
    cli = [r for r in res["rows"] if r.name.endswith(part.CLI_SUFFIX)]
    assert [r.name for r in cli] == [f"mudsc-zip+repair{part.CLI_SUFFIX}"]
    for r in cli:
        assert r.setting == "one task" and r.kind == "merged" and 0 <= r.joint <= 1 and r.per_task == [r.joint]
        assert r.merge_seconds > 0
    # the CLI's accuracy of A and C was checked against the library's inside cli_rows (it raises otherwise)


def test_files(tiny):
    part, out, res = tiny
    with open(out / "text.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == part.COLUMNS and len(rows) == len(res["rows"])
    two = [r["method"] for r in rows if r["setting"] == "two tasks"]
    assert two[:3] == ["model A (sentiment)", "model B (party)", "ensemble"] and "mudsc-zip+task repair" in two
    assert all(len(json.loads(r["per_task"])) == 2 for r in rows if r["setting"] == "two tasks" and r["kind"] != "base")
    md = (out / "text.md").read_text()
    assert "### Two tasks" in md and "### One task" in md and "| zipit+task repair |" in md and part.CLI_SUFFIX in md
    run = json.loads((out / "text_run.json").read_text())
    assert run["samples"]["test sentiment"] == 80 and run["config"]["hidden"] == 16


def test_a_failing_command_is_reported(tiny, tmp_path):
    part, _, _ = tiny
    with pytest.raises(RuntimeError, match="failed"):
        part._cli(["eval", str(tmp_path / "missing"), "--data", str(tmp_path / "none.txt")], log=lambda s: None)
