r"""Monte-Carlo estimation with random probes: the mean of an integrand of ``z`` and ``A z``.

Every stochastic estimator of :mod:`hessian_lab.linalg` is an average over Rademacher probes ``z``
(:math:`E[z z^\top] = I`) of an integrand :math:`f(z, A_1 z, \dots, A_r z)`:

============================================  ==============================================
quantity                                      integrand (per probe)
============================================  ==============================================
:math:`\operatorname{tr} A` (Hutchinson)      :math:`z^\top A z`
:math:`\|A\|_F^2`                             :math:`\|A z\|^2`
:math:`\operatorname{diag} A`                 :math:`z \odot A z` (a vector)
Hutch++'s deflated part                       :math:`g^\top A g`, :math:`g = (I - QQ^\top) z`
:math:`\|A - B\|_F^2`, shared probes          :math:`\|A z - B z\|^2`
============================================  ==============================================

:func:`monte_carlo_estimate` draws the probes in blocks of ``batch_size`` columns (one ``matmat``
per operator and block), evaluates the integrand on each block and merges the blocks' means and
sums of squared deviations (Chan, Golub & LeVeque 1979) in float64: stable where
:math:`E[x^2] - E[x]^2` would cancel, and an exact integrand keeps a variance of exactly 0. The
standard error of the mean is :math:`s / \sqrt p` (``s`` the sample standard deviation over the
``p`` probes). Scalar integrands can keep their per-probe samples (for ratios of paired means,
for instance).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from hessian_lab.linalg.linear_operator import TorchLinearOperator, as_linear_operator
from hessian_lab.linalg.probes import rademacher

__all__ = ["MonteCarloEstimate", "monte_carlo_estimate"]

#: ``f(Z, A_1 Z, ..., A_r Z) -> [..., b]``: the integrand of each of the ``b`` probes (columns).
Integrand = Callable[..., torch.Tensor]


class MonteCarloEstimate(NamedTuple):
    """The mean of an integrand over random probes.

    Attributes:
        mean: Estimate of :math:`E f`, float64, of the integrand's shape without the probe axis
            (a 0-d tensor for a scalar integrand), on the operators' device.
        standard_error: Entrywise ``std(ddof=1) / sqrt(p)``, same shape (NaN for one probe).
        samples: ``[..., p]`` per-probe values (float64, CPU) if requested, else None.
        num_probes: ``p``.
    """

    mean: torch.Tensor
    standard_error: torch.Tensor
    samples: torch.Tensor | None
    num_probes: int


def monte_carlo_estimate(
    ops: object | Sequence[object],
    integrand: Integrand,
    num_probes: int,
    generator: torch.Generator,
    *,
    batch_size: int = 16,
    probe_dtype: torch.dtype | None = None,
    probe_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
    keep_samples: bool = False,
) -> MonteCarloEstimate:
    r"""Estimate :math:`E_z[f(z, A_1 z, \dots, A_r z)]` with Rademacher probes ``z``.

    Args:
        ops: One linear-operator-like object or a sequence of them (all of size ``n``); the
            probes are shared between them.
        integrand: ``f(Z, A_1 Z, ..., A_r Z)`` for a block ``Z`` of ``b`` probes ``[n, b]``,
            returning ``[..., b]`` (the probe axis last; ``[b]`` for a scalar integrand).
        num_probes: Number of probes ``p``.
        generator: Source of the probes; blocks ``[n, b]`` are drawn from it one after the other.
        batch_size: Probes per block (memory vs. speed).
        probe_dtype: Dtype of the probes; default the first operator's (products are taken in
            each operator's own dtype and come back in this one).
        probe_map: Applied to each block before the products (``Z ← probe_map(Z)``, e.g. the
            deflation :math:`(I - QQ^\top) Z` of Hutch++); the integrand sees the mapped block.
        keep_samples: Return the per-probe values (``[..., p]`` on the CPU).

    Returns:
        A :class:`MonteCarloEstimate`.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64))
        >>> gen = torch.Generator().manual_seed(0)
        >>> est = monte_carlo_estimate(A, lambda Z, AZ: (Z * AZ).sum(0), 8, gen)
        >>> est.mean.item()  # zᵀAz = tr A for every probe of a diagonal A
        10.0
    """
    single = not isinstance(ops, (list, tuple))
    lin: list[TorchLinearOperator] = [as_linear_operator(op) for op in ([ops] if single else ops)]
    if not lin:
        raise ValueError("monte_carlo_estimate needs at least one operator.")
    if num_probes < 1:
        raise ValueError(f"num_probes must be positive, got {num_probes}.")
    n, device = lin[0].n, lin[0].device
    if any(A.n != n for A in lin):
        raise ValueError(f"All operators must have the same size, got {[A.n for A in lin]}.")
    dtype = probe_dtype or lin[0].dtype
    acc = torch.float64
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    kept: list[torch.Tensor] = []
    done = 0
    while done < num_probes:
        b = min(batch_size, num_probes - done)
        Z = rademacher((n, b), generator=generator, dtype=dtype, device=device)
        if probe_map is not None:
            Z = probe_map(Z)
        X = integrand(Z, *(A.matmat(Z) for A in lin)).to(acc)
        if keep_samples:
            kept.append(X.cpu())
        # Merge the block's mean and sum of squared deviations into the running ones.
        b_mean = X.mean(dim=-1)
        b_m2 = ((X - b_mean.unsqueeze(-1)) ** 2).sum(dim=-1)
        if mean is None or m2 is None:
            mean, m2 = b_mean, b_m2
        else:
            delta = b_mean - mean
            total = done + b
            mean = mean + delta * (b / total)
            m2 = m2 + b_m2 + delta * delta * (done * b / total)
        done += b
    p = num_probes
    if p > 1:
        se = torch.sqrt(m2 / (p - 1) / p)
    else:
        se = torch.full_like(mean, math.nan)
    samples = torch.cat(kept, dim=-1) if keep_samples else None
    return MonteCarloEstimate(mean, se, samples, p)
