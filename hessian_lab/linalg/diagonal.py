r"""Hutchinson's estimator of the diagonal of an operator (Bekas, Kokiopoulou & Saad 2007).

With Rademacher probes ``z`` (:math:`z_i^2 = 1`, :math:`E[z_i z_j] = \delta_{ij}`),

.. math::  E[z \odot A z]_i = \sum_j A_{ij} E[z_i z_j] = A_{ii},

with per-probe variance :math:`\sum_{j \ne i} A_{ij}^2` for entry ``i``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from hessian_lab.linalg.linear_operator import as_linear_operator, reports_progress
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


@reports_progress("Hutchinson diagonal", total=lambda a: a["num_probes"])
def hutchinson_diagonal(
    op: object, num_probes: int = 100, seed: int | None = 0, *, batch_size: int = 16
) -> DiagonalEstimate:
    r"""Estimate :math:`\operatorname{diag}(A)` as the mean of :math:`z \odot A z`.

    Running means and sums of squared deviations give the standard error without storing ``p``
    vectors of size ``n``.

    Args:
        op: Square linear-operator-like object.
        num_probes: Number of Rademacher probes ``p`` (= products); at least 2 for a standard error.
        seed: Seed of a :class:`torch.Generator` on the operator's device.
        batch_size: Probes per ``matmat`` call.

        progress: Show a progress bar counting the products (default ``False``).

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
    # Mean and sum of squared deviations merged batch by batch (Chan, Golub & LeVeque 1979):
    # stable where E[x²] - E[x]² would cancel, and exact zero variance stays zero.
    acc = torch.float64
    mean = torch.zeros(A.n, dtype=acc, device=A.device)
    m2 = torch.zeros_like(mean)
    done = 0
    while done < num_probes:
        b = min(batch_size, num_probes - done)
        Z = rademacher((A.n, b), generator=gen, dtype=A.dtype, device=A.device)
        X = (Z * A.matmat(Z)).to(acc)
        b_mean = X.mean(dim=1)
        b_m2 = ((X - b_mean[:, None]) ** 2).sum(dim=1)
        delta = b_mean - mean
        total = done + b
        mean = mean + delta * (b / total)
        m2 = m2 + b_m2 + delta * delta * (done * b / total)
        done = total
    p = num_probes
    if p > 1:
        se = torch.sqrt(m2 / (p - 1) / p)
    else:
        se = torch.full_like(mean, math.nan)
    return DiagonalEstimate(mean.to(A.dtype), se.to(A.dtype), p)
