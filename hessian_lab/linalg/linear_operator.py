"""One internal form for anything "linear-operator-like".

Every routine of :mod:`hessian_lab.linalg` accepts

* our curvature operators (objects with ``shape``, ``dtype``, ``device`` and ``matvec``/``matmat``),
* a dense square :class:`torch.Tensor`,
* a :class:`numpy.ndarray` or a ``scipy.sparse`` matrix,
* a :class:`scipy.sparse.linalg.LinearOperator`,

and turns it into a :class:`TorchLinearOperator`: a square operator ``A`` of size ``n`` whose
``matmat`` maps a torch tensor ``V`` of shape ``[n, k]`` to ``A V``. The algorithms may run in a
different precision than the operator (e.g. float64 accumulation for a float32 operator):
``matmat`` casts its input to the operator's dtype and device, and its output back to the dtype of
the input, so that callers never have to think about the conversion.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from hessian_lab.core import progress_bar

__all__ = [
    "TorchLinearOperator",
    "as_linear_operator",
    "products_with_progress",
    "reports_progress",
]

R = TypeVar("R")


@dataclass(frozen=True)
class TorchLinearOperator:
    """A square linear operator ``A`` (size ``n``) acting on torch tensors.

    Attributes:
        shape: ``(n, n)``.
        dtype: The dtype the wrapped operator computes in.
        device: The device the wrapped operator computes on; algorithms allocate their vectors here.
        fn: ``V -> A V`` for ``V`` of shape ``[n, k]`` in ``dtype`` on ``device``.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    fn: Callable[[torch.Tensor], torch.Tensor]

    @property
    def n(self) -> int:
        """Size ``n`` of the (square) operator."""
        return self.shape[0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``A V`` for ``V`` of shape ``[n, k]``, in the dtype and on the device of ``V``."""
        out = self.fn(V.to(device=self.device, dtype=self.dtype))
        return out.to(device=V.device, dtype=V.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``A v`` for ``v`` of shape ``[n]``, in the dtype and on the device of ``v``."""
        return self.matmat(v.unsqueeze(1)).squeeze(1)


def _torch_dtype(dtype: object) -> torch.dtype:
    """Map a numpy dtype (or dtype-like) to the matching real torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    np_dtype = np.dtype(dtype)
    if np_dtype.kind != "f":
        # Integer (or complex) operators: compute in float64, the safe superset for real use.
        return torch.float64
    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


def _check_square(shape: tuple[int, ...], what: str) -> tuple[int, int]:
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"{what} must be a square operator of shape (n, n), got shape {tuple(shape)}; "
            "curvature routines need a symmetric (hence square) operator."
        )
    return int(shape[0]), int(shape[1])


def _from_scipy(op: object, shape: tuple[int, int]) -> TorchLinearOperator:
    """Wrap a scipy LinearOperator, numpy array or sparse matrix (numpy in/out, on the CPU)."""
    np_dtype = np.dtype(getattr(op, "dtype", np.float64) or np.float64)
    dtype = _torch_dtype(np_dtype)

    if isinstance(op, scipy.sparse.linalg.LinearOperator):
        apply = op.matmat
    else:  # sparse matrix / array: plain products
        apply = op.__matmul__

    def fn(V: torch.Tensor) -> torch.Tensor:
        out = apply(V.detach().cpu().numpy())
        return torch.as_tensor(np.asarray(out), dtype=dtype).reshape(V.shape)

    return TorchLinearOperator(shape, dtype, torch.device("cpu"), fn)


def as_linear_operator(op: object) -> TorchLinearOperator:
    """Adapt a linear-operator-like object to a :class:`TorchLinearOperator`.

    Args:
        op: A :class:`TorchLinearOperator` (returned as is); a square dense :class:`torch.Tensor`
            (used on its own device and dtype); a square :class:`numpy.ndarray` (converted to a CPU
            tensor); a ``scipy.sparse`` matrix or a :class:`scipy.sparse.linalg.LinearOperator`
            (applied through numpy on the CPU); or any object with ``shape``, ``dtype``, ``device``
            and ``matmat`` (``[n, k] -> [n, k]``) or ``matvec`` (``[n] -> [n]``), such as
            :class:`~hessian_lab.HessianOperator`.

    Returns:
        The operator in internal form.

    Raises:
        TypeError: If ``op`` is none of the above.
        ValueError: If ``op`` is not square.
    """
    if isinstance(op, TorchLinearOperator):
        return op
    if isinstance(op, torch.Tensor):
        shape = _check_square(tuple(op.shape), "A dense tensor operator")
        if not op.is_floating_point():
            op = op.to(torch.float64)
        A = op
        return TorchLinearOperator(shape, A.dtype, A.device, lambda V: A @ V)
    if isinstance(op, np.ndarray):
        shape = _check_square(op.shape, "A numpy array operator")
        dtype = _torch_dtype(op.dtype)
        return as_linear_operator(torch.as_tensor(np.ascontiguousarray(op), dtype=dtype))
    if isinstance(op, scipy.sparse.linalg.LinearOperator) or scipy.sparse.issparse(op):
        shape = _check_square(tuple(op.shape), "A scipy operator")
        return _from_scipy(op, shape)

    has_product = hasattr(op, "matmat") or hasattr(op, "matvec")
    if not (has_product and hasattr(op, "shape")):
        raise TypeError(
            f"Cannot use an object of type {type(op).__name__} as a linear operator: pass a square "
            "torch.Tensor, a numpy array, a scipy.sparse.linalg.LinearOperator, or an object with "
            "`shape`, `dtype`, `device` and `matmat`/`matvec` (e.g. hessian_lab.HessianOperator)."
        )
    shape = _check_square(tuple(op.shape), f"The operator {type(op).__name__}")
    dtype = _torch_dtype(getattr(op, "dtype", torch.float32))
    device = torch.device(getattr(op, "device", "cpu"))

    if hasattr(op, "matmat"):
        fn = op.matmat
    else:
        # Only a matvec: apply it column by column.
        def fn(V: torch.Tensor) -> torch.Tensor:
            return torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    return TorchLinearOperator(shape, dtype, device, fn)


@contextlib.contextmanager
def products_with_progress(
    A: TorchLinearOperator, *, enable: bool, total: int | None, desc: str
) -> Iterator[TorchLinearOperator]:
    """``A`` with a progress bar counting its products (one unit per column of ``V``).

    Args:
        A: The operator.
        enable: ``False`` yields ``A`` itself (no bar, no overhead).
        total: The expected number of products (``None`` when unknown, e.g. CG's).
        desc: The bar's label.
    """
    if not enable:
        yield A
        return
    bar = progress_bar(total=total, desc=desc, unit="product")

    def fn(V: torch.Tensor) -> torch.Tensor:
        out = A.fn(V)
        bar.update(V.shape[1])
        return out

    try:
        yield TorchLinearOperator(A.shape, A.dtype, A.device, fn)
    finally:
        bar.close()


def reports_progress(
    desc: str, total: Callable[[dict[str, Any]], int | None] | None = None
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Give a routine ``f(op, ...)`` a ``progress=False`` keyword: a bar over its products.

    Args:
        desc: The bar's label.
        total: Maps the routine's bound arguments (defaults applied) to the expected number of
            products, or ``None`` when unknown.
    """

    def decorate(routine: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(routine)

        @functools.wraps(routine)
        def with_progress(op: object, *args: Any, progress: bool = False, **kwargs: Any) -> R:
            if not progress:
                return routine(op, *args, **kwargs)
            bound = signature.bind(op, *args, **kwargs)
            bound.apply_defaults()
            expected = total(bound.arguments) if total is not None else None
            A = as_linear_operator(op)
            with products_with_progress(A, enable=True, total=expected, desc=desc) as counted:
                return routine(counted, *args, **kwargs)

        return with_progress

    return decorate
