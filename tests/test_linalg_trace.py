"""Trace, squared Frobenius norm and diagonal estimators: within their own standard errors."""

import numpy as np
import pytest
import torch
from scipy.stats import binom, chi2

from hessian_lab.linalg import (
    hutchinson_diagonal,
    hutchinson_squared_frobenius_norm,
    hutchinson_trace,
    hutchpp_trace,
)

F64 = torch.float64
N = 200
SEEDS = range(10)


def known_spectrum(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(lam) Qᵀ with a Haar-random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = lam.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    return (Q * lam) @ Q.T


# Indefinite with a decaying tail: Hutch++ has something to deflate.
LAM = torch.cat(
    [
        torch.tensor([50.0, -30.0, 20.0, 10.0], dtype=F64),
        torch.randn(N - 4, dtype=F64, generator=torch.Generator().manual_seed(9)),
    ]
)
A = known_spectrum(LAM)


def check_calibrated(estimates, errors, truth):
    """Every |estimate - truth| ≤ 3 s.e., and the s.e. has the right scale.

    With correct standard errors the z-scores are ≈ N(0, 1), so Σ z² over the seeds is ≈ χ²
    with len(seeds) degrees of freedom; we accept its central 99.9% range. A standard error off by
    a factor of 2 (or of sqrt(p)) fails this.
    """
    z = (np.asarray(estimates) - truth) / np.asarray(errors)
    assert np.all(np.abs(z) <= 3), z
    k = len(z)
    assert chi2.ppf(5e-4, k) <= np.sum(z**2) <= chi2.ppf(1 - 5e-4, k), z


def test_hutchinson_trace_within_three_standard_errors():
    truth = torch.trace(A).item()
    runs = [hutchinson_trace(A, num_probes=100, seed=s) for s in SEEDS]
    check_calibrated([r.estimate for r in runs], [r.standard_error for r in runs], truth)
    assert runs[0].samples.shape == (100,) and runs[0].num_matvecs == 100
    # Variance per probe: 2 (‖A‖_F² - Σ A_ii²) for Rademacher probes.
    var = 2 * ((A**2).sum() - (A.diag() ** 2).sum()).item()
    se_pred = np.sqrt(var / 100)
    assert 0.7 * se_pred < np.mean([r.standard_error for r in runs]) < 1.3 * se_pred


def test_hutchpp_trace_within_three_standard_errors_and_beats_hutchinson():
    truth = torch.trace(A).item()
    runs = [hutchpp_trace(A, num_matvecs=99, seed=s) for s in SEEDS]
    check_calibrated([r.estimate for r in runs], [r.standard_error for r in runs], truth)
    assert runs[0].num_matvecs == 99
    # Same budget, but the four outliers are deflated exactly: a much smaller error.
    se_hutch = hutchinson_trace(A, num_probes=99, seed=0).standard_error
    assert np.mean([r.standard_error for r in runs]) < se_hutch / 2


def test_squared_frobenius_norm_within_three_standard_errors():
    truth = (A**2).sum().item()
    runs = [hutchinson_squared_frobenius_norm(A, num_probes=100, seed=s) for s in SEEDS]
    check_calibrated([r.estimate for r in runs], [r.standard_error for r in runs], truth)


def test_diagonal_operator_is_exact():
    d = torch.linspace(-1, 4, 30, dtype=F64)
    assert hutchinson_trace(torch.diag(d), num_probes=3).estimate == pytest.approx(d.sum().item())
    est = hutchinson_diagonal(torch.diag(d), num_probes=3)
    torch.testing.assert_close(est.estimate, d)
    assert (est.standard_error <= 1e-14 * d.abs().max()).all()  # zero up to rounding


def test_hutchinson_diagonal_within_three_standard_errors():
    p = 200
    est = hutchinson_diagonal(A, num_probes=p, seed=1, batch_size=64)
    assert est.estimate.shape == (N,) and est.num_matvecs == p
    z = ((est.estimate - A.diag()) / est.standard_error).numpy()
    # Each entry violates 3 s.e. with probability ≈ 0.0027 (t with 199 d.o.f.); allow the count
    # of violations a binomial tail of 1e-4.
    allowed = binom.ppf(1 - 1e-4, N, 0.0027)
    assert np.sum(np.abs(z) > 3) <= allowed
    k = N
    assert chi2.ppf(5e-4, k) <= np.sum(z**2) <= chi2.ppf(1 - 5e-4, k)


def test_seeded_and_batched_probes_agree():
    a = hutchinson_trace(A, num_probes=40, seed=7, batch_size=40).estimate
    b = hutchinson_trace(A, num_probes=40, seed=7, batch_size=40).estimate
    assert a == b
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchpp_trace(A, num_matvecs=2)
