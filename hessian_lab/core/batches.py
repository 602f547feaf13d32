"""Data given to an operator: one ``(inputs, targets)`` batch or an iterable of batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def _is_single_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    )


class BatchSource:
    """Iterates the batches of ``data`` and knows the data-set size N.

    Args:
        data: One batch ``(inputs, targets)`` or an iterable of such batches (list, DataLoader).
        denominator: ``(inputs, targets) -> float``, summed over the batches in the same pass
            that counts them (what a "mean" loss divides by); default: the batch size.

    Attributes:
        is_fixed: True when the batches are held in memory (a single batch or a list/tuple of
            batches), so per-batch work can be cached between products.
        num_examples: N, the number of examples over all batches (first dimension of inputs).
        num_batches: The number of non-empty batches.
        total_denominator: The sum of ``denominator`` over the batches.
    """

    def __init__(
        self,
        data: Batch | Iterable[Batch],
        denominator: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    ) -> None:
        self.is_fixed = self.in_memory(data)
        if _is_single_batch(data):
            self._batches: Sequence[Batch] | Iterable[Batch] = [tuple(data)]  # type: ignore[list-item]
        elif isinstance(data, (list, tuple)):
            self._batches = [self._check_batch(b, i) for i, b in enumerate(data)]
        elif isinstance(data, Iterable):
            self._batches = data
        else:
            raise TypeError(
                "data must be an (inputs, targets) pair of tensors or an iterable of such pairs "
                f"(e.g. a DataLoader); got {type(data).__name__}."
            )
        # One pass over the data: a DataLoader may be expensive to iterate.
        self.num_examples, self.num_batches, self.total_denominator = 0, 0, 0.0
        for x, y in self:
            self.num_examples += int(x.shape[0])
            self.num_batches += 1
            self.total_denominator += denominator(x, y) if denominator else float(x.shape[0])
        if self.num_examples == 0:
            raise ValueError("data is empty: it holds no batch with at least one example.")

    @staticmethod
    def in_memory(data: Any) -> bool:
        """Whether ``data`` is one batch or a list/tuple of batches (not a loader to iterate)."""
        return _is_single_batch(data) or isinstance(data, (list, tuple))

    @staticmethod
    def _check_batch(batch: Any, index: int) -> Batch:
        if not _is_single_batch(batch):
            raise TypeError(
                f"Batch {index} is not an (inputs, targets) pair of tensors "
                f"(got {type(batch).__name__})."
            )
        return tuple(batch)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Batch]:
        for i, batch in enumerate(self._batches):
            inputs, targets = self._check_batch(batch, i)
            if inputs.shape[0] == 0:
                continue
            yield inputs, targets
