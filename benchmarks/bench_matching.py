"""Benchmark: time of the align and zip matchers on CPU for N = 2 models of O units.

Run: python -m benchmarks.bench_matching [O ...]   (default: 64 256 512 1024)
Target: zip of O = 512 well under 1 s on one CPU thread. The similarity is the correlation of a
random model's features with a noisy permuted copy's, the typical shape of real data.
"""

from __future__ import annotations

import argparse
import time

import torch

from mudsc_graph.merging.matching import match_align, match_zip


def similarity(units: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(units, 4 * units, generator=g)
    y = x[torch.randperm(units, generator=g)] + 0.5 * torch.randn(units, 4 * units, generator=g)
    return torch.corrcoef(torch.cat([x, y]))


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(sizes: list[int]) -> None:
    torch.set_num_threads(1)
    for o in sizes:
        s = similarity(o)
        t_align = best_of(lambda: match_align([s], 2))
        t_zip = best_of(lambda: match_zip([s], 2))
        print(f"O = {o:5d}, N = 2: align {t_align * 1e3:8.1f} ms   zip {t_zip * 1e3:8.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_matching", description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[64, 256, 512, 1024], metavar="O",
                        help="units per model (default: 64 256 512 1024)")
    main(parser.parse_args().sizes)
