"""Data given to an operator: one ``(inputs, targets)`` batch or an iterable of batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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

    Attributes:
        is_fixed: True when the batches are held in memory (a single batch or a list/tuple of
            batches), so per-batch work can be cached between products.
        num_examples: N, the number of examples over all batches (first dimension of inputs).
        num_batches: The number of non-empty batches.
    """

    def __init__(self, data: Batch | Iterable[Batch]) -> None:
        if _is_single_batch(data):
            self._batches: Sequence[Batch] | Iterable[Batch] = [tuple(data)]  # type: ignore[list-item]
            self.is_fixed = True
        elif isinstance(data, (list, tuple)):
            self._batches = [self._check_batch(b, i) for i, b in enumerate(data)]
            self.is_fixed = True
        elif isinstance(data, Iterable):
            self._batches = data
            self.is_fixed = False
        else:
            raise TypeError(
                "data must be an (inputs, targets) pair of tensors or an iterable of such pairs "
                f"(e.g. a DataLoader); got {type(data).__name__}."
            )
        sizes = [int(x.shape[0]) for x, _ in self]
        self.num_examples = sum(sizes)
        self.num_batches = len(sizes)
        if self.num_examples == 0:
            raise ValueError("data is empty: it holds no batch with at least one example.")

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
