"""Write digests of the merged weights the layout redesign must reproduce bit for bit (tests/test_reference_merges.py).

Run once, before a change that must not move the merged weights, and commit the file:

    python tests/reference/make_reference.py          # a new file: this machine's run only
    python tests/reference/make_reference.py --add    # add this machine's run to the file

The bits depend on the CPU's instruction set (torch picks AVX2 or AVX-512 kernels whose sums
round differently, and a different BatchNorm statistic can move a matching), so the file holds
one run per kind of machine the suite has passed on, and the test accepts any of them exactly.
Add a run only from code that passes on a machine already recorded.

Every zoo family (MLP, ResNet-20 with BatchNorm and GroupNorm, VGG-11, both ViT layouts) merged
with every built-in method, on one thread, from seeded models and seeded calibration data.
Regenerate only when a change of the merged weights is intended, and say why in its commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "merges.json"

# (zoo name, overrides): small, so the test takes seconds
MODELS = {
    "mlp": {"hidden": (32, 32), "in_features": 48},
    "resnet20": {"width": 0.25},
    "resnet20_gn": {"width": 0.5, "gn_groups": 4},
    "vgg11_bn": {"width": 0.0625},
    "vit_tiny": {"num_layers": 2, "hidden_dim": 32, "mlp_dim": 48, "num_heads": 4},
    "timm_vit_tiny": {"depth": 2, "embed_dim": 32, "num_heads": 4, "init_values": 0.5},
}
# (label, merge keywords)
METHODS = {
    "average": {"method": "average"},
    "weight_matching": {"method": "weight_matching"},
    "weight_zip": {"method": "weight_zip"},
    "activation_matching": {"method": "activation_matching"},
    "zipit": {"method": "zipit"},
    "mudsc_zip": {"method": "mudsc", "mode": "zip"},
    "mudsc_align": {"method": "mudsc", "mode": "align"},
}


def inputs(name: str, n: int, seed: int) -> torch.Tensor:
    shape = (48,) if name == "mlp" else (3, 32, 32)
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def models(name: str) -> list[torch.nn.Module]:
    from mudsc_plugins import zoo

    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = zoo.build(name, **MODELS[name])
        for mod in m.modules():  # non-trivial norm statistics, or the check sees nothing
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)):
                torch.nn.init.uniform_(mod.weight, 0.5, 1.5)
                torch.nn.init.uniform_(mod.bias, -0.5, 0.5)
        with torch.no_grad():
            for p in m.parameters():  # zero tables (class token, positions, LayerScale 1s)
                if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                    p.normal_(0, 0.5)
        out.append(m.eval())
    return out


def digest(t: torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of the tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    t = t.detach().cpu().reshape(-1).contiguous()
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def merge_all() -> dict[str, str]:
    import mudsc_graph

    tensors = {}
    for name in MODELS:
        pair = models(name)
        data = [(inputs(name, 16, 10 + k), torch.zeros(16, dtype=torch.long)) for k in range(2)]
        for label, kw in METHODS.items():
            result = mudsc_graph.merge(pair, data=data, example_inputs=(inputs(name, 2, 0),), max_iter=4, **kw)
            for key, t in result.model.state_dict().items():
                tensors[f"{name}/{label}/{key}"] = digest(t)
    return tensors


def machine() -> str:
    import platform

    return f"{torch.backends.cpu.get_cpu_capability()} {platform.machine()}, torch {torch.__version__}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    runs = json.loads(OUT.read_text())["runs"] if "--add" in sys.argv[1:] else []
    runs.append({"machine": machine(), "digests": merge_all()})
    OUT.write_text(json.dumps({"runs": runs}, indent=0, sort_keys=True) + "\n")
    print(f"{len(runs)} runs, {OUT.stat().st_size / 1e6:.2f} MB -> {OUT}", file=sys.stderr)
