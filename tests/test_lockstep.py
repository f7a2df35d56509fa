"""The statistics pass runs the N models in step (mudsc_graph/merging/lockstep.py): the probe values
are those of whole runs, bit for bit, with N GraphModules or one graph and N state dicts, internal
probes (nn.MultiheadAttention's heads) included; and a batch never holds every probe value at once."""

from __future__ import annotations

import weakref

import torch
from torch import nn

try:
    from construct_models import TorchMHABlock
except ImportError:  # run from the repository root
    from tests.construct_models import TorchMHABlock

import mudsc_graph
from mudsc_graph.merging import statistics
from mudsc_graph.merging.lockstep import Stepper
from mudsc_graph.merging.statistics import _run, _runs, activation_correlations, select_probes


def _analysed(model: nn.Module, x: torch.Tensor):
    analysis = mudsc_graph.analyze_full(model.eval(), (x,))
    plan = {g.id: select_probes(g, "all") for g in analysis.spec.groups if not g.fixed and g.probes}
    return analysis, plan


def _stepped(runs: list, x: torch.Tensor) -> list[dict]:
    """Every probe value, stepping all models together one probe at a time (the order of model 0)."""
    steppers = [Stepper(ext, state) for ext, state in runs]
    for s in steppers:
        s.start((x,))
    keys = sorted(steppers[0].outputs, key=lambda k: steppers[0].position[k])
    got: list[dict] = [{} for _ in steppers]
    for k in keys:
        for s, out in zip(steppers, got):
            s.advance(s.ready([k]))
            out[k] = s.values[k]
    return got


@torch.no_grad()
def test_stepped_values_equal_whole_runs_with_internal_probes() -> None:
    torch.manual_seed(0)
    models = [TorchMHABlock(), TorchMHABlock()]
    x = torch.randn(3, 5, 6)
    analysis, plan = _analysed(models[0], x)
    assert any(p.key is not None for ps in plan.values() for p in ps), "expected the attention's internal probes"
    states = [m.state_dict() for m in models]
    for runs in (_runs([analysis.graph_module], states, plan, None),  # one graph, N state dicts swapped in
                 _runs([mudsc_graph.analyze_full(m, (x,)).graph_module for m in models], None, plan, None)):
        whole = [_run(ext, state, (x,)) for ext, state in runs]
        stepped = _stepped(runs, x)
        for w, s in zip(whole, stepped):
            assert set(w) == set(s)
            assert all(torch.equal(w[k], s[k]) for k in w)
        assert not all(torch.equal(whole[0][k], whole[1][k]) for k in whole[0])  # each model's own weights


def _deep_mlp(depth: int = 8, width: int = 48) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(10, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 3))


@torch.no_grad()
def test_a_batch_never_holds_every_probe_value(monkeypatch) -> None:
    """Counted from outside: the ReLU outputs (the probe values) still alive at each fold."""
    torch.manual_seed(0)
    models = [_deep_mlp(), _deep_mlp()]
    x = torch.randn(64, 10)
    analysis, _ = _analysed(models[0], x)
    gm = analysis.graph_module
    produced: list[weakref.ref] = []
    for m in gm.modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda mod, args, out: produced.append(weakref.ref(out)))
    alive: list[int] = []
    update = statistics.StackedMoments.update

    def spy(self, feats, **kw):
        alive.append(sum(r() is not None for r in produced))
        return update(self, feats, **kw)

    monkeypatch.setattr(statistics.StackedMoments, "update", spy)
    corr = activation_correlations(gm, analysis.spec, [x], states=[m.state_dict() for m in models])
    monkeypatch.undo()
    assert len(corr) == 8 and len(alive) == 8 and len(produced) == 16  # 8 hidden groups, read at 8 ReLUs per model
    assert max(alive) <= 4  # whole runs would hold all 16 at the first fold
    # the moments are the ones of whole runs
    ref = activation_correlations([mudsc_graph.analyze_full(m, (x,)).graph_module for m in models], analysis.spec, [x])
    assert all(torch.equal(corr[g], ref[g]) for g in corr)
