"""Benchmark: merge two independent ResNet-20x8 (CIFAR width 8) with 200 random 32x32 inputs.

Run: python -m benchmarks.bench_merge [--quick] [--device cpu|cuda] [--threads 2] [--width 8] [--samples 200]
Prints the seconds of the calibration forward passes alone (the two models run once over the data,
after a warm-up batch), then for MuDSC-zip, MuDSC-align and ZipIt! the whole merge
(``merge(..., alpha=0.5)``, BatchNorm resets included), its ratio to those forward passes, the
sweeps, the best score and the time of each stage. ``--quick``: ResNet-20x2 with 100 inputs
(seconds instead of minutes; the configuration of the width-2 rows of docs/results/scale.md).
Figures measured with the defaults: docs/merging.md, "Speed".
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.reproduce.common import forward_seconds, sync
from mudsc_graph import get_registry
from mudsc_graph.merging.api import merge


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_merge", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="width 2, 100 samples (unless --width / --samples say otherwise)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=int, default=None, help="ResNet-20 width (default 8; quick: 2)")
    p.add_argument("--samples", type=int, default=None, help="calibration inputs (default 200; quick: 100)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--methods", default="mudsc:zip,mudsc:align,zipit:zip")
    args = p.parse_args()
    width = args.width or (2 if args.quick else 8)
    samples = args.samples or (100 if args.quick else 200)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    arch = get_registry().architecture("resnet20")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(arch.build(width=width).to(dev).eval())
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(args.batch, 3, 32, 32, generator=g).to(dev) for _ in range(samples // args.batch)]

    forward = forward_seconds(models, data, dev)
    print(f"resnet20x{width}, {samples} samples, device {dev}, {args.threads} threads: "
          f"calibration forward passes {forward:.2f} s")
    for spec in args.methods.split(","):
        method, mode = spec.split(":")
        sync(dev)
        t0 = time.perf_counter()
        result = merge(models, data=data, method=method, mode=mode, alpha=0.5, device=dev)
        sync(dev)
        total = time.perf_counter() - t0
        stages = "  ".join(f"{k} {v:.2f}" for k, v in result.timings.items())
        print(f"{method}-{mode:5s}: total {total:6.2f} s  ratio to forward {total / forward:6.1f}x  "
              f"sweeps {result.sweeps:3d}  best score {max(result.history) if result.history else float('nan'):.4f}  [{stages}]")


if __name__ == "__main__":
    main()
