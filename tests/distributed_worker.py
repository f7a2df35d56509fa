"""One rank of the sharded-calibration tests (tests/test_distributed.py), run as a script:

    python tests/distributed_worker.py RANK WORLD INIT_FILE OUT_DIR SCENARIO

joins a gloo process group through ``INIT_FILE``, merges the models and data of ``SCENARIO`` (the
same on every rank and in the single-process reference: :func:`case`) and saves each merged
state_dict under ``OUT_DIR/rank{RANK}-{name}.pt``; a failure is written to ``OUT_DIR/rank{RANK}.err``.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch

import mudsc_graph

MERGES = {"zip": dict(method="mudsc", mode="zip"), "align": dict(method="mudsc", mode="align"), "zipit": dict(method="zipit"),
          "zip_refit": dict(method="mudsc", mode="zip", refit=True)}
#: the ``repair`` scenario: GroupNorm models (no BatchNorm, so REPAIR has channels to repair)
REPAIRED = {"zip_repair": dict(method="mudsc", mode="zip", repair=True), "zipit_repair": dict(method="zipit", repair=True)}


def case(scenario: str) -> tuple[list[torch.nn.Module], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Two ResNet-20 x1 (BatchNorm, statistics made non-constant; GroupNorm ones for ``repair``) and
    5 calibration batches; the ``bad`` scenario's batch 1 (rank 1's first) has the wrong number of channels."""
    arch = mudsc_graph.get_registry().architecture("resnet20_gn" if scenario == "repair" else "resnet20")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = arch.build(width=0.5, gn_groups=4) if scenario == "repair" else arch.build(width=1)
        for gn in (x for x in m.modules() if isinstance(x, torch.nn.GroupNorm)):
            gn.weight.data.uniform_(0.5, 1.5)
            gn.bias.data.uniform_(-0.3, 0.3)
        for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.3, 0.3)
        models.append(m.eval())
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.zeros(8, dtype=torch.long)) for _ in range(5)]
    if scenario == "bad":
        batches[1] = (torch.randn(8, 4, 32, 32, generator=g), batches[1][1])
    return models, batches


def merges(scenario: str) -> dict[str, dict[str, torch.Tensor]]:
    models, batches = case(scenario)
    table = REPAIRED if scenario == "repair" else MERGES
    names = ["zip"] if scenario == "bad" else list(table)
    return {n: mudsc_graph.merge(models, data=batches, max_iter=5, **table[n]).model.state_dict() for n in names}


def main() -> None:
    rank, world, init, out, scenario = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        for name, state in merges(scenario).items():
            torch.save(state, out / f"rank{rank}-{name}.pt")
    except Exception as exc:  # the test reads what each rank raised
        (out / f"rank{rank}.err").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
