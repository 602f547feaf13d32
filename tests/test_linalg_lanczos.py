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


# Partial reorthogonalization (Simon 1984) and the one recurrence behind every Lanczos routine.


def _recurrence(A, m, mode, seed=0, dtype=F64):
    from hessian_lab.linalg.lanczos import LanczosRecurrence
    from hessian_lab.linalg.linear_operator import as_linear_operator

    op = as_linear_operator(A)
    v0 = torch.randn(op.n, 1, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    proc = LanczosRecurrence(op, v0, capacity=m, reorthogonalize=mode, keep_basis=True)
    proc.run(m)
    return proc


def test_boolean_modes_are_the_named_ones():
    A = known_spectrum(outlier_spectrum(120))
    for flag, name in ((True, "full"), (False, "none")):
        a, b = lanczos(A, 40, reorthogonalize=flag), lanczos(A, 40, reorthogonalize=name)
        assert torch.equal(a.alphas, b.alphas) and torch.equal(a.betas, b.betas)
    with pytest.raises(ValueError, match="reorthogonalize"):
        lanczos(A, 5, reorthogonalize="bogus")


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_partial_reorthogonalization_is_semi_orthogonal_and_ghost_free(dtype):
    # The outlier converges within a few steps, so orthogonality is lost fast: the hardest case.
    lam = outlier_spectrum()
    A = known_spectrum(lam).to(dtype)
    m, eps = 150, torch.finfo(dtype).eps
    full, part = _recurrence(A, m, "full", dtype=dtype), _recurrence(A, m, "partial", dtype=dtype)
    V = part.basis[0].double()
    # Semi-orthogonality, the property Simon's analysis needs: |v_iᵀ v_k| <= sqrt(eps).
    assert (V @ V.T - torch.eye(m, dtype=F64)).abs().max() <= eps**0.5
    # Then T_m is the projection of A to working precision: the same Ritz values as with full
    # reorthogonalization, up to the rounding of m steps (m eps ||A||), and one copy of 100.
    res_f, res_p = full.result(0), part.result(0)
    theta_f, _ = tridiagonal_eigh(res_f.alphas, res_f.betas)
    theta_p, _ = tridiagonal_eigh(res_p.alphas, res_p.betas)
    assert (theta_p - theta_f).abs().max() <= m * eps * 100.0
    assert int(((theta_p - 100.0).abs() < 1e-6 * 100).sum()) == 1
    # And it reorthogonalized fewer steps than full reorthogonalization.
    assert part.reorthogonalized_steps < full.reorthogonalized_steps == m


def test_partial_reorthogonalization_is_cheap_without_outliers():
    # An evenly spread spectrum: no Ritz value converges early, orthogonality decays slowly.
    A = known_spectrum(torch.linspace(-10.0, 10.0, 300, dtype=F64))
    m = 150
    part = _recurrence(A, m, "partial")
    V = part.basis[0]
    assert (V @ V.T - torch.eye(m, dtype=F64)).abs().max() <= torch.finfo(F64).eps ** 0.5
    assert part.reorthogonalized_steps <= m // 10


def test_partial_reorthogonalization_in_lanczos_and_batched_lanczos():
    A = known_spectrum(outlier_spectrum(120))
    V0 = torch.randn(120, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    m = 30
    alphas, betas, lengths = batched_lanczos(A, V0, m, reorthogonalize="partial")
    for c in range(3):
        ref = lanczos(A, m, v0=V0[:, c], reorthogonalize="partial")
        torch.testing.assert_close(alphas[c], ref.alphas, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(betas[c], ref.betas, rtol=1e-9, atol=1e-9)
    # Restarts after breakdowns need a basis, which partial reorthogonalization keeps.
    lam = torch.tensor([1.0, 2.0, 5.0], dtype=F64).repeat(100)
    res = lanczos(
        known_spectrum(lam, seed=1), 12, on_breakdown="restart", reorthogonalize="partial"
    )
    assert res.num_steps == 12 and (res.betas == 0).sum() == 3


def test_every_lanczos_routine_runs_the_one_recurrence(monkeypatch):
    import sys

    from hessian_lab.linalg import eigsh, spectral_density

    module = sys.modules["hessian_lab.linalg.lanczos"]
    calls = []
    step = module.LanczosRecurrence._step

    def counted(self):
        calls.append(self.p)
        step(self)

    monkeypatch.setattr(module.LanczosRecurrence, "_step", counted)
    A = known_spectrum(outlier_spectrum(60))
    for run, p in (
        (lambda: lanczos(A, 5), 1),
        (lambda: eigsh(A, k=1, num_steps=20, warn=False), 1),
        (lambda: spectral_density(A, num_probes=3, num_steps=5), 3),
        (lambda: batched_lanczos(A, torch.ones(60, 2, dtype=F64), 5), 2),
    ):
        calls.clear()
        run()
        assert calls and set(calls) == {p}
