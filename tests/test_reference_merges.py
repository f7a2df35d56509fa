"""The merged weights of every built-in method on every zoo family are bit-identical to the ones
recorded before the layout redesign (tests/reference/merges.json, written by make_reference.py):
to one of its runs, one per kind of machine (the bits depend on the CPU's instruction set)."""

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
    runs = json.loads((HERE / "merges.json").read_text())["runs"]
    got = _maker().merge_all()
    for run in runs:
        assert sorted(got) == sorted(run["digests"]), "the merged models' tensor names changed"
    differ = min(([k for k in got if got[k] != run["digests"][k]] for run in runs), key=len)
    merges = sorted({k.rsplit("/", 1)[0] for k in differ})
    assert not differ, (f"{len(differ)} tensors differ from the closest of {len(runs)} recorded runs "
                        f"(this machine: {_maker().machine()}), in {', '.join(merges)}; first: {differ[:3]}")
