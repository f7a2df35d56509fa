"""Benchmark: analysis time (trace + IR + propagation + groups) of large zoo models on CPU.

Run: python -m benchmarks.bench_analysis [ARCH ...]   (default: vit_b16 resnet50)
Target: under 5 s each on 2 CPU cores. Prints one line per model with the time of each pass.
"""

from __future__ import annotations

import argparse
import time

import torch

from mudsc_graph import analyze_full, get_registry


def main(names: list[str]) -> None:
    torch.set_num_threads(2)
    reg = get_registry()
    for name in names:
        arch = reg.architecture(name)
        torch.manual_seed(0)
        model = arch.build().eval()
        inputs = arch.example_inputs(1)
        analyze_full(model, inputs)  # warm-up: imports, first-call overheads
        t0 = time.perf_counter()
        result = analyze_full(model, inputs)
        total = time.perf_counter() - t0
        passes = "  ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
        spec = result.spec
        print(
            f"{name:>14}: analysis {total:.2f} s  ({passes})  nodes {result.graph.number_of_nodes()}  "
            f"groups {len(spec.free_groups())}  permutable units {spec.permutable_units}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_analysis", description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", default=["vit_b16", "resnet50"], metavar="ARCH",
                        help="registered architectures (default: vit_b16 resnet50)")
    main(parser.parse_args().archs)
