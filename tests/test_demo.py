"""The built-in demo end to end (tiny sizes), its model cache, the ``mudsc demo`` command and RichReporter."""

from __future__ import annotations

import io
import json
import math
import time

import pytest
import torch
from rich.console import Console

from mudsc_experiments.demo import DEFAULT_METHODS, DEMO_METHODS, DemoError, parse_demo_method, parse_method, run_demo

TINY = dict(dataset="digits", arch="mlp", arch_options={"hidden": (32, 32)}, methods=("average", "zipit"), epochs=5, calib_samples=200)


class Recorder:
    """A reporter that remembers every stage it was asked to show."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.depth = 0

    def start(self, stage, total=None):
        self.stages.append(stage)
        self.depth += 1

    def advance(self, n=1, **info):
        assert self.depth > 0

    def end(self):
        self.depth -= 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="module")
def first(cache):
    rec = Recorder()
    t0 = time.perf_counter()
    result = run_demo(cache_dir=cache, reporter=rec, **TINY)
    return result, rec, time.perf_counter() - t0


def test_demo_rows_and_metrics(first):
    result, rec, _ = first  # how long it takes is a benchmark's business, not a test's
    assert result.trained and rec.depth == 0
    assert [r.name for r in result.rows] == ["model A", "model B", "ensemble", "average", "zipit"]
    assert result.tasks == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    for r in result.rows:
        for v in (r.joint, r.task_a, r.task_b, r.mean_per_task):
            assert 0.0 <= v <= 1.0
        assert r.mean_per_task == pytest.approx((r.task_a + r.task_b) / 2)
        assert (r.merge_seconds is not None) == (r.kind == "merged")
    a, b = result.row("model A"), result.row("model B")
    assert a.task_a > 0.8 and b.task_b > 0.8  # each learnt its own half
    ens = result.row("ensemble")
    assert (ens.task_a, ens.task_b) == (a.task_a, b.task_b)  # each model votes on its own classes
    assert "model A: training" in rec.stages and "model B: training" in rec.stages
    assert "merging" in rec.stages and "zipit: statistics" in rec.stages
    d = json.loads(json.dumps(result.to_dict()))
    assert d["trained"] is True and len(d["rows"]) == 5 and d["samples"]["calibration"] == 200


def test_demo_second_call_loads_the_cache(first, cache):
    result, _, _ = first
    rec = Recorder()
    again = run_demo(cache_dir=cache, reporter=rec, **TINY)
    assert not again.trained
    assert not any("training" in s for s in rec.stages)
    assert again.cache_path == result.cache_path
    assert [r.joint for r in again.rows] == [r.joint for r in result.rows]  # same models, deterministic merges
    assert "load_cache" in again.timings and "train" not in again.timings


def test_demo_cache_is_keyed_by_config_and_survives_a_corrupt_file(first, cache):
    result, _, _ = first
    other = run_demo(cache_dir=cache, **{**TINY, "methods": ("average",), "seed": 1})
    assert other.trained and other.cache_path != result.cache_path
    with open(other.cache_path, "wb") as f:
        f.write(b"not a checkpoint")
    again = run_demo(cache_dir=cache, **{**TINY, "methods": ("average",), "seed": 1})
    assert again.trained  # unreadable cache: retrained and rewritten
    assert torch.load(again.cache_path, weights_only=True)["models"][0].keys()
    assert not list(cache.glob(".*.tmp"))  # atomic writes leave no temp files


def test_parse_method():
    assert parse_method("zipit") == ("zipit", "zip")
    assert parse_method("weight_matching") == ("weight_matching", "align")
    assert parse_method("mudsc-align") == ("mudsc", "align")
    assert parse_method("mudsc") == ("mudsc", "zip")
    assert all(parse_method(m) for m in DEFAULT_METHODS)
    for bad in ("zipit-align", "mudsc-foo", "nope"):
        with pytest.raises(DemoError):
            parse_method(bad)
    assert parse_demo_method("mudsc-zip+refit") == ("mudsc", "zip", {"refit": True})
    assert parse_demo_method("mudsc-zip+refit@1.5") == ("mudsc", "zip", {"refit": True, "width": 1.5})
    assert parse_demo_method("zipit@2") == ("zipit", "zip", {"width": 2.0})
    with pytest.raises(DemoError, match="must be a number"):
        parse_demo_method("zipit@wide")
    assert parse_demo_method("zipit") == ("zipit", "zip", {}) and all(parse_demo_method(m) for m in DEMO_METHODS)
    with pytest.raises(DemoError, match="use \\+refit or \\+repair"):
        parse_demo_method("zipit+magic")


# --------------------------------------------------------------------------- the progress bars


def test_rich_reporter_nested_stages_and_quiet():
    from mudsc_cli.progress import RichReporter

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    rep = RichReporter(console, enabled=True)
    with rep:
        rep.start("merging", total=2)
        rep.start("matching sweeps", total=100)
        rep.advance(1, score=0.5)
        rep.end()  # stopped early: shown as finished
        rep.advance(1, method="zipit")
        rep.end()
    text = buf.getvalue()
    assert "merging" in text and "matching sweeps" in text and "score=0.5" in text
    quiet = io.StringIO()
    rep = RichReporter(Console(file=quiet, force_terminal=True), enabled=False)
    rep.start("x", total=1)
    rep.advance()
    rep.end()
    assert quiet.getvalue() == ""
    not_tty = io.StringIO()
    rep = RichReporter(Console(file=not_tty, force_terminal=False), enabled=True)
    with rep:
        rep.start("x", total=1)
        rep.advance()
    assert not_tty.getvalue() == ""


# --------------------------------------------------------------------------- the command


def _app_with_demo():
    from mudsc_cli.app import app

    names = {c.name for c in app.registered_commands}
    if "demo" not in names:
        pytest.skip("the demo command is not registered in mudsc_cli.app yet")
    return app


def test_demo_command_table_and_json(first, cache):
    from typer.testing import CliRunner

    app = _app_with_demo()
    args = ["demo", "--dataset", "digits", "--arch-opt", "hidden=(32,32)", "--methods", "average,zipit,zipit+refit", "--epochs", "5",
            "--calib-samples", "200", "--cache-dir", str(cache), "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for needle in ("model A", "ensemble", "zipit", "joint", "task 0-4", "loaded from the cache"):
        assert needle in result.stdout
    result = CliRunner().invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["name"] for r in data["rows"]] == ["model A", "model B", "ensemble", "average", "zipit", "zipit+refit"]
    assert all(0 <= r["joint"] <= 1 and not math.isnan(r["joint"]) for r in data["rows"])
    bad = CliRunner().invoke(app, ["demo", "--methods", "nope", "--cache-dir", str(cache), "--quiet"])
    assert bad.exit_code == 1 and "unknown demo method" in bad.output
