"""The one Monte-Carlo probe estimator behind the trace, Frobenius, diagonal, compare estimates."""

import math

import numpy as np
import pytest
import torch

from hessian_lab.linalg import (
    hutchinson_diagonal,
    hutchinson_squared_frobenius_norm,
    hutchinson_trace,
)
from hessian_lab.linalg.monte_carlo import monte_carlo_estimate
from hessian_lab.linalg.probes import make_generator

F64 = torch.float64
N = 60


def spd(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    return (Q * torch.linspace(0.5, 4.0, n, dtype=F64)) @ Q.T


def trace_integrand(Z, AZ):
    return (Z * AZ).sum(dim=0)


@pytest.mark.parametrize("batch_size", [1, 7, 16, 100])
def test_mean_and_standard_error_are_those_of_the_samples(batch_size):
    A = spd()
    p = 37
    est = monte_carlo_estimate(
        A,
        trace_integrand,
        p,
        torch.Generator().manual_seed(3),
        batch_size=batch_size,
        keep_samples=True,
    )
    x = est.samples.numpy()
    assert x.shape == (p,) and est.num_probes == p
    # Batch-merged mean and variance equal the two-pass ones over all samples.
    np.testing.assert_allclose(est.mean.item(), x.mean(), rtol=1e-13)
    np.testing.assert_allclose(est.standard_error.item(), x.std(ddof=1) / math.sqrt(p), rtol=1e-12)


def test_the_trace_estimators_are_this_estimator():
    A = spd()
    ref = monte_carlo_estimate(
        A, trace_integrand, 40, make_generator(A.device, 5), batch_size=16, keep_samples=True
    )
    tr = hutchinson_trace(A, num_probes=40, seed=5)
    assert torch.equal(tr.samples, ref.samples) and tr.estimate == ref.mean.item()
    fro = hutchinson_squared_frobenius_norm(A, num_probes=40, seed=5)
    ref = monte_carlo_estimate(
        A, lambda Z, AZ: (AZ * AZ).sum(0), 40, make_generator(A.device, 5), keep_samples=True
    )
    assert torch.equal(fro.samples, ref.samples)
    diag = hutchinson_diagonal(A, num_probes=40, seed=5)
    ref = monte_carlo_estimate(A, lambda Z, AZ: Z * AZ, 40, make_generator(A.device, 5))
    assert torch.equal(diag.estimate, ref.mean) and torch.equal(
        diag.standard_error, ref.standard_error
    )


def test_vector_integrand_and_exact_integrands():
    d = torch.linspace(-1.0, 3.0, N, dtype=F64)
    est = monte_carlo_estimate(
        torch.diag(d), lambda Z, AZ: Z * AZ, 9, torch.Generator(), batch_size=4
    )
    torch.testing.assert_close(est.mean, d, rtol=0, atol=0)  # z_i² = 1: exact, zero variance
    assert torch.equal(est.standard_error, torch.zeros(N, dtype=F64)) and est.samples is None
    one = monte_carlo_estimate(torch.diag(d), trace_integrand, 1, torch.Generator())
    assert one.mean.item() == pytest.approx(d.sum().item()) and math.isnan(one.standard_error)


def test_shared_probes_and_probe_map():
    A = spd()
    # Several operators see the same probes: ‖Az - 2Az‖² = ‖Az‖² probe by probe.
    est = monte_carlo_estimate(
        [A, 2 * A],
        lambda Z, AZ, BZ: torch.stack([(AZ * AZ).sum(0), ((AZ - BZ) ** 2).sum(0)]),
        20,
        torch.Generator().manual_seed(1),
        keep_samples=True,
    )
    torch.testing.assert_close(est.samples[0], est.samples[1], rtol=1e-14, atol=0)
    # The integrand and the products see the mapped probes.
    d = torch.arange(1.0, N + 1, dtype=F64)
    mapped = monte_carlo_estimate(
        torch.diag(d), trace_integrand, 5, torch.Generator(), probe_map=lambda Z: 2 * Z
    )
    assert mapped.mean.item() == 4 * d.sum().item()


def test_errors():
    with pytest.raises(ValueError, match="same size"):
        monte_carlo_estimate(
            [spd(), torch.eye(3, dtype=F64)], trace_integrand, 3, torch.Generator()
        )
    with pytest.raises(ValueError, match="num_probes"):
        monte_carlo_estimate(spd(), trace_integrand, 0, torch.Generator())
