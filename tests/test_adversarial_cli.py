"""The command line under careless or hostile arguments: the documented exit code, two short lines
on stderr, no traceback, nothing written.

Exit codes: 2 for a command line that cannot be parsed or is incomplete (the usual convention), 1 for
everything mudsc itself refuses (a MudscError).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mudsc_cli.app import app


def _runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def _failure(args: list[str], code: int, *needles: str) -> str:
    result = _runner().invoke(app, args)
    text = result.stdout + result.stderr
    assert result.exit_code == code, (result.exit_code, text)
    assert "Traceback" not in text and "╭" not in text, text  # no traceback, no boxed panel
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) <= 2 and lines[0].startswith("error: "), lines
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


USAGE = {
    "a value of the wrong type": (["merge", "a.pt", "b.pt", "--arch", "mlp", "--samples", "1.5", "--out", "m.pt"], "--samples"),
    "an unknown option": (["merge", "--bogus"], "--bogus"),
    "no checkpoints": (["merge", "--arch", "mlp", "--out", "m.pt"], "checkpoints"),
    # 28: one checkpoint is as incomplete as none
    "one checkpoint": (["merge", "a.pt", "--arch", "mlp", "--out", "m.pt"], "at least two"),
    # 18: a seed no generator takes
    "a seed that overflows": (["merge", "a.pt", "b.pt", "--arch", "mlp", "--seed", "100000000000000000000000", "--out", "m.pt"], "--seed"),
    "a negative batch size": (["eval", "a.pt", "--arch", "mlp", "--data", "digits", "--batch-size", "-3"], "--batch-size"),
    "an unknown command": (["nosuchcommand"], "nosuchcommand"),
    "an inspect option of the wrong type": (["inspect", "--arch", "mlp", "--list", "--json", "--check", "--strict", "--input-shape"], "--input-shape"),
}


@pytest.mark.parametrize("case", list(USAGE), ids=list(USAGE))
def test_usage_errors_exit_2_with_one_line(case):
    args, needle = USAGE[case]
    line = _failure(args, 2, needle)
    assert "--help" not in line  # the hint is the second line


REFUSED = {
    # 15: the factory raises on a bad option value
    "a factory that rejects an option": (["inspect", "--arch", "mlp", "-o", "hidden=(-1,)"], "rejected the options hidden=(-1,)"),
    # 16: callables that do not build a module
    "a callable that returns a str": (["inspect", "--arch", "os:getcwd"], "not a torch.nn.Module"),
    "a callable that needs arguments": (["inspect", "--arch", "json:loads"], "building architecture 'loads' failed"),
    # 17: an example input too large to allocate
    "a huge input shape": (["inspect", "--arch", "torch.nn:Identity", "--input-shape", "100000,100000"], "values per input"),
    "an unknown tracer": (["inspect", "--arch", "mlp", "--tracer", "magic"], "--tracer 'magic'"),
    "an unknown timm model": (["inspect", "--arch", "timm:resnet17"], "timm has no model 'resnet17'"),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_refused_arguments_exit_1_with_one_line(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, needle = REFUSED[case]
    if "timm:" in " ".join(args):
        pytest.importorskip("timm")
    _failure(args, 1, needle)
    assert list(tmp_path.iterdir()) == []
