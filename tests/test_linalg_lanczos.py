"""Lanczos: tridiagonal relation, orthogonality, ghosts without reorthogonalization, breakdown."""

import pytest
import torch

from hessian_lab.linalg import lanczos
from hessian_lab.linalg.lanczos import batched_lanczos, tridiagonal_eigh

F64 = torch.float64


def known_spectrum(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(lam) Qᵀ with a Haar-random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = lam.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    return (Q * lam) @ Q.T


def outlier_spectrum(n: int = 300) -> torch.Tensor:
    # Bulk in [0, 1] and one outlier at 100: the outlier converges within a few steps, after which
    # plain Lanczos loses orthogonality and produces copies of it.
    return torch.cat([torch.linspace(0, 1, n - 1, dtype=F64), torch.tensor([100.0], dtype=F64)])


def test_lanczos_relation_and_orthogonality():
    lam = outlier_spectrum()
    A = known_spectrum(lam)
    m = 60
    res = lanczos(A, m, return_basis=True, seed=3)
    V, T = res.basis, res.tridiagonal()
    assert V.shape == (300, m) and res.alphas.shape == (m,) and res.betas.shape == (m - 1,)
    # Orthonormal basis and T = Vᵀ A V to rounding.
    assert torch.allclose(V.T @ V, torch.eye(m, dtype=F64), atol=1e-13)
    assert torch.allclose(V.T @ A @ V, T, atol=1e-12 * 100)
    # A V = V T + beta_m v_{m+1} e_mᵀ: residual only in the last column, of norm beta_m.
    R = A @ V - V @ T
    assert torch.linalg.vector_norm(R[:, :-1]) < 1e-11
    assert abs(torch.linalg.vector_norm(R[:, -1]).item() - res.beta_last) < 1e-11


def test_no_ghosts_with_reorthogonalization_but_ghosts_without():
    lam = outlier_spectrum()
    A = known_spectrum(lam)
    counts = {}
    for reorth in (True, False):
        res = lanczos(A, 150, reorthogonalize=reorth, seed=0)
        theta, _ = tridiagonal_eigh(res.alphas, res.betas)
        # Ritz values within 1e-6 of the single outlier: one is the truth, more are ghosts.
        counts[reorth] = int(((theta - 100.0).abs() < 1e-6).sum())
        # Ritz values stay inside the spectrum's hull in both cases (Cauchy interlacing).
        assert theta.min() > -1e-10 and theta.max() < 100 + 1e-10
    assert counts[True] == 1
    assert counts[False] >= 2, "plain Lanczos should show ghost copies of the outlier"


def test_breakdown_stop_gives_exact_distinct_eigenvalues():
    # Three distinct eigenvalues, each with multiplicity 100: the Krylov space has dimension 3.
    lam = torch.tensor([1.0, 2.0, 5.0], dtype=F64).repeat(100)
    A = known_spectrum(lam, seed=1)
    res = lanczos(A, 20)
    assert res.num_steps == 3 and res.breakdowns == [2] and res.beta_last == 0.0
    theta, _ = tridiagonal_eigh(res.alphas, res.betas)
    torch.testing.assert_close(theta, torch.tensor([1.0, 2.0, 5.0], dtype=F64), rtol=1e-12, atol=0)


def test_breakdown_restart_finds_multiplicities():
    lam = torch.tensor([1.0, 2.0, 5.0], dtype=F64).repeat(100)
    A = known_spectrum(lam, seed=1)
    res = lanczos(A, 12, on_breakdown="restart", return_basis=True)
    assert res.num_steps == 12
    assert (res.betas == 0).sum() == 3  # restarts after steps 3, 6 and 9
    theta, _ = tridiagonal_eigh(res.alphas, res.betas)
    # Each restart block finds each eigenvalue once more; the basis stays orthonormal.
    for value in (1.0, 2.0, 5.0):
        assert int(((theta - value).abs() < 1e-10).sum()) == 4
    V = res.basis
    assert torch.allclose(V.T @ V, torch.eye(12, dtype=F64), atol=1e-13)


def test_v0_and_seed_determinism():
    A = known_spectrum(torch.linspace(-1, 3, 50, dtype=F64))
    r1, r2, r3 = lanczos(A, 10, seed=5), lanczos(A, 10, seed=5), lanczos(A, 10, seed=6)
    assert torch.equal(r1.alphas, r2.alphas) and not torch.equal(r1.alphas, r3.alphas)
    v0 = torch.zeros(50, dtype=F64)
    v0[0] = 2.0  # normalized inside
    r = lanczos(A, 5, v0=v0, return_basis=True)
    torch.testing.assert_close(r.basis[:, 0], v0 / 2)
    torch.testing.assert_close(r.alphas[0], A[0, 0])
    with pytest.raises(ValueError, match="nonzero"):
        lanczos(A, 5, v0=torch.zeros(50, dtype=F64))
    with pytest.raises(ValueError, match="entries"):
        lanczos(A, 5, v0=torch.ones(49, dtype=F64))


def test_float32_operator_with_float64_accumulation():
    lam = torch.cat([torch.linspace(0.1, 1, 199, dtype=F64), torch.tensor([10.0], dtype=F64)])
    A32 = known_spectrum(lam).to(torch.float32)
    res = lanczos(A32, 40, accumulate_dtype=torch.float64, return_basis=True)
    assert res.alphas.dtype == F64 and res.basis.dtype == F64
    theta, _ = tridiagonal_eigh(res.alphas, res.betas)
    # The top eigenvalue to the float32 rounding of the operator itself.
    assert abs(theta[-1].item() - 10.0) < 1e-5 * 10
    V = res.basis
    assert torch.allclose(V.T @ V, torch.eye(40, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("reorth", [True, False])
def test_batched_lanczos_matches_one_process_per_column(reorth):
    lam = outlier_spectrum(120)
    A = known_spectrum(lam)
    V0 = torch.randn(120, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    # Plain Lanczos is forward-unstable once the outlier's Ritz value converges (Paige): two
    # implementations that round differently agree only on the steps before that.
    m = 30 if reorth else 6
    alphas, betas, lengths = batched_lanczos(A, V0, m, reorthogonalize=reorth)
    assert alphas.shape == (3, m) and betas.shape == (3, m - 1) and lengths.tolist() == [m] * 3
    for c in range(3):
        ref = lanczos(A, m, v0=V0[:, c], reorthogonalize=reorth)
        torch.testing.assert_close(alphas[c], ref.alphas, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(betas[c], ref.betas, rtol=1e-9, atol=1e-9)


def test_batched_lanczos_columns_break_down_independently():
    # Column 0 starts in a 2-dimensional invariant subspace, column 1 is generic.
    lam = torch.linspace(1.0, 5.0, 50, dtype=F64)
    A = torch.diag(lam)
    V0 = torch.zeros(50, 2, dtype=F64)
    V0[:2, 0] = 1.0
    V0[:, 1] = 1.0
    alphas, betas, lengths = batched_lanczos(A, V0, 10)
    assert lengths.tolist() == [2, 10]
    assert (alphas[0, 2:] == 0).all() and (betas[0, 1:] == 0).all()
    theta, _ = tridiagonal_eigh(alphas[0, :2], betas[0, :1])
    torch.testing.assert_close(theta, lam[:2])
