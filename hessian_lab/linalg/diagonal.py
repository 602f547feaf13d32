r"""Hutchinson's estimator of the diagonal of an operator (Bekas, Kokiopoulou & Saad 2007).

With Rademacher probes ``z`` (:math:`z_i^2 = 1`, :math:`E[z_i z_j] = \delta_{ij}`),

.. math::  E[z \odot A z]_i = \sum_j A_{ij} E[z_i z_j] = A_{ii},

with per-probe variance :math:`\sum_{j \ne i} A_{ij}^2` for entry ``i``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hessian_lab.linalg.linear_operator import as_linear_operator, reports_progress
from hessian_lab.linalg.monte_carlo import monte_carlo_estimate
from hessian_lab.linalg.probes import make_generator

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

    The integrand :math:`z \odot A z` of
    :func:`~hessian_lab.linalg.monte_carlo.monte_carlo_estimate`, whose batch-merged means and
    sums of squared deviations give the standard error without storing ``p`` vectors of size
    ``n``.

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
    est = monte_carlo_estimate(
        A, lambda Z, AZ: Z * AZ, num_probes, make_generator(A.device, seed), batch_size=batch_size
    )
    return DiagonalEstimate(est.mean.to(A.dtype), est.standard_error.to(A.dtype), num_probes)
