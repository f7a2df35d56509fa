"""Calibration: the data every pass of a merge over its batches reads, and its one error path.

The activation statistics, REPAIR and the BatchNorm reset each run models over the calibration
batches. A :class:`Calibration` holds what they share - the batches (this rank's share under
``torch.distributed``), how a batch gives the model's inputs, the device - and reports a model
that fails on a batch the same way for each of them (:meth:`Calibration.batch`)::

    REPAIR: model 1 failed on calibration batch 3 (input 0 (8, 5) float32): RuntimeError: ...

    >>> calib = Calibration(loader, device="cuda")
    >>> for k, inputs in calib.inputs():
    ...     with calib.batch(k, inputs, "my pass", "the merged model"):
    ...         call(model, inputs)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import MergeError, first_line
from ..inputs import InputError, Inputs, as_inputs, describe, tensors, to_device
from .distributed import shard


class CalibrationError(MergeError, ValueError):
    """Calibration data that cannot be used: a model failed on a batch, a batch gives no model
    inputs or has non-finite values."""


#: Keys of a dict batch that are targets, not model inputs.
LABEL_KEYS = ("labels", "label", "y")


def default_inputs_from_batch(batch: Any) -> Any:
    """The model inputs of one calibration batch.

    A tensor -> ``(batch,)``; a tuple/list -> ``(batch[0],)`` (inputs, labels, ...), or keyword inputs
    when ``batch[0]`` is a dict (several named inputs and their labels); a dict of
    ``"x"`` and labels -> ``(batch["x"],)``; any other dict is keyword inputs, keyed by the forward's
    parameter names (``{"input_ids": ids, "attention_mask": ...}``, ``{"x": x, "mem": memory}``),
    without its label keys (``labels``, ``label``, ``y``). Several positional inputs: a dict, or
    ``inputs_from_batch=``.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        return {str(k): v for k, v in batch[0].items()} if isinstance(batch[0], Mapping) else (batch[0],)
    if isinstance(batch, Mapping) and "x" in batch and all(k == "x" or k in LABEL_KEYS for k in batch):
        return (batch["x"],)
    if isinstance(batch, Mapping) and batch:
        return {str(k): v for k, v in batch.items() if k not in LABEL_KEYS}
    raise CalibrationError(f"cannot take model inputs from a batch of type {type(batch).__name__}; pass inputs_from_batch=")


@dataclass(frozen=True)
class Calibration:
    """Calibration batches, how each gives the model's inputs, and the device they are run on
    (``None``: where they are)."""

    batches: Iterable
    inputs_from_batch: Callable[[Any], Any] = default_inputs_from_batch
    device: Any = None

    @classmethod
    def of(cls, data: "Iterable | Calibration", **fields: Any) -> "Calibration":
        """``data`` itself when it is a Calibration, else one over its batches (``fields``: the
        others, ``None`` for their defaults)."""
        if isinstance(data, Calibration):
            return data
        return cls(data, **{k: v for k, v in fields.items() if v is not None})

    @classmethod
    def read(cls, data: Iterable | None, inputs_from_batch: Callable[[Any], Any] | None = None,
             device: Any = None) -> "Calibration | None":
        """The batches of ``data`` held in memory (every pass reads them again), each checked:
        model inputs found, every float finite. ``None`` without data."""
        if data is None:
            return None
        if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
            raise CalibrationError(f"data= must be an iterable of batches (a list, a DataLoader), got {type(data).__name__}")
        calib = cls.of(list(data), inputs_from_batch=inputs_from_batch, device=device)
        for k, batch in enumerate(calib.batches):
            for t in tensors(as_inputs(calib.inputs_from_batch(batch))):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise CalibrationError(f"calibration batch {k} has NaN or inf inputs; they would poison every statistic: clean the data")
        return calib

    def shard(self) -> "Calibration":
        """This rank's share of the batches (all of them outside a process group)."""
        return replace(self, batches=shard(list(self.batches)))

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def inputs(self) -> Iterator[tuple[int, Inputs]]:
        """``(k, inputs)`` of every batch, the inputs on the device."""
        for k, batch in enumerate(self.batches):
            yield k, to_device(as_inputs(self.inputs_from_batch(batch)), self.device)

    @contextlib.contextmanager
    def batch(self, k: int, inputs: Inputs, stage: str, who: str = "the model", *, error: type = CalibrationError,
              hint: str = "") -> Iterator[None]:
        """Run models on batch ``k`` inside: a failure is raised as ``error`` saying which stage,
        which model, which batch and why, then ``hint`` (inputs that do not fit the model and
        errors already said pass through)."""
        try:
            yield
        except (InputError, CalibrationError):
            raise
        except Exception as exc:
            raise error(f"{stage}: {who} failed on calibration batch {k} ({describe(inputs)}): "
                        f"{type(exc).__name__}: {first_line(exc)}{hint}") from exc
