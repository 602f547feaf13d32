"""Data given to an operator: one ``(inputs, targets)`` batch or an iterable of batches.

A batch is ``(inputs, targets)``: ``targets`` a tensor whose first dimension counts the
batch's examples, ``inputs`` a tensor, a tuple/list of tensors (``model(*inputs)``) or a dict of
tensors (``model(**inputs)``). ``batch_fn`` maps any other item (a Hugging Face dict with
``"labels"``, a tuple with extra fields) to that pair.

``data`` is read as one batch when it is a pair ``(inputs, targets)`` as above, or (with
``batch_fn``) a dict; a list or tuple of those is a list of batches; anything else iterable
(a ``DataLoader``) is iterated on every pass. Wrap a single item of another shape in a list.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from hessian_lab.core.model_call import ModelInputs, input_tensors, is_model_inputs, move_inputs

Batch = tuple[ModelInputs, torch.Tensor]
BatchFn = Callable[[Any], Batch]


def is_batch(item: Any) -> bool:
    """Whether ``item`` is an ``(inputs, targets)`` pair: targets a tensor, inputs model inputs."""
    return (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and isinstance(item[1], torch.Tensor)
        and is_model_inputs(item[0])
    )


def _is_single_item(data: Any, batch_fn: BatchFn | None) -> bool:
    return is_batch(data) or (batch_fn is not None and isinstance(data, Mapping))


def _fingerprint(inputs: ModelInputs, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Numbers that change when a batch's examples, their order or their values change.

    Per tensor, with x_n an example's entries and r_n = x_n · w for a ramp w over them:
    ``ordered`` = [Σ_n n r_n] changes when the examples are reordered, and ``content`` =
    [Σ_n r_n, Σ_n r_n², Σ_n |r_n|] (order-invariant, summed over the pass) changes when the
    examples or their values change (a flip or crop inside an example changes r_n). Float64, on
    the tensor's device: no host synchronization until a pass is compared.
    """
    ordered, content = [], []
    for t in (*input_tensors(inputs), targets):
        x = t.detach().reshape(t.shape[0] if t.dim() else 1, -1).to(torch.float64)
        ramp = torch.linspace(1.0, 2.0, x.shape[1], dtype=torch.float64, device=x.device)
        r = x @ ramp
        rows = torch.arange(1, x.shape[0] + 1, dtype=torch.float64, device=x.device)
        ordered.append(rows @ r)
        content.append(torch.stack([r.sum(), (r * r).sum(), r.abs().sum()]))
    return torch.stack(ordered), torch.cat(content)


class _PassRecord:
    """The fingerprints of one pass over the data: per batch (ordered) and summed (content)."""

    def __init__(self) -> None:
        self.ordered: list[torch.Tensor] = []
        self.content: torch.Tensor | None = None

    def add(self, inputs: ModelInputs, targets: torch.Tensor) -> None:
        ordered, content = _fingerprint(inputs, targets)
        self.ordered.append(ordered)
        self.content = content if self.content is None else self.content + content

    def same_content(self, other: _PassRecord) -> bool:
        a, b = self.content, other.content
        if a is None or b is None or a.shape != b.shape:
            return a is None and b is None
        b = b.to(a.device)
        # Summation order differs between passes of a shuffled loader: compare to rounding.
        return bool(((a - b).abs() <= 1e-9 * (a.abs() + b.abs()) + 1e-300).all())

    def same_order(self, other: _PassRecord) -> bool:
        return len(self.ordered) == len(other.ordered) and all(
            a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))
            for a, b in zip(self.ordered, other.ordered, strict=True)
        )


class BatchSource:
    """Iterates the batches of ``data`` and knows the data-set size N.

    Args:
        data: One batch or an iterable of batches (module docstring).
        denominator: ``(inputs, targets) -> float``, summed over the batches in the same pass
            that counts them (what a "mean" loss divides by); default: the number of examples.
        batch_fn: Maps each item of ``data`` to ``(inputs, targets)``.
        device: Move every batch's tensors to this device (``None``: leave them).
        check_changes: On every later pass of a loader, compare it with the first pass: raise
            if the examples changed (``drop_last`` with shuffling, random augmentation) instead
            of silently averaging different matrices; warn once if only their order changed
            (``shuffle=True``: the same matrix, products equal to rounding only).

    Attributes:
        is_fixed: True when the batches are held in memory (a single batch or a list/tuple of
            batches), so per-batch work can be cached between products.
        num_examples: N, the number of examples over all batches (first dimension of targets).
        num_batches: The number of non-empty batches.
        total_denominator: The sum of ``denominator`` over the batches.
    """

    def __init__(
        self,
        data: Any,
        denominator: Callable[[ModelInputs, torch.Tensor], float] | None = None,
        *,
        batch_fn: BatchFn | None = None,
        device: torch.device | None = None,
        check_changes: bool = True,
    ) -> None:
        self.batch_fn, self.device = batch_fn, device
        self.is_fixed = self.in_memory(data, batch_fn)
        if _is_single_item(data, batch_fn):
            self._items: Iterable[Any] = [data]
        elif isinstance(data, (list, tuple)):
            self._items = list(data)
        elif isinstance(data, Iterable) and not isinstance(data, (torch.Tensor, Mapping)):
            self._items = data
        else:
            raise TypeError(
                "data must be an (inputs, targets) batch or an iterable of batches (a list, a "
                f"DataLoader); got {type(data).__name__}. Pass batch_fn=... to map each item "
                "of data to (inputs, targets)."
            )
        self._loader = data
        self._reference: _PassRecord | None = None
        self._warned_order = False
        # One pass over the data: a DataLoader may be expensive to iterate.
        self.num_examples, self.num_batches, self.total_denominator = 0, 0, 0.0
        record = _PassRecord()
        for x, y in self._iterate():
            self.num_examples += batch_examples(y)
            self.num_batches += 1
            self.total_denominator += denominator(x, y) if denominator else float(y.shape[0])
            if check_changes and not self.is_fixed:
                record.add(x, y)
        if self.num_examples == 0:
            raise ValueError("data is empty: it holds no batch with at least one example.")
        if check_changes and not self.is_fixed:
            self._reference = record

    @staticmethod
    def in_memory(data: Any, batch_fn: BatchFn | None = None) -> bool:
        """Whether ``data`` is one batch or a list/tuple of batches (not a loader to iterate)."""
        return _is_single_item(data, batch_fn) or isinstance(data, (list, tuple))

    def _to_batch(self, item: Any, index: int) -> Batch:
        batch = self.batch_fn(item) if self.batch_fn is not None else item
        if not is_batch(batch):
            got = type(batch).__name__
            if isinstance(batch, (tuple, list)):
                got += " of " + ", ".join(type(b).__name__ for b in batch)
            hint = (
                "batch_fn must return (inputs, targets)"
                if self.batch_fn is not None
                else "pass batch_fn=... mapping each item of data to (inputs, targets)"
            )
            raise TypeError(
                f"Batch {index} is not an (inputs, targets) pair with a targets tensor and "
                f"inputs that are a tensor, a tuple/list of tensors or a dict of tensors (got "
                f"{got}); {hint}."
            )
        inputs, targets = batch
        if self.device is not None:
            inputs, targets = move_inputs(inputs, self.device), targets.to(self.device)
        return inputs, targets

    def _iterate(self) -> Iterator[Batch]:
        for i, item in enumerate(self._items):
            inputs, targets = self._to_batch(item, i)
            if targets.dim() and targets.shape[0] == 0:
                continue
            yield inputs, targets

    def __iter__(self) -> Iterator[Batch]:
        if self._reference is None:
            yield from self._iterate()
            return
        record = _PassRecord()
        for x, y in self._iterate():
            record.add(x, y)
            yield x, y
        self._compare(record)

    def _compare(self, record: _PassRecord) -> None:
        ref = self._reference
        assert ref is not None
        if not record.same_content(ref):
            raise ValueError(
                f"The data changed between two passes over it ({_cause(self._loader)}), so two "
                "products with the same vector would use different matrices. Use a loader that "
                "yields the same examples every time (drop_last=False, no random augmentation; "
                "shuffle=False for bit-identical products), or pass cache=True to read the "
                "loader once and keep its batches."
            )
        if not record.same_order(ref) and not self._warned_order:
            self._warned_order = True
            warnings.warn(
                "The loader yields the same examples in a different order on each pass "
                "(shuffle=True): the operator is the same, but products agree only to rounding, "
                "not bit for bit. Use shuffle=False, or cache=True to read the loader once.",
                stacklevel=4,
            )


def _cause(loader: Any) -> str:
    """The likely reason a loader's batches changed, from its settings."""
    causes = []
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler):
        causes.append("shuffle=True")
    if getattr(loader, "drop_last", False):
        causes.append("drop_last=True")
    if not causes:
        causes.append("random augmentation or a dataset that is not deterministic")
    return "likely " + " and ".join(causes)


def batch_examples(targets: torch.Tensor) -> int:
    """N_b, the number of examples in a batch: the first dimension of the targets."""
    return int(targets.shape[0]) if targets.dim() else 1
