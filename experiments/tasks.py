"""Tasks for the evaluation protocol: a fixed shared class-embedding head, class splits, training.

The paper's protocol (docs/findings.md, "What was run") trains two models on disjoint class subsets, both ending in
the *same fixed* class-embedding head::

    x --backbone--> f (dim) --normalize--> f / |f| --@ T^T--> logits (num_classes), times ``scale``

``T`` (``num_classes x dim``) holds one fixed unit vector per class. The paper uses CLIP text
embeddings; offline we use seeded random unit vectors. Because ``T`` is shared by every model and
never trained, the backbone's output coordinates mean the same thing in every model: the output
space of the backbone is fixed (it is the model's output, in shared coordinates) and every layer
before it can be merged.

``train_classifier`` trains a model on one task: cross-entropy over that task's classes only (the
logits are restricted to ``classes`` and the labels re-indexed), deterministic under its seed.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mudsc_graph.merging.progress import NullReporter, Reporter

__all__ = ["ClassEmbeddingHead", "HeadedModel", "with_class_head", "class_embeddings", "split_classes", "train_classifier"]

#: Default logit scale of :class:`ClassEmbeddingHead` (a cosine of 1 becomes a logit of 10).
DEFAULT_SCALE = 10.0


def class_embeddings(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``num_classes x dim`` seeded random unit vectors (the same on every machine and call)."""
    if num_classes < 1 or dim < 1:
        raise ValueError(f"need num_classes >= 1 and dim >= 1, got {num_classes} and {dim}")
    g = torch.Generator().manual_seed(int(seed))
    t = torch.randn(num_classes, dim, generator=g, dtype=torch.float32)
    return F.normalize(t, dim=-1)


class ClassEmbeddingHead(nn.Module):
    """logits = ``scale * normalize(f) @ embeddings.T`` with fixed (buffer, untrained) embeddings.

    ``embeddings`` is a buffer of ``num_classes`` seeded random unit vectors of size ``dim``:
    two heads built with the same ``(num_classes, dim, seed)`` are identical, so models trained
    with them share their output coordinates. The head has no parameters.
    """

    embeddings: torch.Tensor

    def __init__(self, dim: int, num_classes: int, seed: int = 0, scale: float = DEFAULT_SCALE) -> None:
        super().__init__()
        self.dim, self.num_classes, self.seed, self.scale = int(dim), int(num_classes), int(seed), float(scale)
        self.register_buffer("embeddings", class_embeddings(self.num_classes, self.dim, self.seed))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * (F.normalize(f, dim=-1) @ self.embeddings.T)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_classes={self.num_classes}, seed={self.seed}, scale={self.scale}"


class HeadedModel(nn.Module):
    """``head(backbone(x))``; state_dict keys ``backbone.*`` and ``head.embeddings``."""

    def __init__(self, backbone: nn.Module, head: ClassEmbeddingHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def with_class_head(
    backbone: nn.Module, dim: int, num_classes: int, seed: int = 0, scale: float = DEFAULT_SCALE
) -> HeadedModel:
    """Put a fixed :class:`ClassEmbeddingHead` on ``backbone`` (whose output must have ``dim`` features).

    Example: ``with_class_head(mlp(hidden=(512, 512), num_classes=128), dim=128, num_classes=10)``
    -- the MLP's last Linear projects to the 128-dimensional embedding space.
    """
    return HeadedModel(backbone, ClassEmbeddingHead(dim, num_classes, seed=seed, scale=scale))


def split_classes(num_classes: int, n_tasks: int = 2, seed: int | None = None) -> list[list[int]]:
    """Split ``range(num_classes)`` into ``n_tasks`` disjoint tasks of (nearly) equal size.

    Without ``seed`` the split is contiguous (``10, 2 -> [[0..4], [5..9]]``); with a seed the
    classes are shuffled first (each task's classes are then sorted).
    """
    if n_tasks < 1 or num_classes < n_tasks:
        raise ValueError(f"cannot split {num_classes} classes into {n_tasks} tasks")
    order = list(range(num_classes))
    if seed is not None:
        g = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(num_classes, generator=g).tolist()
    bounds = [round(i * num_classes / n_tasks) for i in range(n_tasks + 1)]
    return [sorted(order[bounds[i] : bounds[i + 1]]) for i in range(n_tasks)]


def _task_subset(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of ``classes``, labels re-indexed to positions in ``classes``."""
    cls = torch.as_tensor(list(classes), dtype=torch.long)
    remap = torch.full((int(max(int(y.max()), int(cls.max())) + 1),), -1, dtype=torch.long)
    remap[cls] = torch.arange(len(cls))
    keep = remap[y] >= 0
    return x[keep], remap[y[keep]]


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: Sequence[int],
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    device: str | torch.device = "cpu",
    reporter: Reporter | None = None,
) -> nn.Module:
    """Train ``model`` in place on the samples of ``classes`` and return it in eval mode.

    The loss is cross-entropy over ``classes`` only: the model's logits (indexed by original class
    id) are restricted to the columns ``classes`` and the labels re-indexed to positions in
    ``classes``. Samples of other classes are ignored. ``optimizer``: ``"adam"`` (Adam, constant
    ``lr``) or ``"sgd"`` (SGD with momentum 0.9 and a cosine schedule). The shuffling order comes
    from ``seed`` (the caller seeds the model's initialisation), so two runs with the same seed
    give the same weights on the same device. ``reporter`` gets stage ``"training"`` with one
    step per epoch and the epoch's mean ``loss``.
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose adam or sgd")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    reporter = reporter or NullReporter()
    dev = torch.device(device)
    xs, ys = _task_subset(x, y, classes)
    if len(ys) == 0:
        raise ValueError(f"no training samples of classes {list(classes)}")
    xs, ys = xs.to(dev), ys.to(dev)
    cls = torch.as_tensor(list(classes), dtype=torch.long, device=dev)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(len(ys) / batch_size)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        sched = None
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    g = torch.Generator().manual_seed(int(seed))
    reporter.start("training", total=epochs)
    try:
        for _ in range(epochs):
            order = torch.randperm(len(ys), generator=g).to(dev)
            total, count = 0.0, 0
            for i in range(0, len(ys), batch_size):
                idx = order[i : i + batch_size]
                logits = model(xs[idx])[:, cls]
                loss = F.cross_entropy(logits, ys[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            reporter.advance(1, loss=total / max(count, 1))
    finally:
        reporter.end()
    return model.eval()
