"""Shared machinery of the curvature operators: data looping, normalization, caching, checks.

Every operator is C = Σ_b w_b C_b over the batches b of the data, where C_b is the batch's
curvature under the loss's own reduction and w_b = N_b / N for ``"mean"`` (so the data set is
averaged exactly as one big batch would be) or 1 for ``"sum"``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from scipy.sparse.linalg import LinearOperator
from torch import nn

from hessian_lab.core import (
    JVP_METHODS,
    Batch,
    BatchFn,
    BatchSource,
    OutputFn,
    auto_jvp_method,
    check_model_mode,
    functional_model,
    input_tensors,
    params_to_vector,
    progress_bar,
    select_parameters,
    vector_to_params,
)
from hessian_lab.output_curvature import LossReduction


class CurvatureOperator(ABC):
    """A P×P curvature matrix of the loss, available only through products.

    Args:
        model: The network, an ``nn.Module`` (for DDP pass ``ddp_model.module``).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` (``"mean"`` or
            ``"sum"``) or any callable ``(outputs, targets) -> scalar``; a callable without a
            ``reduction`` attribute is taken to average over the examples of a batch.
        data: One ``(inputs, targets)`` batch or an iterable of batches (e.g. a DataLoader).
            Inputs may be a tensor (``model(x)``), a tuple/list of tensors (``model(*x)``) or
            a dict of tensors (``model(**x)``); batches on another device are moved to the
            parameters' device. A DataLoader is iterated on every product unless cached; one
            whose batches change between passes (shuffle, ``drop_last``, random augmentation)
            raises instead of averaging different matrices.
        params: ``None`` for every parameter with ``requires_grad``, or a list of names.
        cache: Keep per-batch work that does not depend on the vector (forward pass, output
            curvature, VJP closure, linearized JVP) between products. ``None`` caches when the
            data is held in memory (one batch or a list of batches) and streams a DataLoader;
            ``True`` with a DataLoader reads it once into memory; ``False`` saves memory.
        allow_train_mode: Accept BatchNorm/Dropout layers in train mode.
        matmat: How ``matmat`` batches k vectors: ``"vmap"`` (``torch.func.vmap`` over the
            product), ``"loop"`` (one product per column, each reusing the cached batch state),
            or ``"auto"``: a loop on CPU, where it measured fastest per column for H, Q and GN
            on an MLP and a CNN (``analyses/benchmark_operators.py``, docs/operators.md), vmap
            elsewhere.
        reduction: For a plain callable loss without a ``reduction`` attribute: ``"mean"`` if it
            averages over the examples of a batch, ``"sum"`` if it sums. Required when it
            matters (several batches, or GN's per-example gradients); ``nn`` losses carry it.
            A "mean" divides by the first dimension of the targets (for class-index
            cross-entropy / NLL modules: the summed weight of the non-ignored targets); see
            :class:`~hessian_lab.output_curvature.LossReduction`.
        output_fn: Maps the model's output to the tensor the loss takes. Default: a tensor as
            it is, else its ``logits`` attribute or key (Hugging Face ``ModelOutput``, a dict).
        batch_fn: Maps each item of ``data`` to ``(inputs, targets)``, e.g.
            ``lambda b: ({k: v for k, v in b.items() if k != "labels"}, b["labels"])``.
        progress: Show a progress bar over the batches of each pass over a DataLoader.
        process_group: Data sharded over processes (``torch.distributed``): each process
            passes its own shard as ``data`` and the operator is that of the whole data set —
            products, quadratic forms, ``gradient()`` and ``loss()``, weighted with the global
            example count (or summed class weights) — with one all-reduce per product. Every
            process must call every method in the same order (they are collectives). Pass
            ``torch.distributed.group.WORLD`` for all processes; ``None`` (default): one
            process.
        jvp_method: How Q and GN compute u = J v: ``"double_backward"`` (a backward through
            the kept graph of Jᵀw: no primal recomputation, no tracing), ``"forward"``
            (``torch.func.jvp``, traced by ``torch.func.linearize`` from the second product on
            when cached), or ``"auto"``: forward for convolutional networks, whose double
            backward is slow in PyTorch, double backward otherwise (measured,
            :mod:`hessian_lab.core.linearization`).
        trace_limit_bytes: With forward-mode JVPs and the cache on, the JVP is traced (from the
            second product on) only for batches whose kept activations are at most this many
            bytes (default 64 MiB): the trace makes later JVPs 2–4× cheaper but holds its own
            constants, measured at about 6× the activations on a ResNet-18 (a cached product's
            peak memory went from 1.8 to 4.7 gradient steps'). ``None``: always trace; ``0``:
            never.

    Attributes:
        shape: ``(P, P)``.
        dtype: The parameters' dtype.
        device: The parameters' device.
        param_names: Names of the parameters spanning θ, in the flat order.
        num_examples: N, the number of examples in the data.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        data: Batch | Iterable[Batch],
        params: Sequence[str] | None = None,
        *,
        cache: bool | None = None,
        allow_train_mode: bool = False,
        matmat: str = "auto",
        reduction: str | None = None,
        output_fn: OutputFn | None = None,
        batch_fn: BatchFn | None = None,
        progress: bool = False,
        process_group: dist.ProcessGroup | None = None,
        jvp_method: str = "auto",
        trace_limit_bytes: int | None = 64 * 2**20,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        check_model_mode(model, allow_train_mode)
        self.model = model
        self.loss_fn = loss_fn
        selected = select_parameters(model, params)
        self.param_names = list(selected)
        self._params = {n: p.detach() for n, p in selected.items()}
        self._f = functional_model(model, self.param_names, output_fn)
        self.output_fn = output_fn
        self.progress = progress
        first = next(iter(self._params.values()))
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.num_params = sum(p.numel() for p in self._params.values())
        self.shape = (self.num_params, self.num_params)
        if matmat not in ("auto", "vmap", "loop"):
            raise ValueError(f"matmat={matmat!r} is not one of 'auto', 'vmap', 'loop'.")
        if matmat == "auto":
            matmat = "loop" if self.device.type == "cpu" else "vmap"
        self.matmat_mode = matmat
        if jvp_method not in JVP_METHODS:
            raise ValueError(f"jvp_method={jvp_method!r} is not one of {JVP_METHODS}.")
        #: How Q and GN get u = J v: "double_backward" or "forward" (core.linearization).
        self.jvp_method = auto_jvp_method(model) if jvp_method == "auto" else jvp_method
        self.trace_limit_bytes = trace_limit_bytes

        self.cache = BatchSource.in_memory(data, batch_fn) if cache is None else bool(cache)
        if self.cache and not BatchSource.in_memory(data, batch_fn) and isinstance(data, Iterable):
            data = list(data)  # read a loader once; products then reuse the cached batches
        loss = LossReduction.of(loss_fn, reduction)
        source = BatchSource(
            data,
            lambda x, y: float(loss.denominator(y)),
            batch_fn=batch_fn,
            device=self.device,
        )
        self._source = source
        if process_group is not None and not dist.is_initialized():
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialized: call "
                "torch.distributed.init_process_group(...) first (torchrun sets the environment)."
            )
        self.process_group = process_group
        self._distributed = process_group is not None and dist.get_world_size(process_group) > 1
        counts = torch.tensor(
            [source.num_examples, source.total_denominator, source.num_batches],
            dtype=torch.float64,
            device=self.device,
        )
        self._all_reduce(counts)  # the whole data set's N, D and batch count, in one collective
        self.num_examples = int(counts[0])
        #: The loss and its reduction, decided here once and read by every part of the operator.
        self.loss_reduction = LossReduction.of(
            loss, required=int(counts[2]) > 1 or self._uses_example_gradients
        )
        # What the whole-data "mean" divides by (N, or the summed class weights of the targets).
        self._denominator = float(counts[1])
        self._states: list[tuple[float, Any]] | None = None
        self._gradient: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    #: Whether the operator forms per-example gradients (their scale depends on the reduction).
    _uses_example_gradients = False

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` in place over the processes of ``process_group`` (nothing for one)."""
        if self._distributed:
            dist.all_reduce(t, group=self.process_group)
        return t

    @property
    def reduction(self) -> str:
        """The loss's reduction, ``"mean"`` or ``"sum"``."""
        return self.loss_reduction.reduction

    # ----------------------------------------------------------------------------------------
    # What each operator defines: its per-batch state and the products with it.

    @abstractmethod
    def _batch_state(self, inputs: Any, targets: torch.Tensor) -> Any:
        """Tangent-independent work for one batch (a forward pass, closures, factors)."""

    @abstractmethod
    def _batch_matmat(self, state: Any, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        """C_b applied to k tangents (dict of ``[k, *shape]``); returns ``[P, k]``."""

    @abstractmethod
    def _batch_quadratic(self, state: Any, tangent: dict[str, torch.Tensor]) -> torch.Tensor:
        """vᵀ C_b v for one tangent (dict of parameter-shaped tensors)."""

    @abstractmethod
    def _batch_gradient(self, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_b, ∇L_b flat) from the batch state."""

    # ----------------------------------------------------------------------------------------

    def _check_batch(self, inputs: Any) -> None:
        for t in input_tensors(inputs):
            if t.is_floating_point() and t.dtype != self.dtype:
                raise ValueError(
                    f"A batch's inputs are {t.dtype} but the parameters are {self.dtype}; "
                    f"convert the data with inputs.to({self.dtype}) (or the model with "
                    "model.to())."
                )

    def _iter_states(self) -> Iterator[tuple[float, Any]]:
        if self.cache and self._states is not None:
            yield from self._states
            return
        states = []
        batches = progress_bar(
            self._source,
            total=self._source.num_batches,
            desc=f"{type(self).__name__} pass",
            unit="batch",
            enable=self.progress and not self.cache,
        )
        for inputs, targets in batches:
            self._check_batch(inputs)
            weight = self.loss_reduction.batch_weight(targets, self._denominator)
            item = (weight, self._batch_state(inputs, targets))
            if self.cache:
                states.append(item)
            yield item
        if self.cache:
            self._states = states

    def _check_vector(self, v: Any, matrix: bool) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"Expected a torch.Tensor, got {type(v).__name__}; use to_scipy() for numpy."
            )
        want = "[P, k]" if matrix else "[P]"
        if v.dim() != (2 if matrix else 1) or v.shape[0] != self.num_params:
            raise ValueError(
                f"Expected a tensor of shape {want} with P={self.num_params}, got "
                f"{tuple(v.shape)}. Flatten parameter-shaped tensors with params_to_vector."
            )
        if v.dtype != self.dtype:
            raise ValueError(
                f"Vector dtype {v.dtype} differs from the operator's {self.dtype}; "
                f"convert it with v.to({self.dtype})."
            )
        if v.device != self.device:
            raise ValueError(
                f"Vector is on {v.device} but the operator is on {self.device}; "
                f"move it with v.to('{self.device}')."
            )
        # One reduction instead of a P-sized boolean temporary: the sum is finite unless an entry
        # is NaN/inf (or the sum overflows, which the exact check below then rules out).
        if not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()):
            raise ValueError("Vector has NaN or infinite entries; a product with it is undefined.")
        return v

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return C V for a ``[P, k]`` matrix V (k products, batched as ``matmat_mode`` says)."""
        return self._matmat(self._check_vector(V, matrix=True))

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        loop = self.matmat_mode == "loop" and V.shape[1] > 1
        # A loop works on rows of [k, P] buffers: column i comes from row i of one transposed copy
        # of V and accumulates in row i of the output, transposed once at the end. A column of a
        # [P, k] matrix is strided: products on it measured 20% slower on the MLP, and a copy per
        # column reads all of V (analyses/benchmark_operators.py).
        if loop:
            columns = [
                {n: t[None] for n, t in self.vector_to_params(row).items()}
                for row in V.T.contiguous()
            ]
        else:
            tangents = vector_to_params(V, self._params)
        out = V.new_zeros(V.shape[1], V.shape[0]) if loop else torch.zeros_like(V)
        with torch.no_grad():
            for weight, state in self._iter_states():
                if loop:
                    for i, column in enumerate(columns):
                        out[i].add_(self._batch_matmat(state, column)[:, 0], alpha=weight)
                else:
                    out.add_(self._batch_matmat(state, tangents), alpha=weight)
        if loop:
            out = out.T.contiguous()
        return self._all_reduce(out)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return C v for a flat vector v of length P."""
        v = self._check_vector(v, matrix=False)
        return self._matmat(v.unsqueeze(1)).squeeze(1)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v) if isinstance(v, torch.Tensor) and v.dim() == 2 else self.matvec(v)

    def quadratic_form(self, v: torch.Tensor) -> torch.Tensor:
        """Return vᵀ C v (a 0-dim tensor, no host synchronization)."""
        v = self._check_vector(v, matrix=False)
        tangent = vector_to_params(v, self._params)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for weight, state in self._iter_states():
                total = total + weight * self._batch_quadratic(state, tangent)
        return self._all_reduce(total)

    def _gradient_and_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gradient is None or not self.cache:
            grad = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
            loss = torch.zeros((), dtype=self.dtype, device=self.device)
            for weight, state in self._iter_states():
                batch_loss, batch_grad = self._batch_gradient(state)
                grad.add_(batch_grad, alpha=weight)
                loss = loss + weight * batch_loss
            if self._distributed:  # one collective for both
                packed = self._all_reduce(torch.cat([grad, loss.reshape(1)]))
                grad, loss = packed[:-1], packed[-1]
            self._gradient, self._loss = grad, loss
        return self._gradient, self._loss

    def gradient(self) -> torch.Tensor:
        """Return G = ∇h(θ), the flat gradient of the risk over the whole data."""
        return self._gradient_and_loss()[0]

    def loss(self) -> torch.Tensor:
        """Return the risk h(θ) over the whole data (a 0-dim tensor)."""
        return self._gradient_and_loss()[1]

    def to_dense(self, chunk_size: int = 256) -> torch.Tensor:
        """Materialize C as a ``[P, P]`` tensor, ``chunk_size`` columns at a time."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        cols = [
            self.matmat(eye[:, i : i + chunk_size]) for i in range(0, self.num_params, chunk_size)
        ]
        return torch.cat(cols, dim=1)

    def to_scipy(self) -> LinearOperator:
        """Return a ``scipy.sparse.linalg.LinearOperator`` view (numpy in, numpy out).

        Works with ``scipy.sparse.linalg.eigsh``, ``cg``, ``minres`` and ``lobpcg``; inputs are
        cast to the operator's dtype and device, outputs come back to the host.
        """

        def to_torch(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(x), device=self.device).to(self.dtype)

        def mv(x: np.ndarray) -> np.ndarray:
            return self.matvec(to_torch(x).reshape(-1)).cpu().numpy()

        def mm(X: np.ndarray) -> np.ndarray:
            return self.matmat(to_torch(X)).cpu().numpy()

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator(
            self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np_dtype
        )

    def params_to_vector(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flatten parameter-shaped tensors in this operator's order."""
        return params_to_vector([tensors[n] for n in self.param_names])

    def vector_to_params(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into parameter-shaped tensors keyed by name."""
        return vector_to_params(vector, self._params)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(P={self.num_params}, N={self.num_examples}, "
            f"dtype={self.dtype}, device={self.device}, reduction={self.reduction!r})"
        )
