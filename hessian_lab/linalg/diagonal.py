r"""Hutchinson's estimator of the diagonal of an operator (Bekas, Kokiopoulou & Saad 2007).

With Rademacher probes ``z`` (:math:`z_i^2 = 1`, :math:`E[z_i z_j] = \delta_{ij}`),

.. math::  E[z \odot A z]_i = \sum_j A_{ij} E[z_i z_j] = A_{ii},

with per-probe variance :math:`\sum_{j \ne i} A_{ij}^2` for entry ``i``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from hessian_lab.linalg.linear_operator import as_linear_operator
from hessian_lab.linalg.probes import make_generator, rademacher

__all__ = ["DiagonalEstimate", "hutchinson_diagonal"]


class DiagonalEstimate(NamedTuple):
    """Estimated diagonal.

    Attributes:
        estimate: ``[n]`` estimate of ``diag(A)``, on the operator's device and in its dtype.
        standard_error: ``[n]`` entrywise standard error ``std(ddof=1) / sqrt(p)``.
        num_matvecs: Products with the operator used.
    """

    estimate: torch.Tensor
    standard_error: torch.Tensor
    num_matvecs: int


def hutchinson_diagonal(
    op: object, num_probes: int = 100, seed: int | None = 0, *, batch_size: int = 16
) -> DiagonalEstimate:
    r"""Estimate :math:`\operatorname{diag}(A)` as the mean of :math:`z \odot A z`.

    Running sums of the samples and of their squares give the standard error without storing
    ``p`` vectors of size ``n``.

    Args:
        op: Square linear-operator-like object.
        num_probes: Number of Rademacher probes ``p`` (= products); at least 2 for a standard error.
        seed: Seed of a :class:`torch.Generator` on the operator's device.
        batch_size: Probes per ``matmat`` call.

    Returns:
        :class:`DiagonalEstimate`.

    Example:
        >>> import torch
        >>> d = hutchinson_diagonal(torch.diag(torch.arange(4.0)), num_probes=2).estimate
        >>> d.tolist()  # a diagonal operator is recovered exactly
        [0.0, 1.0, 2.0, 3.0]
    """
    A = as_linear_operator(op)
    gen = make_generator(A.device, seed)
    # Accumulate in float64 at least: the variance formula E[x²] - E[x]² cancels.
    acc = torch.float64 if A.dtype != torch.float64 else A.dtype
    total = torch.zeros(A.n, dtype=acc, device=A.device)
    total_sq = torch.zeros_like(total)
    done = 0
    while done < num_probes:
        b = min(batch_size, num_probes - done)
        Z = rademacher((A.n, b), generator=gen, dtype=A.dtype, device=A.device)
        X = (Z * A.matmat(Z)).to(acc)
        total += X.sum(dim=1)
        total_sq += (X * X).sum(dim=1)
        done += b
    p = num_probes
    mean = total / p
    if p > 1:
        var = (total_sq - p * mean * mean).clamp(min=0) / (p - 1)
        se = torch.sqrt(var / p)
    else:
        se = torch.full_like(mean, math.nan)
    return DiagonalEstimate(mean.to(A.dtype), se.to(A.dtype), p)
