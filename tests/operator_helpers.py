"""Helpers shared by the operator tests: building operators, data layouts, devices, errors."""

from __future__ import annotations

import functools

import pytest
import torch
from dense_reference import LIST_SPLIT, LOADER_BATCH, Case, get_case
from torch.utils.data import DataLoader, TensorDataset

from hessian_lab import EmpiricalFisherOperator, GGNOperator, HessianOperator

OPERATORS = ("hessian", "ggn", "fisher", "fisher_batch")
PSD_OPERATORS = ("ggn", "fisher", "fisher_batch")

CUDA = torch.cuda.is_available()
# CUDA variants are collected only where CUDA exists (not shown as skips elsewhere); the run's
# header says which devices were tested (tests/conftest.py).
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available())")

# Relative errors allowed against the float64 reference (issue 2, DESIGN.md §7).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Two float64 computations of the same quantity by different but exact routes (vmap vs a loop,
# cached vs recomputed) differ only by rounding: a few ulps times the depth of the computation.
SAME_TOL = 1e-12


def make_operator(name: str, model, loss_fn, data, params=None, **kwargs):
    """The operator called ``name`` (see OPERATORS)."""
    if name == "hessian":
        return HessianOperator(model, loss_fn, data, params, **kwargs)
    if name == "ggn":
        return GGNOperator(model, loss_fn, data, params, **kwargs)
    mode = "batch" if name == "fisher_batch" else "per_sample"
    return EmpiricalFisherOperator(model, loss_fn, data, params, mode=mode, **kwargs)


def split_batches(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The data as a list of batches of unequal sizes LIST_SPLIT."""
    return list(zip(x.split(list(LIST_SPLIT)), y.split(list(LIST_SPLIT)), strict=True))


def make_data(layout: str, x: torch.Tensor, y: torch.Tensor):
    """(data, cache option) for a layout name: one batch, a list, or a DataLoader."""
    if layout == "one":
        return (x, y), {}
    if layout.startswith("list"):
        data = split_batches(x, y)
    else:
        data = DataLoader(TensorDataset(x, y), batch_size=LOADER_BATCH, shuffle=False)
    cache = {"list-nocache": {"cache": False}, "loader-cache": {"cache": True}}.get(layout, {})
    return data, cache


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius), computed in float64 on the CPU."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm())


def dtype_of(name: str) -> torch.dtype:
    return {"float64": torch.float64, "float32": torch.float32}[name]


@functools.cache
def dense_operator(
    case: tuple[str, ...], op_name: str, dtype_name: str, device: str, cache: bool | None = None
):
    """(case, operator on one batch, its to_dense()) — built once and shared by several tests.

    ``cache=None`` is the operators' default (cached, with a ``torch.func.linearize`` trace per
    batch, ~0.2–1.5 s each on these models); ``cache=False`` recomputes with plain JVPs and is
    what the 72-case dense tests use to stay fast.
    """
    c: Case = get_case(*case)
    dtype = dtype_of(dtype_name)
    x, y = c.data_as(dtype, device)
    op = make_operator(op_name, c.model_as(dtype, device), c.loss_fn(), (x, y), cache=cache)
    return c, op, op.to_dense()


def normwise_err(got: torch.Tensor, ref: torch.Tensor, V: torch.Tensor) -> float:
    """‖got − R V‖ / (‖R‖₂ ‖V‖): the error of a product relative to the operator's scale.

    Used in float32, where a product with a near-null direction (e.g. G (Gᵀv) with Gᵀv ≈ 0)
    loses its relative accuracy to cancellation in the inner products, not to a bug.
    """
    ref = ref.cpu().double()
    want = ref @ V.cpu().double()
    norm2 = torch.linalg.matrix_norm(ref, ord=2)
    return float((got.cpu().double() - want).norm() / (norm2 * V.cpu().double().norm()))


def random_matrix(p: int, k: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p, k, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
