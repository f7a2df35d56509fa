"""Docs stay true: every hook is documented with its exact signature and has a test; code blocks run."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from mudsc_graph.plugin import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name, fn in vars(hookspecs).items() if name.startswith("mudsc_") and callable(fn)]


def _signature(fn) -> str:
    sig = inspect.signature(fn)
    return f"def {fn.__name__}{sig}".replace("'", "")


def test_there_are_hooks():
    assert {"mudsc_layer_handlers", "mudsc_architectures"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_in_the_reference_with_its_exact_signature(name):
    text = (ROOT / "docs" / "plugins.md").read_text()
    assert f"### `{name}`" in text
    assert _signature(getattr(hookspecs, name)) in text


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_test_that_implements_it(name):
    """A test named after the hook, whose body implements the hook (a function of that name, or an
    attribute of a plugin object) and builds a registry from it."""
    import ast

    found = []
    for path in (ROOT / "tests").glob("test_*.py"):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name == f"test_hook_{name}":
                found.append((ast.get_source_segment(source, node) or "", source))
    assert found, f"add a test named test_hook_{name}"
    body, module = found[0]
    implemented = re.search(rf"def {name}\(|{name}=hookimpl", module)  # in the test or a plugin class of its module
    assert implemented, f"test_hook_{name}'s module must implement the hook {name} in a plugin"
    assert "registry_with(" in body or "make_plugin_manager(" in body, f"test_hook_{name} must build a registry with the plugin"


@pytest.mark.parametrize("page", ["plugins.md", "concepts.md", "merging.md"])
def test_python_blocks_in_docs_run(page):
    text = (ROOT / "docs" / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    runnable = [b for b in blocks if not b.lstrip().startswith("def ") and "spec = mudsc_graph" not in b]
    namespace: dict = {}
    for block in runnable:
        exec(compile(block, f"{page}", "exec"), namespace)
