"""Reproduce the MuDSC paper's two explanatory figures on a small MLP pair.

    python -m benchmarks.reproduce.figures [--quick] [--out DIR]   # DIR: benchmark-results/figures[-quick]

1. ``dual_space_scatter.png`` (paper Figure 1): for two hidden layers of the pair, every
   cross-model candidate pair of units (unit i of model A, unit j of model B; subsampled for
   drawing) placed at (weight-space similarity, activation-space similarity), with the pairs that
   ZipIt (activation only), weight zip (weight only) and MuDSC-zip (dual space) chose on top.
   The activation similarity is the Pearson correlation of the two units on the calibration data
   (:func:`mudsc_graph.merging.statistics.activation_correlations`, what every method sees). The weight
   similarity of a layer depends on how its neighbouring layers were matched, so each method's
   column uses the weight similarity that *its own* final matchings of the neighbours give
   (:meth:`mudsc_graph.merging.solver.DualSpaceSolver.weight_similarity`) -- what that method saw.
   "High in both spaces" = above the 90th percentile of all cross-model candidate pairs of that
   layer in weight space *and* in activation space.
2. ``loss_landscape.png`` (paper Figure 3): the plane through model A, model B and a merged model
   (zip-based MuDSC, ZipIt, weight zip; one column each), test loss (top) and joint accuracy
   (bottom) over a grid of the plane. Points are placed in model A's unit order: model B and each
   merged model are first permuted onto model A by weight matching (Git Re-Basin), which changes
   neither function, so every marked point is the exact network it stands for. The plane is
   spanned by ``B' - A`` and ``M' - A`` orthogonalised (Gram-Schmidt); axes are in parameter
   distance.

Models: two ``mlp`` backbones (hidden 256-256-128, no bias) trained on ``mnist5k`` classes 0-4 and
5-9 with the shared fixed class-embedding head of :mod:`mudsc_experiments.tasks`, cached under
``$MUDSC_CACHE_DIR/figures`` (default ``~/.cache/mudsc/figures``). Only the backbones are merged.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import default_out
from benchmarks.reproduce.common import cache_root
from mudsc_graph.analysis.pipeline import analyze_full
from mudsc_graph.analysis.trace import trace
from mudsc_experiments.cache import config_key, load_cached, save_cached
from mudsc_experiments.tasks import HeadedModel, split_classes, train_classifier, with_class_head
from mudsc_graph.io.data import load_data
from mudsc_graph.merging.api import merge
from mudsc_graph.merging.solver import DualSpaceSolver
from mudsc_graph.plugin.records import MatchingStrategy
from mudsc_graph.merging.statistics import activation_correlations
from mudsc_graph.plugin.registry import get_registry

EMBED_DIM = 128
#: The merged models of the figures: (label, method, mode, alpha), in column order.
METHODS = (("MuDSC-zip", "mudsc", "zip", 0.5), ("ZipIt", "zipit", "zip", 0.0), ("weight zip", "weight_zip", "zip", 1.0))
COLORS = {"MuDSC-zip": "tab:red", "ZipIt": "tab:blue", "weight zip": "tab:green"}
HIGH_QUANTILE = 0.9


# -- models ----------------------------------------------------------------------------------------
def train_pair(dataset: str, hidden: tuple[int, ...], epochs: int, seed: int = 0, calib_samples: int = 500,
               test_samples: int = 1000, cache: Path | None = None) -> dict[str, Any]:
    """Two headed MLPs trained on the two class halves of ``dataset`` (cached), plus the data."""
    arch = get_registry().architecture("mlp")
    train = load_data(dataset, split="train")
    test = load_data(dataset, split="test", limit=test_samples)
    calib = load_data(dataset, split="train", limit=calib_samples)
    num_classes = max(train.classes) + 1
    tasks = [[train.classes[i] for i in half] for half in split_classes(len(train.classes), 2)]
    in_features = int(torch.tensor(train.x.shape[1:]).prod())
    opts = {"hidden": list(hidden), "bias": False, "num_classes": EMBED_DIM, "in_features": in_features}
    config = {"dataset": dataset, "n": len(train), "opts": opts, "epochs": epochs, "seed": seed, "tasks": tasks, "v": 1}
    path = (cache or cache_root("figures")) / f"mlp-{dataset.replace(':', '_')}-{config_key(config)}.pt"

    def fresh(i: int) -> HeadedModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + i)
            return with_class_head(arch.build(**opts), EMBED_DIM, num_classes, seed=seed)

    models = [fresh(0), fresh(1)]
    states = load_cached(path, 2, config)
    trained = states is None
    if trained:
        for i, (m, task) in enumerate(zip(models, tasks)):
            train_classifier(m, train.x, train.y, task, epochs=epochs, seed=seed * 1000 + i)
        states = [m.state_dict() for m in models]
        save_cached(path, config, states)
    for m, s in zip(models, states):
        m.load_state_dict(s)
        m.eval()
    union = torch.tensor([c for t in tasks for c in t])
    keep = torch.isin(calib.y, union)
    batches = list(zip(calib.x[keep].split(100), calib.y[keep].split(100)))
    return {"models": models, "tasks": tasks, "test": test, "batches": batches, "trained": trained, "cache": str(path)}


def merge_all(pair: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """``{label: MergeResult}`` for the three zip-based methods of :data:`METHODS`."""
    backbones = [m.backbone for m in pair["models"]]
    out = {}
    for label, method, mode, alpha in METHODS:
        out[label] = merge(backbones, data=pair["batches"], method=method, mode=mode, alpha=alpha, seed=seed)
    return out


# -- figure 1: dual-space scatter ------------------------------------------------------------------
def chosen_pairs(matching: Any) -> tuple[list[tuple[int, int]], int, int]:
    """(pairs of stacked unit indices merged into one unit, how many of them are A-B pairs, merged units).

    Stacked indices: model A's unit i is ``i``, model B's unit j is ``O + j``. A zip merged unit
    joins two units (of different models, or -- ZipIt's within-model merges -- of the same model)
    or keeps one unit alone (no pair); a merged unit of k > 2 units gives its k(k-1)/2 pairs."""
    o = matching.units
    pairs, cross = [], 0
    for row in matching.merge:
        cols = torch.nonzero(row).flatten().tolist()
        for x in range(len(cols)):
            for y in range(x + 1, len(cols)):
                pairs.append((cols[x], cols[y]))
                cross += (cols[x] < o) != (cols[y] < o)
    return pairs, cross, matching.merged_units


def scatter_data(pair: dict[str, Any], results: dict[str, Any], n_layers: int = 2) -> dict[str, Any]:
    """Per layer: activation similarity, each method's weight similarity, the pairs it chose.

    Candidates are all pairs of distinct units of the two stacked models (A-B pairs and, since zip
    may merge two units of one model, A-A and B-B pairs); "high" = above the
    :data:`HIGH_QUANTILE` quantile of all candidates of that layer, in each space."""
    backbones = [copy.deepcopy(m.backbone).eval() for m in pair["models"]]
    example = (pair["batches"][0][0][:2],)
    analysis = analyze_full(backbones[0], example)
    spec = analysis.spec
    gms = [analysis.graph_module, trace(backbones[1], example)]
    act = activation_correlations(gms, spec, pair["batches"])
    ref = next(iter(results.values()))
    gids = sorted(ref.matchings)
    if [spec.groups[g].size for g in gids] != [ref.spec.groups[g].size for g in gids]:
        raise RuntimeError("the spec of the figure does not agree with the merge's spec")
    gids = [g for g in gids if g in act][:n_layers]
    states = [b.state_dict() for b in backbones]
    layers = []
    for gid in gids:
        o = spec.groups[gid].size
        iu = torch.triu_indices(2 * o, 2 * o, offset=1)
        is_cross = (iu[0] < o) & (iu[1] >= o)
        a_full = act[gid].float()
        a_all = a_full[iu[0], iu[1]]
        a_hi = torch.quantile(a_all, HIGH_QUANTILE)
        layer = {"gid": gid, "size": o, "act": a_all, "cross": is_cross, "methods": {}}
        for label, res in results.items():
            solver = DualSpaceSolver(spec, states, sorted(res.matchings), MatchingStrategy("unused", lambda *a, **k: None), act=None, alpha=1.0)
            _, w = solver.weight_similarity(gid, res.matchings)
            w_full = w.float()
            w_all = w_full[iu[0], iu[1]]
            w_hi = torch.quantile(w_all, HIGH_QUANTILE)
            pairs, cross, merged_units = chosen_pairs(res.matchings[gid])
            idx = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
            cw, ca = w_full[idx[:, 0], idx[:, 1]], a_full[idx[:, 0], idx[:, 1]]
            pair_cross = (idx[:, 0] < o) != (idx[:, 1] < o)
            both = ((cw > w_hi) & (ca > a_hi)).float()
            nan = float("nan")
            layer["methods"][label] = {
                "weight": w_all, "chosen_w": cw, "chosen_a": ca, "chosen_cross": pair_cross,
                "pairs": len(pairs), "cross_pairs": int(cross), "merged_units": merged_units,
                "frac_high_both": float(both.mean()) if len(pairs) else nan,
                "frac_high_w": float((cw > w_hi).float().mean()) if len(pairs) else nan,
                "frac_high_a": float((ca > a_hi).float().mean()) if len(pairs) else nan,
                "mean_w": float(cw.mean()) if len(pairs) else nan,
                "mean_a": float(ca.mean()) if len(pairs) else nan,
                "w_threshold": float(w_hi), "a_threshold": float(a_hi),
            }
        layers.append(layer)
    return {"layers": layers}


def plot_scatter(data: dict[str, Any], path: Path, background: int = 4000, seed: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = data["layers"]
    labels = [m[0] for m in METHODS]
    fig, axes = plt.subplots(len(layers), len(labels), figsize=(4.2 * len(labels), 3.8 * len(layers)), squeeze=False)
    g = torch.Generator().manual_seed(seed)
    for r, layer in enumerate(layers):
        a_sim = layer["act"]
        sub = torch.randperm(a_sim.numel(), generator=g)[:background]
        cross = layer["cross"][sub]
        for c, label in enumerate(labels):
            ax = axes[r][c]
            m = layer["methods"][label]
            w_sim = m["weight"][sub]
            ax.scatter(w_sim[cross], a_sim[sub][cross], s=3, c="0.6", alpha=0.5, linewidths=0, label="candidate A-B pairs")
            ax.scatter(w_sim[~cross], a_sim[sub][~cross], s=3, c="tan", alpha=0.5, linewidths=0, label="candidate A-A / B-B pairs")
            cc = m["chosen_cross"]
            ax.scatter(m["chosen_w"][cc], m["chosen_a"][cc], s=14, c=COLORS[label], alpha=0.9, marker="o", linewidths=0,
                       label=f"{label}: A-B ({int(cc.sum())})")
            ax.scatter(m["chosen_w"][~cc], m["chosen_a"][~cc], s=14, c=COLORS[label], alpha=0.9, marker="x", linewidths=0.8,
                       label=f"{label}: within a model ({int((~cc).sum())})")
            ax.axvline(m["w_threshold"], color="k", lw=0.6, ls="--")
            ax.axhline(m["a_threshold"], color="k", lw=0.6, ls="--")
            ax.set_title(f"group {layer['gid']} ({layer['size']} units): {label}\n"
                         f"high in both: {100 * m['frac_high_both']:.0f}% of chosen", fontsize=9)
            ax.set_xlabel("weight-space similarity")
            if c == 0:
                ax.set_ylabel("activation-space similarity")
            ax.legend(fontsize=6, loc="upper left", markerscale=1.5)
    fig.suptitle("Candidate merged units (pairs of units) of two MLPs (mnist5k 0-4 / 5-9); dashed: 90th percentile of all candidates; "
             "weight similarity from each method's own matchings of the neighbouring layers", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- figure 3: loss landscape plane ----------------------------------------------------------------
def align_to(ref: torch.nn.Module, other: torch.nn.Module, batches: list) -> torch.nn.Module:
    """``other`` with its units permuted onto ``ref``'s by weight matching (same function)."""
    res = merge([ref, other], data=batches, method="weight_matching")
    perm = {}
    for gid, m in res.matchings.items():
        p = m.permutations()
        if p is None:
            raise RuntimeError("weight matching did not give a permutation")
        idx = torch.empty_like(p[1])
        idx[p[0]] = p[1]  # ref's unit p0[r] is matched with other's unit p1[r]
        perm[gid] = idx
    return res.spec.apply_permutation(other, perm)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def landscape(pair: dict[str, Any], results: dict[str, Any], grid: int, margin: float = 0.25) -> dict[str, Any]:
    """Loss and joint accuracy on a ``grid x grid`` lattice of each plane (A, B', M')."""
    a, b = (m.backbone for m in pair["models"])
    head = pair["models"][0].head
    test = pair["test"]
    union = torch.tensor([c for t in pair["tasks"] for c in t])
    keep = torch.isin(test.y, union)
    x, y = test.x[keep], test.y[keep]
    cls = union.sort().values
    target = torch.searchsorted(cls, y)
    b_al = align_to(a, b, pair["batches"])
    with torch.no_grad():
        assert torch.allclose(b_al(x[:50]), b(x[:50]), atol=1e-4), "alignment changed model B's function"
    pa, pb = _flat(a), _flat(b_al)
    scratch = HeadedModel(copy.deepcopy(a), copy.deepcopy(head)).eval()

    def evaluate(vec: torch.Tensor) -> tuple[float, float]:
        torch.nn.utils.vector_to_parameters(vec, scratch.backbone.parameters())
        with torch.no_grad():
            logits = scratch(x)[:, cls]
            return float(F.cross_entropy(logits, target)), float((logits.argmax(1) == target).float().mean())

    planes = {}
    for label, res in results.items():
        m_al = align_to(a, res.model, pair["batches"])
        pm = _flat(m_al)
        u = pb - pa
        e1 = u / u.norm()
        v = pm - pa
        v_perp = v - (v @ e1) * e1
        e2 = v_perp / v_perp.norm()
        pts = {"A": (0.0, 0.0), "B": (float(u.norm()), 0.0), label: (float(v @ e1), float(v_perp.norm()))}
        xs = [p[0] for p in pts.values()]
        ys = [p[1] for p in pts.values()]
        span_x, span_y = max(xs) - min(xs), max(ys) - min(ys)
        gx = torch.linspace(min(xs) - margin * span_x, max(xs) + margin * span_x, grid)
        gy = torch.linspace(min(ys) - margin * span_y, max(ys) + margin * span_y, grid)
        loss = torch.zeros(grid, grid)
        acc = torch.zeros(grid, grid)
        for i, yy in enumerate(gy):
            for j, xx in enumerate(gx):
                loss[i, j], acc[i, j] = evaluate(pa + xx * e1 + yy * e2)
        at = {k: evaluate(pa + p[0] * e1 + p[1] * e2) for k, p in pts.items()}
        planes[label] = {"gx": gx, "gy": gy, "loss": loss, "acc": acc, "points": pts, "at": at,
                         "dist_AB": float(u.norm()), "dist_AM": float(v.norm())}
    return {"planes": planes, "n_test": int(len(y))}


def plot_landscape(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import numpy as np

    planes = data["planes"]
    fig, axes = plt.subplots(2, len(planes), figsize=(4.3 * len(planes), 7.6), squeeze=False)
    # one colour scale per row, shared by the three planes, so the columns can be compared
    zs = {"loss": [p["loss"].log10() for p in planes.values()], "acc": [p["acc"] for p in planes.values()]}
    levels = {k: np.linspace(float(min(z.min() for z in v)), float(max(z.max() for z in v)) + 1e-6, 21) for k, v in zs.items()}
    for c, (label, p) in enumerate(planes.items()):
        gx, gy = p["gx"].numpy(), p["gy"].numpy()
        for r, (key, cmap, title) in enumerate((("loss", "viridis", "test loss (log10)"), ("acc", "magma", "joint accuracy"))):
            ax = axes[r][c]
            z = p[key].log10().numpy() if key == "loss" else p[key].numpy()
            cs = ax.contourf(gx, gy, z, levels=levels[key], cmap=cmap)
            fig.colorbar(cs, ax=ax, shrink=0.85, format="%.2f")
            for name, (px, py) in p["points"].items():
                l_, a_ = p["at"][name]
                ax.plot(px, py, "o", color="white" if name in ("A", "B") else COLORS[label], mec="k", ms=7)
                right = name == "B"
                ax.annotate(f"{name}: acc {100 * a_:.0f}%\nloss {l_:.2f}", (px, py), textcoords="offset points",
                            xytext=(-5 if right else 5, 5), ha="right" if right else "left", fontsize=7,
                            color="w" if key == "loss" else "c")
            ax.set_title(f"plane A, B, {label}: {title}", fontsize=9)
            ax.set_xlabel("along B - A (parameter distance)")
            if c == 0:
                ax.set_ylabel("along merged - A, orthogonalised")
    fig.suptitle("Parents and merged models in model A's unit order (B and merged model permuted onto A by weight matching)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- driver ------------------------------------------------------------------------------------------
def run(out: Path, *, quick: bool = False, dataset: str = "mnist5k", hidden: tuple[int, ...] = (256, 256, 128),
        epochs: int = 5, grid: int | None = None, calib_samples: int | None = None, test_samples: int = 1000,
        cache: Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Write both PNGs into ``out`` and return the numbers behind them (and timings)."""
    say = print if verbose else (lambda *a, **k: None)
    grid = grid or (5 if quick else 11)
    calib_samples = calib_samples or (300 if quick else 500)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pair = train_pair(dataset, hidden, epochs, calib_samples=calib_samples, test_samples=test_samples, cache=cache)
    timings["train" if pair["trained"] else "load_models"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = merge_all(pair)
    timings["merges"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sc = scatter_data(pair, results)
    scatter_path = out / "dual_space_scatter.png"
    plot_scatter(sc, scatter_path)
    timings["scatter"] = time.perf_counter() - t0
    fractions = {}
    say(f"Figure 1 ({scatter_path}): chosen pairs high in both spaces (> {int(100 * HIGH_QUANTILE)}th percentile of all "
        "candidate pairs of the layer in each space; candidates = all pairs of distinct units of A and B):")
    for layer in sc["layers"]:
        for label, m in layer["methods"].items():
            fractions.setdefault(label, {})[layer["gid"]] = m["frac_high_both"]
            say(f"  group {layer['gid']} ({layer['size']} units) {label:11s}: {100 * m['frac_high_both']:5.1f}% high in both "
                f"(high in weight {100 * m['frac_high_w']:.0f}%, in act. {100 * m['frac_high_a']:.0f}%; {m['pairs']} pairs, "
                f"{m['cross_pairs']} of them A-B; mean S_w {m['mean_w']:.3f}, mean S_act {m['mean_a']:.3f})")

    t0 = time.perf_counter()
    ls = landscape(pair, results, grid)
    land_path = out / "loss_landscape.png"
    plot_landscape(ls, land_path)
    timings["landscape"] = time.perf_counter() - t0
    say(f"Figure 3 ({land_path}): plane through A, B' and M' with B' and M' = model B and the merged model permuted "
        f"onto model A's units by weight matching (functions unchanged); {grid}x{grid} grid, {ls['n_test']} test images, "
        "loss = cross-entropy over the 10 classes (joint).")
    at_points = {}
    for label, p in ls["planes"].items():
        at_points[label] = {k: {"loss": v[0], "acc": v[1]} for k, v in p["at"].items()}
        pts = ", ".join(f"{k}: loss {v[0]:.3f} acc {100 * v[1]:.1f}%" for k, v in p["at"].items())
        say(f"  {label:11s} |B'-A| {p['dist_AB']:.1f} |M'-A| {p['dist_AM']:.1f}; {pts}; "
            f"grid min loss {float(p['loss'].min()):.3f}, max acc {100 * float(p['acc'].max()):.1f}%")
    say("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return {"scatter": str(scatter_path), "landscape": str(land_path), "high_both": fractions, "points": at_points,
            "timings": timings, "grid": grid}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reproduce.figures", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5x5 grid, 300 calibration images")
    ap.add_argument("--out", default=None, help="output folder (default benchmark-results/figures; quick: benchmark-results/figures-quick)")
    args = ap.parse_args(argv)
    run(Path(args.out) if args.out else default_out("figures", args.quick), quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
