"""Evaluation of merged models on disjoint tasks: joint and per-task accuracy (docs/findings.md, "What was run").

Two models are trained on disjoint class subsets ("tasks"), e.g. ``[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]``.

*Shared head* (one output, logits indexed by class id, e.g. a fixed class-embedding head)::

    joint      = accuracy of argmax over the union of all tasks' classes, on all their samples
    per_task s = on the samples whose label is in task s, accuracy of argmax over task s's classes

*Separate heads* (a tuple of outputs, output ``i`` trained on task ``i``, e.g. partial zip at the
classifier)::

    joint      = argmax over the concatenated per-head softmax (each over its own task's classes)
    per_task s = on task s's samples, argmax of head s over task s's classes

A head's columns are either indexed by class id (column ``c`` is class ``c``) or by position
(column ``j`` is the ``j``-th class of its task); ``head_classes`` says which, or it is inferred.

Example::

    >>> m = task_metrics(model, x_test, y_test, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    >>> m.joint, m.per_task, m.mean_per_task
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from mudsc_graph.errors import MudscError

__all__ = ["EvaluationError", "TaskMetrics", "predict_logits", "accuracy", "task_metrics", "ensemble_logits"]

Outputs = Union[torch.Tensor, tuple]


class EvaluationError(MudscError, ValueError):
    """Bad arguments or outputs for an evaluation: a batch size below 1, tasks or labels the model
    has no output for, NaN logits. Also a :class:`ValueError`, which this module raised before."""


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch size must be a whole number of samples, at least 1, got {batch_size!r}")
    return batch_size


def _check_logits(logits: Any, n: int | None = None, what: str = "the logits") -> torch.Tensor:
    """``logits`` as a 2-D tensor (one row of class scores per sample), with ``n`` rows if given,
    and no NaN (``-inf`` is allowed: it is a class that cannot be predicted)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise EvaluationError(f"{what} must be one row of class scores per sample (N x classes), got {shape}")
    if n is not None and logits.shape[0] != n:
        raise EvaluationError(f"{what} have {logits.shape[0]} rows but there are {n} labels; give one row per sample")
    if logits.is_floating_point() or logits.is_complex():
        rows = torch.isnan(logits).any(dim=1)
        if bool(rows.any()):
            i = int(rows.nonzero()[0, 0])
            raise EvaluationError(f"{what} have NaN values (the first in sample {i}); check the model's weights and the inputs")
    return logits


def _check_labels(y: torch.Tensor, n_cols: int, what: str = "the logits") -> None:
    if len(y) == 0:
        return
    bad = (y < 0) | (y >= n_cols)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise EvaluationError(f"label {int(y[i])} (sample {i}) is outside the {n_cols} classes of {what} (ids 0-{n_cols - 1})")


def _check_classes(classes: Sequence[int], n_cols: int, what: str = "the logits") -> None:
    bad = [c for c in classes if not 0 <= int(c) < n_cols]
    if bad:
        raise EvaluationError(f"class {bad[0]} is not one of the {n_cols} classes of {what} (ids 0-{n_cols - 1})")


@dataclass
class TaskMetrics:
    """Joint accuracy, accuracy per task, and the mean of the per-task accuracies (all in [0, 1])."""

    joint: float
    per_task: list[float]
    mean_per_task: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def _logits(out: Any, nested: bool = False) -> Any:
    """A tensor, the ``.logits`` of a Hugging Face ``ModelOutput``, or a tuple of those (one per
    model after a partial zip), where a model's output that is itself a tuple (a Hugging Face
    output flattened by the partial-zip graph) gives its first tensor, its logits."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        if nested:
            if out and isinstance(out[0], torch.Tensor):
                return out[0]
            raise EvaluationError(f"a model's output is a {type(out).__name__} that does not start with a logits tensor")
        return tuple(_logits(o, nested=True) for o in out)
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    raise EvaluationError(f"the model returned a {type(out).__name__}, not logits (a tensor, a tuple of tensors or an output with .logits)")


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor | Mapping[str, torch.Tensor], batch_size: int = 512, device: str | torch.device | None = None
) -> Outputs:
    """The model's outputs on ``x`` in eval mode, batch by batch, concatenated on the CPU.

    ``x``: a tensor of inputs, or a dict of keyword tensors with one row per sample
    (``{"input_ids": ..., "attention_mask": ...}``), sliced into batches row-wise. A model that
    returns a tuple or list (one output per model after a partial zip) gives a tuple of tensors;
    one that returns a Hugging Face output gives its ``.logits``. ``device``: where to run
    (default: where the model's parameters are); the model is moved there. The model's
    train/eval mode is restored afterwards.
    """
    batch_size = _check_batch_size(batch_size)
    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.to(dev).eval()
    chunks: list[Any] = []
    keywords = isinstance(x, Mapping)
    n = len(next(iter(x.values()))) if keywords and x else len(x)
    if keywords:
        for k, v in x.items():
            if len(v) != n:
                first = next(iter(x))
                raise EvaluationError(f"keyword input {k} has {len(v)} rows but {first} has {n}; give one row per sample in every input")
    try:
        for i in range(0, n, batch_size):
            if keywords:
                out = model(**{k: v[i : i + batch_size].to(dev) for k, v in x.items()})
            else:
                out = model(x[i : i + batch_size].to(dev))
            out = _logits(out)
            if isinstance(out, (tuple, list)):
                chunks.append(tuple(o.detach().float().cpu() for o in out))
            else:
                chunks.append(out.detach().float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise EvaluationError("predict_logits needs at least one sample")
    if isinstance(chunks[0], tuple):
        return tuple(torch.cat([c[k] for c in chunks]) for k in range(len(chunks[0])))
    return torch.cat(chunks)


def _as_index(classes: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(list(classes) if not isinstance(classes, torch.Tensor) else classes, dtype=torch.long, device=device)


def accuracy(logits: torch.Tensor, y: torch.Tensor, classes: Sequence[int] | None = None) -> float:
    """Fraction of rows whose argmax equals ``y``; with ``classes``, argmax over those columns only.

    ``logits`` are indexed by class id. Samples whose label is not in ``classes`` count as wrong;
    select the samples first to leave them out. An empty set of samples gives ``nan``.

    Raises :class:`EvaluationError` for logits that are not ``N x classes`` for the ``N`` labels,
    NaN logits, a class in ``classes`` that the logits have no column for, or (without
    ``classes``) a label that has no column.
    """
    logits = _check_logits(logits, len(y))
    if len(y) == 0:
        return float("nan")
    y = y.to(logits.device)
    if classes is None:
        _check_labels(y, logits.shape[1])
        pred = logits.argmax(dim=1)
    else:
        _check_classes(classes, logits.shape[1])
        cls = _as_index(classes, logits.device)
        pred = cls[logits[:, cls].argmax(dim=1)]
    return float((pred == y).float().mean())


def _in(y: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    return torch.isin(y, _as_index(classes, y.device))


def _head_columns(out: torch.Tensor, task: list[int], head_classes: Sequence[int] | str | None) -> torch.Tensor:
    """Logits of ``task``'s classes from one head, columns in the order of ``task``."""
    n_cols = out.shape[1]
    if head_classes is None:  # positional when the head has exactly the task's classes
        head_classes = "position" if n_cols == len(task) else "class_id"
    if head_classes == "position":
        if n_cols != len(task):
            raise EvaluationError(f"a positional head must have one column per class of its task ({len(task)}), it has {n_cols}")
        return out
    if head_classes == "class_id":
        if max(task) >= n_cols:
            raise EvaluationError(f"a head indexed by class id has {n_cols} columns but its task has class {max(task)}; check --tasks")
        return out[:, _as_index(task, out.device)]
    cols = list(head_classes)  # explicit: column j is class cols[j]
    if len(cols) != n_cols:
        raise EvaluationError(f"head_classes lists {len(cols)} classes but the head has {n_cols} columns")
    where = {c: j for j, c in enumerate(cols)}
    missing = [c for c in task if c not in where]
    if missing:
        raise EvaluationError(f"head_classes has no column for classes {missing}")
    return out[:, _as_index([where[c] for c in task], out.device)]


def task_metrics(
    model_or_outputs: nn.Module | Outputs,
    x: torch.Tensor | None,
    y: torch.Tensor,
    tasks: Sequence[Sequence[int]],
    *,
    heads: Literal["shared", "separate"] = "shared",
    head_classes: Sequence[Sequence[int] | str | None] | str | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> TaskMetrics:
    """Joint and per-task accuracy of a model (or of its precomputed outputs) on disjoint tasks.

    ``model_or_outputs``: a module (run on ``x`` with :func:`predict_logits`) or its outputs
    (``x`` is then ignored and may be ``None``). ``heads="shared"``: one logits tensor indexed by
    class id. ``heads="separate"``: a tuple with one output per task, output ``i`` trained on
    ``tasks[i]``. ``head_classes`` (separate heads only): per head, or one value for all heads,
    ``"class_id"`` (column ``c`` is class ``c``), ``"position"`` (column ``j`` is the ``j``-th class
    of the task), an explicit list of the class of each column, or ``None`` to infer (positional
    when the head has exactly as many columns as its task has classes). Samples whose label is in
    no task are left out. See the module docstring for the definitions.
    """
    task_lists = [[int(c) for c in t] for t in tasks]
    if not task_lists or any(not t for t in task_lists):
        raise EvaluationError("tasks must be a non-empty list of non-empty class lists")
    union = [c for t in task_lists for c in t]
    if len(set(union)) != len(union):
        raise EvaluationError(f"tasks must be disjoint, got {task_lists}")
    if min(union) < 0:
        raise EvaluationError(f"tasks must hold class ids 0..K-1, got {min(union)}")
    if isinstance(model_or_outputs, nn.Module):
        if x is None:
            raise EvaluationError("x is needed to run the model")
        outputs: Outputs = predict_logits(model_or_outputs, x, batch_size=batch_size, device=device)
    else:
        outputs = model_or_outputs
    y = y.cpu().long()
    keep = _in(y, union)

    if heads == "shared":
        if isinstance(outputs, (tuple, list)):
            raise EvaluationError(f"heads='shared' needs one logits tensor, got {len(outputs)} outputs; use heads='separate'")
        logits = _check_logits(outputs, len(y)).cpu()
        _check_classes(union, logits.shape[1], "the model's output")
        joint = accuracy(logits[keep], y[keep], union)
        per_task = [accuracy(logits[_in(y, t)], y[_in(y, t)], t) for t in task_lists]
    elif heads == "separate":
        if not isinstance(outputs, (tuple, list)) or len(outputs) != len(task_lists):
            n = len(outputs) if isinstance(outputs, (tuple, list)) else 1
            raise EvaluationError(f"heads='separate' needs one output per task ({len(task_lists)}), got {n}")
        outputs = [_check_logits(o, len(y), f"the logits of head {i}") for i, o in enumerate(outputs)]
        if head_classes is None or isinstance(head_classes, str):
            per_head = [head_classes] * len(task_lists)
        else:
            per_head = list(head_classes)
            if len(per_head) != len(task_lists):
                raise EvaluationError(f"head_classes has {len(per_head)} entries for {len(task_lists)} heads")
        cols = [_head_columns(o.cpu(), t, h) for o, t, h in zip(outputs, task_lists, per_head)]
        probs = torch.cat([F.softmax(c.float(), dim=1) for c in cols], dim=1)  # columns in `union` order
        pred = _as_index(union, probs.device)[probs.argmax(dim=1)]
        joint = float((pred[keep] == y[keep]).float().mean()) if keep.any() else float("nan")
        per_task = []
        for c, t in zip(cols, task_lists):
            sel = _in(y, t)
            pred_t = _as_index(t, c.device)[c[sel].argmax(dim=1)] if sel.any() else y[sel]
            per_task.append(float((pred_t == y[sel]).float().mean()) if sel.any() else float("nan"))
    else:
        raise EvaluationError(f"heads must be 'shared' or 'separate', got {heads!r}")
    return TaskMetrics(joint=joint, per_task=per_task, mean_per_task=sum(per_task) / len(per_task))


@torch.no_grad()
def ensemble_logits(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    *,
    classes: Sequence[Sequence[int]] | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Log of the mean softmax probability of ``models`` (logits indexed by class id).

    With ``classes`` (one class list per model), model ``i``'s softmax is taken over
    ``classes[i]`` only and is 0 on every other class: each model votes only on the classes it
    was trained on. The joint argmax of the result is then the argmax of the concatenated
    per-model softmax (the separate-heads protocol), and its per-task accuracy on task ``i`` is
    model ``i``'s. Classes no model votes on get ``-inf``.
    """
    if not models:
        raise EvaluationError("ensemble_logits needs at least one model")
    if classes is not None and len(classes) != len(models):
        raise EvaluationError(f"classes has {len(classes)} entries for {len(models)} models")
    total: torch.Tensor | None = None
    for i, m in enumerate(models):
        out = predict_logits(m, x, batch_size=batch_size, device=device)
        if isinstance(out, tuple):
            raise EvaluationError(f"model {i} returns {len(out)} outputs; ensemble_logits needs one logits tensor per model")
        if classes is not None:
            _check_classes(classes[i], out.shape[1], f"model {i}'s output")
        if classes is None:
            p = F.softmax(out, dim=1)
        else:
            cls = _as_index(classes[i], out.device)
            p = torch.zeros_like(out)
            p[:, cls] = F.softmax(out[:, cls], dim=1)
        total = p if total is None else total + p
    assert total is not None
    return torch.log(total / len(models))
