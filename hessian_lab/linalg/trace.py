r"""Stochastic trace and squared-Frobenius-norm estimators.

With Rademacher probes ``z`` (:math:`E[z z^\top] = I`):

* Hutchinson (1989): :math:`\operatorname{tr} A = E[z^\top A z]`; variance
  :math:`2(\|A\|_F^2 - \sum_i A_{ii}^2)` per probe.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): project out a sketch of the top of the spectrum,
  :math:`\operatorname{tr} A = \operatorname{tr}(Q^\top A Q) + \operatorname{tr}((I - QQ^\top) A
  (I - QQ^\top))` with ``Q = orth(A S)``; the first term is exact, Hutchinson estimates the second,
  whose variance is small when the spectrum decays (``O(1/m²)`` error instead of ``O(1/m)`` for
  ``m`` products).
* :math:`\|A\|_F^2 = \operatorname{tr}(A^\top A) = E\|A z\|^2`.

Every estimator returns its standard error :math:`s/\sqrt{p}` (``s`` the sample standard deviation
over the ``p`` probe values), so a user can tell how many digits to trust. All of them are
:func:`~hessian_lab.linalg.monte_carlo.monte_carlo_estimate` with their integrand.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hessian_lab.linalg.linear_operator import as_linear_operator, reports_progress
from hessian_lab.linalg.monte_carlo import MonteCarloEstimate, monte_carlo_estimate
from hessian_lab.linalg.probes import make_generator, rademacher

__all__ = [
    "TraceEstimate",
    "hutchinson_squared_frobenius_norm",
    "hutchinson_trace",
    "hutchpp_trace",
]


class TraceEstimate(NamedTuple):
    """A stochastic estimate.

    Attributes:
        estimate: The estimate (float).
        standard_error: Standard error of the stochastic part, ``std(samples) / sqrt(p)``.
        samples: ``[p]`` per-probe values of the stochastic part (float64, CPU).
        num_matvecs: Products with the operator used.
    """

    estimate: float
    standard_error: float
    samples: torch.Tensor
    num_matvecs: int


def _trace_estimate(est: MonteCarloEstimate, offset: float = 0.0) -> TraceEstimate:
    """Package a scalar :class:`MonteCarloEstimate` (with samples) as a :class:`TraceEstimate`."""
    return TraceEstimate(
        offset + est.mean.item(), est.standard_error.item(), est.samples, est.num_probes
    )


@reports_progress("Hutchinson trace", total=lambda a: a["num_probes"])
def hutchinson_trace(
    op: object, num_probes: int = 100, seed: int | None = 0, *, batch_size: int = 16
) -> TraceEstimate:
    r"""Hutchinson's estimate of :math:`\operatorname{tr} A = E[z^\top A z]`, Rademacher ``z``.

    Args:
        op: Square linear-operator-like object.
        num_probes: Number of probes ``p`` (= products).
        seed: Seed of a :class:`torch.Generator` on the operator's device.
        batch_size: Probes per ``matmat`` call (memory vs. speed).
        progress: Show a progress bar counting the products (default ``False``).

    Returns:
        :class:`TraceEstimate` with the mean of :math:`z_i^\top A z_i` and its standard error.

    Example:
        >>> import torch
        >>> est = hutchinson_trace(torch.diag(torch.arange(10.0, dtype=torch.float64)))
        >>> est.estimate  # diagonal matrix: every probe is exact
        45.0
    """
    A = as_linear_operator(op)
    est = monte_carlo_estimate(
        A,
        lambda Z, AZ: (Z * AZ).sum(dim=0),
        num_probes,
        make_generator(A.device, seed),
        batch_size=batch_size,
        keep_samples=True,
    )
    return _trace_estimate(est)


@reports_progress("Hutchinson squared Frobenius norm", total=lambda a: a["num_probes"])
def hutchinson_squared_frobenius_norm(
    op: object, num_probes: int = 100, seed: int | None = 0, *, batch_size: int = 16
) -> TraceEstimate:
    r"""Estimate :math:`\|A\|_F^2 = E\|A z\|^2` with Rademacher ``z``.

    Args:
        op: Square linear-operator-like object.
        num_probes: Number of probes (= products).
        seed: Seed of a :class:`torch.Generator` on the operator's device.
        batch_size: Probes per ``matmat`` call.
        progress: Show a progress bar counting the products (default ``False``).
    """
    A = as_linear_operator(op)
    est = monte_carlo_estimate(
        A,
        lambda Z, AZ: (AZ * AZ).sum(dim=0),
        num_probes,
        make_generator(A.device, seed),
        batch_size=batch_size,
        keep_samples=True,
    )
    return _trace_estimate(est)


@reports_progress("Hutch++ trace", total=lambda a: a["num_matvecs"])
def hutchpp_trace(
    op: object, num_matvecs: int = 102, seed: int | None = 0, *, batch_size: int = 16
) -> TraceEstimate:
    r"""Hutch++ estimate of :math:`\operatorname{tr} A` (Meyer et al. 2021, Algorithm 1).

    The budget of ``m`` products is split in thirds: a sketch ``S`` of ``m/3`` Rademacher columns,
    ``Q = orth(A S)`` (``m/3`` products), the exact part :math:`\operatorname{tr}(Q^\top A Q)`
    (``m/3`` products) and Hutchinson on the deflated :math:`(I - QQ^\top) A (I - QQ^\top)` with
    the last ``m/3`` probes.

    Args:
        op: Square linear-operator-like object (symmetric not required).
        num_matvecs: Total products ``m`` (at least 3).
        seed: Seed of a :class:`torch.Generator` on the operator's device.
        batch_size: Probes per ``matmat`` call in the Hutchinson part.
        progress: Show a progress bar counting the products (default ``False``).

    Returns:
        :class:`TraceEstimate`; ``standard_error`` is that of the Hutchinson part given ``Q`` (the
        sketch part has no variance once ``Q`` is drawn), ``samples`` its per-probe values.
    """
    A = as_linear_operator(op)
    if num_matvecs < 3:
        raise ValueError(f"hutchpp_trace needs num_matvecs >= 3, got {num_matvecs}.")
    k = min(num_matvecs // 3, A.n)
    p = num_matvecs - 2 * k
    gen = make_generator(A.device, seed)
    S = rademacher((A.n, k), generator=gen, dtype=A.dtype, device=A.device)
    Q, _ = torch.linalg.qr(A.matmat(S))
    exact = torch.trace(Q.T @ A.matmat(Q)).to("cpu", torch.float64).item()
    # gᵀ(I-QQᵀ)A(I-QQᵀ)g = g'ᵀ A g' for the deflated probes g' = (I-QQᵀ)g.
    est = monte_carlo_estimate(
        A,
        lambda G, AG: (G * AG).sum(dim=0),
        p,
        gen,
        batch_size=batch_size,
        probe_map=lambda G: G - Q @ (Q.T @ G),
        keep_samples=True,
    )
    return TraceEstimate(exact + est.mean.item(), est.standard_error.item(), est.samples, 2 * k + p)
