"""The merged weights of every built-in method on every zoo family are bit-identical to the ones
recorded before the layout redesign (tests/reference/merges.json, written by make_reference.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "reference"

pytestmark = pytest.mark.usefixtures("one_thread")


def _maker():
    spec = importlib.util.spec_from_file_location("make_reference", HERE / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merged_weights_are_bit_identical_to_the_recorded_ones():
    expected = json.loads((HERE / "merges.json").read_text())
    got = _maker().merge_all()
    assert sorted(got) == sorted(expected), "the merged models' tensor names changed"
    differ = [k for k in expected if got[k] != expected[k]]
    runs = sorted({k.rsplit("/", 1)[0] for k in differ})
    assert not differ, f"{len(differ)} tensors differ, in {', '.join(runs)}; first: {differ[:3]}"
