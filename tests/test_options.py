"""MergeOptions: one record for merge(), PreparedMerge and the CLI, with one set of defaults."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import mudsc_graph
from mudsc_graph import MergeError, MergeOptions, merge, prepare
from mudsc_graph.merging.options import DEFAULTS, PREPARATION


def _pair():
    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()

    return [make(0), make(1)]


def _batches(n=2, rows=6):
    return [torch.randn(rows, 4, generator=torch.Generator().manual_seed(k)) for k in range(n)]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_options_record_and_keywords_give_the_same_merge():
    opts = MergeOptions(method="mudsc", mode="align", alpha=0.3, max_iter=3, patience=2)
    by_record = merge(_pair(), data=_batches(), options=opts)
    by_keywords = merge(_pair(), data=_batches(), mode="align", alpha=0.3, max_iter=3, patience=2)
    over_record = merge(_pair(), data=_batches(), options=MergeOptions(mode="zip"), mode="align", alpha=0.3, max_iter=3, patience=2)
    assert _same_weights(by_record.model, by_keywords.model) and _same_weights(by_record.model, over_record.model)
    assert by_record.mode == "align" and by_record.alpha == 0.3


def test_tol_is_the_deprecated_name_of_patience():
    with pytest.warns(DeprecationWarning, match="patience"):
        assert MergeOptions.of(tol=3).patience == 3


@pytest.mark.parametrize("changes, needle", [
    (dict(methd="zipit"), "unknown merge option 'methd'"),
    (dict(patience=0), "patience must be an integer >= 1"),
    (dict(matcher_options={"a": float("nan")}), r"a must be a finite number >= 0, got nan"),
    (dict(matcher_options={"c": 1}), r"matcher 'zip' has no parameter 'c' \(its parameters: a, b\)"),
    (dict(mode="align", matcher_options={"a": 0.3}), r"matcher 'align' has no parameter 'a' \(its parameters: none\)"),
    (dict(matcher_options=[("a", 1)]), "matcher_options must be a dict"),
    (dict(probe="middle"), "probe must be one of last, first, all"),
    (dict(tracer="jit"), "tracer must be one of auto, fx, export"),
    (dict(reset_bn="yes"), "reset_bn must be True or False"),
])
def test_bad_options_are_one_merge_error(changes, needle):
    with pytest.raises(MergeError, match=needle):
        merge(_pair(), data=_batches(), **changes)


def test_matcher_parameters_are_declared_checked_and_recorded():
    """zip's a and b are its declared parameters: given as matcher_options (text from the command line
    is read by type), defaults filled in and recorded; zip_a/zip_b still work, with a deprecation."""
    base = merge(_pair(), data=_batches(), method="zipit")
    assert base.matcher_options == {"a": 0.5, "b": 1.0}
    tuned = merge(_pair(), data=_batches(), method="zipit", matcher_options={"a": "0.9"})
    assert tuned.matcher_options == {"a": 0.9, "b": 1.0}
    with pytest.warns(DeprecationWarning, match="zip_a/zip_b are now matcher_options"):
        old = merge(_pair(), data=_batches(), method="zipit", zip_a=0.9)
    assert _same_weights(old.model, tuned.model) and old.matcher_options == tuned.matcher_options
    assert merge(_pair(), data=_batches(), method="zipit", matcher_options={"a": 0.5, "b": 1}).matcher_options == base.matcher_options


def test_a_prepared_merge_keeps_its_preparation():
    prepared = prepare(_pair(), data=_batches(), method="zipit")
    assert prepared.merge().method == "zipit"  # the prepared options are every merge's default
    assert prepared.merge(method="average").method == "average"
    with pytest.raises(MergeError, match="reset_bn cannot change after prepare"):
        prepared.merge(reset_bn=False)
    with pytest.raises(MergeError, match="device cannot change after prepare"):
        prepared.merge(options=MergeOptions(device="cpu"))


def test_the_defaults_are_defined_once():
    """merge() has no defaults of its own for the options, and the CLI reads MergeOptions'."""
    params = inspect.signature(mudsc_graph.merge).parameters
    assert not set(params) & {f for f in MergeOptions.__dataclass_fields__}
    assert set(PREPARATION) <= set(MergeOptions.__dataclass_fields__)
    from mudsc_cli.merge_cmd import merge_command

    cli = inspect.signature(merge_command).parameters
    for name in ("method", "mode", "alpha", "max_iter", "patience", "seed", "reset_bn", "tracer"):
        assert cli[name].default == getattr(DEFAULTS, name), name


def test_a_device_given_by_name_or_object_is_the_same_preparation():
    prepared = prepare(_pair(), data=_batches(), device="cpu")
    assert prepared.merge(options=MergeOptions(device=torch.device("cpu"), method="average")).method == "average"
