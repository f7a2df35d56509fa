"""The library under careless or hostile calls: every mistake is a MudscError with one clear line.

Each case once raised something else (a RuntimeError from torch, a TypeError, a ValueError from
BatchNorm) or, worse, returned a result computed from NaN.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mudsc_graph import MudscError, merge, prepare


def _pair():
    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()

    return [make(0), make(1)]


def _batches(n=2, rows=6):
    return [torch.randn(rows, 4, generator=torch.Generator().manual_seed(k)) for k in range(n)]


CASES = {
    "mixed batch shapes": (dict(data=[torch.randn(4, 4), torch.randn(4, 5)]), "calibration batch 1"),
    "mixed batch shapes, no BN reset": (dict(data=[torch.randn(4, 4), torch.randn(4, 5)], reset_bn=False), "calibration batch"),
    "an unknown device": (dict(device="gpu"), "device 'gpu'"),
    "an integer stop_at": (dict(stop_at=3), "stop_at must be"),
    "an empty stop_at": (dict(stop_at=""), "stop_at must be"),
    "alpha None": (dict(alpha=None), "alpha must be a number"),
    "alpha NaN": (dict(alpha=float("nan")), "alpha must be a number"),
    "alpha out of range": (dict(alpha=1.5), "alpha must lie in"),
    "a BatchNorm batch of one": (dict(data=[torch.randn(1, 4)]), "at least 2 samples"),
    "NaN calibration data": (dict(data=[torch.full((4, 4), float("nan"))], method="average"), "NaN or inf"),
    "inf calibration data": (dict(data=[torch.randn(4, 4), torch.full((4, 4), float("inf"))], method="weight_matching"), "batch 1 has NaN or inf"),
    "negative max_iter": (dict(max_iter=-1), "max_iter must be"),
    "a float patience": (dict(patience=2.5), "patience must be"),
    "a huge seed": (dict(seed=10**23), "seed must be below"),
    "data that is not iterable": (dict(data=5), "iterable of batches"),
    "a tensor as data": (dict(data=torch.randn(4, 4)), "iterable of batches"),
    "a method that is not a name": (dict(method=3), "unknown method"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_merge_refuses_with_one_clear_line(case):
    options, needle = CASES[case]
    options = {"data": _batches(), **options}
    with pytest.raises(MudscError) as err:
        merge(_pair(), **options)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_models_must_be_a_list_of_modules():
    with pytest.raises(MudscError, match="model 0 is a str"):
        merge(["a", "b"], data=_batches())
    with pytest.raises(MudscError, match="as a list"):
        merge(_pair()[0], data=_batches())


def test_a_prepared_merge_checks_each_merge_call_too():
    prepared = prepare(_pair(), data=_batches())
    with pytest.raises(MudscError, match="stop_at must be"):
        prepared.merge(stop_at="")
    with pytest.raises(MudscError, match="alpha must be a number"):
        prepared.merge(alpha="0.5")
    assert prepared.merge(method="mudsc", mode="align", max_iter=1).model(torch.randn(3, 4)).isfinite().all()


def test_a_merged_model_with_non_finite_statistics_is_refused():
    """Finite data so large that BatchNorm's running variance overflows: no model comes back."""
    data = [torch.full((6, 4), 1e30) * torch.randn(6, 4, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    with pytest.raises(MudscError, match="non-finite values in"):
        merge(_pair(), data=data, method="weight_matching")


def test_a_batch_whose_features_do_not_fit_the_spec_is_one_line_naming_it():
    """Convolutions run on a smaller image; the flattened features after them have fewer positions
    than the spec's group says: the statistics name the batch (once a traceback from group_features,
    and the batch index was lost after the first group)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8 * 8 * 8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))

    torch.manual_seed(0)
    data = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 6, 6)]
    with pytest.raises(MudscError) as err:
        merge([Net().eval(), Net().eval()], data=data, method="zipit", reset_bn=False)
    msg = str(err.value)
    assert "calibration batch 2 (input 0 (4, 3, 6, 6)" in msg and "group" in msg and "\n" not in msg
