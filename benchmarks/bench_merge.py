"""Benchmark: merge two independent ResNet-20x8 (CIFAR width 8) with 200 random 32x32 inputs.

Run: python benchmarks/bench_merge.py [--device cpu|cuda] [--threads 2] [--width 8] [--samples 200]
Prints the time of each stage for MuDSC-zip, MuDSC-align and ZipIt!, and the ratio of the whole
merge to the calibration forward passes alone (the two models run once over the data).
Targets on 2 CPU threads: MuDSC-zip under 30 s, MuDSC-align under 10 s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.reproduce.common import forward_seconds, sync  # noqa: E402
from mudsc_graph import get_registry  # noqa: E402
from mudsc_graph.merging.api import merge  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--methods", default="mudsc:zip,mudsc:align,zipit:zip")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    arch = get_registry().architecture("resnet20")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(arch.build(width=args.width).to(dev).eval())
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(args.batch, 3, 32, 32, generator=g).to(dev) for _ in range(args.samples // args.batch)]

    forward = forward_seconds(models, data, dev)
    print(f"resnet20x{args.width}, {args.samples} samples, device {dev}, {args.threads} threads: "
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
