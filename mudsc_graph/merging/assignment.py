"""A matrix with at most one nonzero per column, stored as two vectors.

Every built-in matcher assigns each model unit to exactly one merged unit, so the merge block of
model ``i`` (merged x model units), its unmerge block transposed and its own-coordinates map are
such matrices. Dense, one of them weighs ``O_m * O`` floats (four per group and sweep); as an
:class:`Assignment` it is ``2 * O`` numbers, and
applying it to a tensor is a gather and a scatter-add, linear in the tensor's size (one gather
for a permutation, an align matching's block, when ``inverse`` is given).

    >>> a = Assignment(index=torch.tensor([1, 0, 1]), value=torch.tensor([.5, 1., .5]), rows=2)
    >>> a.dense()
    tensor([[0.0000, 1.0000, 0.0000],
            [0.5000, 0.0000, 0.5000]])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Assignment:
    """``rows x len(index)`` matrix whose column ``c`` has ``value[c]`` in row ``index[c]`` and zeros elsewhere."""

    index: torch.Tensor
    value: torch.Tensor
    rows: int
    inverse: torch.Tensor | None = field(default=None, compare=False)  # when ``index`` is a permutation: its inverse
    unit: bool = field(default=False, compare=False)  # every value is 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.index.numel())

    @staticmethod
    def permutation_inverse(index: torch.Tensor, rows: int) -> torch.Tensor | None:
        """The inverse of ``index`` when it is a permutation of ``range(rows)``, else ``None``."""
        if index.numel() != rows or not bool((torch.bincount(index, minlength=rows) == 1).all()):
            return None
        inverse = torch.empty_like(index)
        inverse[index] = torch.arange(rows, device=index.device)
        return inverse

    def dense(self) -> torch.Tensor:
        out = self.value.new_zeros(self.rows, self.index.numel())
        out[self.index, torch.arange(self.index.numel(), device=self.index.device)] = self.value
        return out

    def row_normalised(self) -> "Assignment":
        """Rows divided by their sums (rows without entries stay empty)."""
        sums = self.value.new_zeros(self.rows).index_add_(0, self.index, self.value)
        return Assignment(self.index, self.value / sums[self.index].clamp_min(1e-12), self.rows, self.inverse)

    def apply(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """``self @ t`` along ``axis``: a scatter-add of the scaled slices of ``t``, or for a
        permutation one gather (scaled unless every value is 1)."""
        if self.inverse is not None:
            out = t.index_select(axis, self.inverse)
            if self.unit:
                return out
            shape = [1] * t.dim()
            shape[axis] = -1
            return out.mul_(self.value[self.inverse].to(t.dtype).reshape(shape))
        t0 = t.movedim(axis, 0)
        flat = t0.reshape(t0.shape[0], -1) * self.value.to(t.dtype)[:, None]
        out = flat.new_zeros(self.rows, flat.shape[1]).index_add_(0, self.index, flat)
        return out.reshape(self.rows, *t0.shape[1:]).movedim(0, axis)

    @staticmethod
    def of(A: torch.Tensor) -> "Assignment | None":
        """``A`` as an assignment, or ``None`` when a column has two nonzeros."""
        nz = A != 0
        if not bool((nz.sum(0) <= 1).all()):
            return None
        index = nz.to(torch.uint8).argmax(0)
        return Assignment(index, A.gather(0, index[None]).squeeze(0), A.shape[0])


@dataclass(frozen=True)
class Gather:
    """``len(index) x cols`` matrix whose row ``r`` has ``value[r]`` in column ``index[r]``: applied
    by gathering (an unmerge block, which copies each merged unit to the model units it holds)."""

    index: torch.Tensor
    value: torch.Tensor
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.index.numel(), self.cols)

    def apply(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """``self @ t`` along ``axis``."""
        shape = [1] * t.dim()
        shape[axis] = -1
        return t.index_select(axis, self.index) * self.value.to(t.dtype).reshape(shape)

    @staticmethod
    def of(A: torch.Tensor) -> "Gather | None":
        """``A`` as a gather, or ``None`` when a row has two nonzeros."""
        nz = A != 0
        if not bool((nz.sum(1) <= 1).all()):
            return None
        index = nz.to(torch.uint8).argmax(1)
        return Gather(index, A.gather(1, index[:, None]).squeeze(1), A.shape[1])
