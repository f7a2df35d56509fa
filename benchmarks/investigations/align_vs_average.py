"""Why do align (permutation) merges score below plain averaging on the demo's disjoint tasks?

Builds MLP pairs exactly like ``mudsc demo`` (``mnist5k``, fixed class-embedding head, Adam,
init seeds ``1000*seed + i``, 500 calibration images) and measures, for disjoint-task pairs
(model A on one half of the classes, B on the other) and same-task pairs (both on all 10):

1. accuracy (joint / mean per task, %) of average, weight matching, activation matching,
   MuDSC-align and ZipIt!, and of averaging after a *random* permutation of B (3 draws);
2. the same permutation merges after a REPAIR-style rescale (Jordan et al. 2022): every merged
   hidden unit's pre-activation mean/std is set to the mean of its two parents' (a diagnostic,
   not part of the library);
3. the std of the merged backbone's output relative to the parents' (variance collapse);
4. the mean correlation (post-ReLU, calibration data) of the unit pairs activation matching
   matches, per hidden layer, and the fraction of dead units;
5. how far training moves the weights from init, and what averaging A with B's *untrained* init gives;
6. a sweep over width, training length and class split / seed.

    python -m benchmarks.investigations.align_vs_average           # full, about 4-5 minutes on 2 cores
    python -m benchmarks.investigations.align_vs_average --quick   # width 256 only, about 1 minute

It prints its tables and writes no file; docs/findings.md quotes the full run's sweep.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from mudsc_graph.io.data import load_data
from mudsc_experiments.cache import EMBED_DIM
from mudsc_experiments.evaluate import predict_logits, task_metrics
from mudsc_graph.merging.api import merge
from mudsc_graph.plugin.registry import get_registry
from mudsc_experiments.tasks import split_classes, train_classifier, with_class_head

PERM_METHODS = [("average", "zip"), ("weight_matching", "align"), ("activation_matching", "align"), ("mudsc", "align")]
SHORT = {"average": "avg", "weight_matching": "WM", "activation_matching": "AM", "mudsc": "MuDSC-al", "zipit": "ZipIt"}


def shape(width: int) -> tuple[int, ...]:
    """The demo's MLP shape scaled to ``width``: (w, w, w, w/2)."""
    return (width, width, width, width // 2)


class Setup:
    def __init__(self) -> None:
        self.train = load_data("mnist5k", split="train")
        self.test = load_data("mnist5k", split="test")
        calib = load_data("mnist5k", split="train", limit=500)
        self.calib_x = calib.x
        self.calib = list(zip(calib.x.split(100), calib.y.split(100)))

    def pair(self, width: int, epochs: int, split: int, same_task: bool = False):
        """Models A and B (trained) and their initial state dicts; split 0 is the demo's contiguous 0-4 / 5-9."""
        tasks = split_classes(10, 2, seed=split or None)
        models, inits = [], []
        for i in range(2):
            torch.manual_seed(split * 1000 + i)
            m = with_class_head(get_registry().architecture("mlp").build(
                in_features=784, hidden=shape(width), num_classes=EMBED_DIM, bias=False), EMBED_DIM, 10, seed=0)
            inits.append(copy.deepcopy(m.state_dict()))
            classes = list(range(10)) if same_task else tasks[i]
            train_classifier(m, self.train.x, self.train.y, classes, epochs=epochs, seed=split * 1000 + i)
            models.append(m.eval())
        return models, inits, tasks

    def acc(self, model, tasks) -> tuple[float, float]:
        m = task_metrics(predict_logits(model, self.test.x), None, self.test.y, tasks)
        return 100 * m.joint, 100 * m.mean_per_task


@torch.no_grad()
def hidden_preacts(model, x, corr=None) -> list[torch.Tensor]:
    """Pre-ReLU activations of every hidden layer, then the backbone output; ``corr[k] = (scale, shift)``."""
    bb, h, out = model.backbone, torch.flatten(x, 1), []
    for k, layer in enumerate(bb.layers):
        z = layer(h)
        if corr is not None:
            z = z * corr[k][0] + corr[k][1]
        out.append(z)
        h = torch.relu(z)
    return out + [bb.head(h)]


class Rescaled(torch.nn.Module):
    """A headed MLP whose hidden pre-activations get a per-unit affine correction (REPAIR diagnostic)."""

    def __init__(self, model, corr) -> None:
        super().__init__()
        self.model, self.corr = model, corr

    def forward(self, x):
        return self.model.head(hidden_preacts(self.model, x, self.corr)[-1])


@torch.no_grad()
def permuted_average(a, b, perms):
    """(A + P(B)) / 2 with ``perms[k][r]`` = B's unit that goes to slot r of hidden layer k."""
    sa, sb, n = a.state_dict(), b.state_dict(), len(perms)
    out = dict(sa)
    for k in range(n + 1):
        key = f"backbone.layers.{k}.weight" if k < n else "backbone.head.weight"
        w = sb[key]
        w = w[perms[k]] if k < n else w
        w = w[:, perms[k - 1]] if k > 0 else w
        out[key] = (sa[key] + w) / 2
    m = copy.deepcopy(a)
    m.load_state_dict(out)
    return m.eval()


@torch.no_grad()
def repair(merged, a, b, perms, x):
    """Per-unit (scale, shift) so each merged pre-activation has the mean/std of its parents' average."""
    za, zb, corr = hidden_preacts(a, x), hidden_preacts(b, x), []
    for k, p in enumerate(perms):
        z = hidden_preacts(merged, x, corr + [(1.0, 0.0)] * (len(perms) - k))[k]
        mu, sd = (za[k].mean(0) + zb[k][:, p].mean(0)) / 2, (za[k].std(0) + zb[k][:, p].std(0)) / 2
        s = sd / z.std(0).clamp_min(1e-8)
        corr.append((s, mu - z.mean(0) * s))
    return corr


def matched_corr(a, b, perms, x) -> list[float]:
    """Mean Pearson correlation (post-ReLU) of A's unit r and B's unit perms[k][r], per hidden layer."""
    out = []
    for za, zb, p in zip(hidden_preacts(a, x), hidden_preacts(b, x), perms):
        u, v = torch.relu(za), torch.relu(zb[:, p])
        u, v = (u - u.mean(0)) / u.std(0).clamp_min(1e-8), (v - v.mean(0)) / v.std(0).clamp_min(1e-8)
        out.append(float((u * v).mean()))
    return out


def library_perms(models, setup, method, mode):
    r = merge([m.backbone for m in models], data=setup.calib, method=method, mode=mode, alpha=0.5, seed=0)
    layer_of = {g.id: int(g.members[0][0].split(".")[1]) for g in r.spec.groups if g.members[0][0].startswith("layers.")}
    perms = {layer_of[gid]: m.permutations()[1] for gid, m in r.matchings.items() if gid in layer_of}
    return [perms[k] for k in sorted(perms)]


def zipit_acc(models, setup, tasks):
    r = merge([m.backbone for m in models], data=setup.calib, method="zipit", alpha=0.5, seed=0)
    merged = copy.deepcopy(models[0])
    merged.backbone = r.model
    return setup.acc(merged.eval(), tasks)


def random_perm_acc(models, setup, tasks, width, draws=3):
    g = torch.Generator().manual_seed(0)
    accs = [setup.acc(permuted_average(*models, [torch.randperm(h, generator=g) for h in shape(width)]), tasks)
            for _ in range(draws)]
    return [statistics.fmean(a[i] for a in accs) for i in (0, 1)], [statistics.stdev(a[i] for a in accs) for i in (0, 1)]


def fmt(acc) -> str:
    return f"{acc[0]:5.1f}/{acc[1]:4.1f}"


def detailed(setup, width: int, epochs: int) -> None:
    """Parts 1-5 on the split-0 pair (disjoint) and a same-task pair."""
    for same in (False, True):
        models, inits, tasks = setup.pair(width, epochs, 0, same_task=same)
        a, b = models
        x, cx = setup.test.x, setup.calib_x
        parent_sd = statistics.fmean(float(hidden_preacts(m, x)[-1].std(0).mean()) for m in models)
        print(f"\n== width {width}, {epochs} epochs, {'same task (both on 0-9)' if same else 'disjoint tasks ' + str(tasks)}")
        print(f"  model A {fmt(setup.acc(a, tasks))}  model B {fmt(setup.acc(b, tasks))}   (joint / mean per task, %)")
        rel = [float((a.state_dict()[k] - inits[0][k]).norm() / inits[0][k].norm()) for k in inits[0] if k.endswith("weight")]
        print("  ||W_A - W_A(init)|| / ||W_A(init)|| per layer: " + " ".join(f"{v:.2f}" for v in rel))
        init_sd = float(hidden_preacts(with_init(a, inits[0]), x)[-1].std(0).mean())
        print(f"  backbone output std: trained A {float(hidden_preacts(a, x)[-1].std(0).mean()):.3f}, A at init {init_sd:.4f}")
        print(f"  average(A, B at init) {fmt(setup.acc(permuted_average(a, with_init(b, inits[1]), [torch.arange(h) for h in shape(width)]), tasks))}")
        dead = [float(((torch.relu(z) > 0).sum(0) == 0).float().mean()) for z in hidden_preacts(a, cx)[:-1]]
        print("  dead units of A per hidden layer (calibration): " + " ".join(f"{v:.2f}" for v in dead))
        print(f"  {'method':9s} {'accuracy':>11s} {'REPAIR':>11s} {'out std/parents':>15s}  matched corr per layer")
        am_perms = None
        for method, mode in PERM_METHODS:
            perms = [torch.arange(h) for h in shape(width)] if method == "average" else library_perms(models, setup, method, mode)
            am_perms = perms if method == "activation_matching" else am_perms
            merged = permuted_average(a, b, perms)
            rep = Rescaled(merged, repair(merged, a, b, perms, cx))
            sd = float(hidden_preacts(merged, x)[-1].std(0).mean()) / parent_sd
            mc = " ".join(f"{v:.2f}" for v in matched_corr(a, b, perms, cx))
            print(f"  {SHORT[method]:9s} {fmt(setup.acc(merged, tasks)):>11s} {fmt(setup.acc(rep, tasks)):>11s} {sd:15.3f}  {mc}")
        mean, sd = random_perm_acc(models, setup, tasks, width)
        print(f"  {'rand perm':9s} {fmt(mean):>11s}  (std over 3 draws {sd[0]:.1f}/{sd[1]:.1f})")
        print(f"  {'ZipIt':9s} {fmt(zipit_acc(models, setup, tasks)):>11s}")


def with_init(model, init_state):
    m = copy.deepcopy(model)
    m.load_state_dict(init_state)
    return m.eval()


def sweep(setup, configs) -> None:
    """Part 6: disjoint-task pairs over (width, epochs, split)."""
    cols = ["avg", "WM", "AM", "MuDSC-al", "ZipIt", "rand perm"]
    print("\n== sweep, disjoint tasks: joint / mean per task (%)")
    print(f"  {'width':>5s} {'ep':>3s} {'split':>5s} " + " ".join(f"{c:>11s}" for c in cols) + "  best align - avg (joint)")
    for width, epochs, split in configs:
        models, _, tasks = setup.pair(width, epochs, split)
        accs = [setup.acc(permuted_average(*models, [torch.arange(h) for h in shape(width)]), tasks)]
        accs += [setup.acc(permuted_average(*models, library_perms(models, setup, m, mo)), tasks) for m, mo in PERM_METHODS[1:]]
        accs += [zipit_acc(models, setup, tasks), random_perm_acc(models, setup, tasks, width)[0]]
        gap = max(acc[0] for acc in accs[1:4]) - accs[0][0]
        print(f"  {width:5d} {epochs:3d} {split:5d} " + " ".join(f"{fmt(acc):>11s}" for acc in accs) + f"  {gap:+.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.investigations.align_vs_average",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 256 only, fewer sweep rows (about 1 minute)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    setup = Setup()
    detailed(setup, 256 if args.quick else 1024, 10)
    if args.quick:
        configs = [(64, 10, 0), (256, 40, 0)] + [(256, 10, s) for s in (1, 2)]
    else:
        configs = [(w, 10, s) for w in (64, 256, 1024) for s in (0, 1, 2) if (w, s) != (1024, 0)]  # (1024, 0) is above
        configs += [(256, 40, s) for s in (0, 1, 2)]
    sweep(setup, configs)
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
