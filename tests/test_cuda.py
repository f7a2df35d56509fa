"""CUDA: a model merged with a permuted copy of itself comes back on the GPU, and CPU and CUDA
merges agree. Skipped without a CUDA device (run on a GPU machine by ``bash benchmarks/gpu_check.sh``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mudsc_graph import analyze, get_registry, merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = [("resnet20", {"width": 1}), ("vit_tiny", {})]
METHODS = [dict(method="mudsc", mode="zip"), dict(method="mudsc", mode="align"), dict(method="zipit")]


def _case(name, opts):
    arch = get_registry().architecture(name)
    torch.manual_seed(0)
    model = arch.build(**opts).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # constant norms and statistics made non-constant, so every tensor is checked
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
    shape = arch.example_inputs(1)[0].shape[1:]
    data = [torch.randn(8, *shape, generator=g) for _ in range(3)]
    spec = analyze(model, data[0][:2])
    return model, spec.apply_permutation(model, spec.random_permutation(7)), data


@pytest.mark.parametrize("name, opts", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("how", METHODS, ids=lambda h: "-".join(h.values()))
def test_a_permuted_copy_merges_back_on_cuda(name, opts, how):
    model, permuted, data = _case(name, opts)
    merged = merge([model, permuted], data=data, device="cuda", reset_bn=False, **how).model
    assert next(merged.parameters()).device.type == "cuda"
    x = data[0].cuda()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model.cuda()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, opts", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("how", METHODS, ids=lambda h: "-".join(h.values()))
def test_cpu_and_cuda_merges_agree(name, opts, how):
    a, _, data = _case(name, opts)
    torch.manual_seed(3)
    b = get_registry().architecture(name).build(**opts).eval()
    cpu = merge([a, b], data=data, device="cpu", max_iter=5, **how).model.state_dict()
    gpu = merge([a, b], data=data, device="cuda", max_iter=5, **how).model.state_dict()
    for k, v in cpu.items():
        torch.testing.assert_close(gpu[k].cpu(), v, rtol=1e-4, atol=1e-4, msg=k)
