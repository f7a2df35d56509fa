"""CCA merging next to the built-in methods, on two MLPs trained on disjoint class halves of ``digits``.

Run (about a minute on one CPU thread)::

    pip install --no-deps -e docs/plugins/mudsc-cca-plugin
    python docs/plugins/mudsc-cca-plugin/examples/compare.py [--seeds 0 1 2] [--hidden 256 256 256] [--json]

The protocol is the demo's (:mod:`mudsc_experiments.demo`): model A is trained on classes
0-4 and model B on 5-9 (different init seeds, the same fixed class-embedding head); their
backbones are merged on calibration images of both halves (BatchNorm-free MLP, so no reset) and
the shared head is put back. Joint accuracy is on the ``digits`` test split (all 10 classes);
``per-task`` is the mean of the two tasks' accuracies (each task's own 5 classes). The ridge
``gamma`` of CCA is swept too, and scored on a hold-out of the *train* split (validation), so that
the default is not chosen on the test images.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from mudsc_graph import get_registry, prepare
from mudsc_experiments.cache import EMBED_DIM
from mudsc_experiments.evaluate import ensemble_logits, predict_logits, task_metrics
from mudsc_experiments.tasks import HeadedModel, split_classes, train_classifier, with_class_head
from mudsc_graph.io.data import load_data

import mudsc_cca

GAMMAS = (1e-2, 1e-1, 0.3, 1.0, 3.0)


def run(seed: int, hidden: tuple[int, ...], epochs: int, calib: int, gammas, alpha: float, probe: str = "last") -> dict:
    torch.manual_seed(seed)
    train = load_data("digits", split="train")
    test = load_data("digits", split="test")
    g = torch.Generator().manual_seed(1000 + seed)
    order = torch.randperm(len(train.y), generator=g)
    n_val = len(order) // 5
    val_idx, fit_idx = order[:n_val], order[n_val:]
    x_fit, y_fit, x_val, y_val = train.x[fit_idx], train.y[fit_idx], train.x[val_idx], train.y[val_idx]
    tasks = split_classes(10, 2)
    registry = get_registry()
    arch = registry.architecture("mlp")

    models = []
    for i, task in enumerate(tasks):
        torch.manual_seed(seed * 1000 + i)
        m = with_class_head(arch.build(in_features=64, hidden=hidden, num_classes=EMBED_DIM, bias=False), EMBED_DIM, 10, seed=seed)
        train_classifier(m, x_fit, y_fit, task, epochs=epochs, lr=1e-3, batch_size=64, seed=seed * 1000 + i)
        models.append(m.eval())
    head = models[0].head

    def metrics(model, x, y, ens=False):
        logits = ensemble_logits(model, x, classes=tasks) if ens else predict_logits(model, x)
        m = task_metrics(logits, None, y, tasks)
        return {"joint": m.joint, "per_task": m.mean_per_task}

    rows = {"model A": metrics(models[0], test.x, test.y), "model B": metrics(models[1], test.x, test.y),
            "ensemble": metrics(models, test.x, test.y, ens=True)}
    batches = [(x, y) for x, y in zip(x_fit[:calib].split(100), y_fit[:calib].split(100))]
    t0 = time.perf_counter()
    prepared = prepare([m.backbone for m in models], data=batches, registry=registry, reset_bn=False, probe=probe)
    runs = [("average", dict(method="average")), ("zipit", dict(method="zipit")),
            ("mudsc zip", dict(method="mudsc", mode="zip", alpha=alpha)), ("cca", dict(method="cca"))]
    runs += [(f"cca gamma={g:g}", dict(method="cca", matcher_options={"gamma": g})) for g in gammas]
    seconds = {}
    val = {}
    for name, opts in runs:
        t1 = time.perf_counter()
        result = prepared.merge(**opts)
        seconds[name] = time.perf_counter() - t1
        merged = HeadedModel(result.model, copy.deepcopy(head)).eval()
        rows[name] = metrics(merged, test.x, test.y)
        val[name] = metrics(merged, x_val, y_val)
    return {"seed": seed, "test": rows, "val": val, "merge_seconds": seconds, "total_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 256, 256])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--calib", type=int, default=1000, help="calibration images (train split, both halves)")
    ap.add_argument("--alpha", type=float, default=0.5, help="MuDSC's weight-space share for 'mudsc zip'")
    ap.add_argument("--gammas", type=float, nargs="*", default=list(GAMMAS))
    ap.add_argument("--probe", default="last", choices=["last", "first", "all"], help="where activations are read (see merge)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = [run(s, tuple(args.hidden), args.epochs, args.calib, args.gammas, args.alpha, args.probe) for s in args.seeds]
    names = list(results[0]["test"])
    summary = {}
    for name in names:
        joint = torch.tensor([r["test"][name]["joint"] for r in results])
        per_task = torch.tensor([r["test"][name]["per_task"] for r in results])
        vj = [r["val"][name]["joint"] for r in results if name in r["val"]]
        summary[name] = {"joint": float(joint.mean()), "joint_std": float(joint.std()) if len(results) > 1 else 0.0,
                         "per_task": float(per_task.mean()), "val_joint": float(sum(vj) / len(vj)) if vj else None}
    if args.json:
        print(json.dumps({"args": vars(args), "summary": summary, "runs": results}, indent=1))
        return
    print(f"digits, MLP 64-{'-'.join(map(str, args.hidden))}-{EMBED_DIM} (no bias), tasks 0-4 / 5-9, "
          f"seeds {args.seeds}, {args.calib} calibration images; mean (std) over seeds")
    print(f"{'method':<18} {'joint (test)':>14} {'per-task (test)':>16} {'joint (val)':>12}")
    for name, s in summary.items():
        v = f"{s['val_joint']:.3f}" if s["val_joint"] is not None else ""
        print(f"{name:<18} {s['joint']:>8.3f} ({s['joint_std']:.3f}) {s['per_task']:>16.3f} {v:>12}")
    print(f"default gamma of mudsc_cca: {mudsc_cca.DEFAULT_GAMMA:g}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
