"""eigsh against dense references on matrices with known spectra."""

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from hessian_lab.linalg import eigsh

F64 = torch.float64
N = 300


def known_spectrum(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(lam) Qᵀ with a Haar-random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = lam.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    return (Q * lam) @ Q.T


def _g(seed):
    return torch.Generator().manual_seed(seed)


SPECTRA = {
    # Two tight clusters (spread 1e-3) around 1 and 5: resolving the members needs many steps.
    "clustered": torch.cat(
        [
            1 + 1e-3 * torch.rand(N // 2, dtype=F64, generator=_g(1)),
            5 + 1e-3 * torch.rand(N - N // 2, dtype=F64, generator=_g(2)),
        ]
    ),
    # A Hessian-like bulk with a few outliers at both ends.
    "outliers": torch.cat(
        [
            torch.tensor([-8.0, -3.0, 20.0, 30.0, 45.0, 100.0], dtype=F64),
            0.5 + 0.1 * torch.randn(N - 6, dtype=F64, generator=_g(3)),
        ]
    ),
    # Indefinite, half negative.
    "indefinite": torch.linspace(-10.0, 10.0, N, dtype=F64) + 0.01 * torch.rand(N, generator=_g(4)),
    # Rank 20 PSD: the rest of the spectrum is exactly zero.
    "rank_deficient": torch.cat(
        [torch.logspace(-1, 2, 20, dtype=F64), torch.zeros(N - 20, dtype=F64)]
    ),
}


def reference(lam: np.ndarray, k: int, which: str) -> np.ndarray:
    """The wanted eigenvalues in ascending order (scipy's convention), from the known spectrum."""
    s = np.sort(lam)
    if which == "LA":
        out = s[-k:]
    elif which == "SA":
        out = s[:k]
    elif which == "LM":
        out = s[np.argsort(-np.abs(s), kind="stable")[:k]]
    else:  # BE: k // 2 from the bottom, the rest from the top
        out = np.concatenate([s[: k // 2], s[len(s) - (k - k // 2) :]])
    return np.sort(out)


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_eigsh_matches_known_spectrum(name, which):
    lam = SPECTRA[name]
    A = known_spectrum(lam)
    k = 5
    res = eigsh(A, k=k, which=which, num_steps=N)
    ref = reference(lam.numpy(), k, which)
    vals = res.eigenvalues.numpy()
    assert res.converged.all(), res.residual_norms
    # 1e-8 relative to each eigenvalue; zero eigenvalues (rank-deficient) relative to ‖A‖.
    scale = np.maximum(np.abs(ref), np.abs(lam.numpy()).max() * 1e-6)
    np.testing.assert_array_less(np.abs(vals - ref), 1e-8 * scale)
    # Eigenvectors: unit norm, orthogonal, reported residuals are the true ones.
    V = res.eigenvectors
    assert V.shape == (N, k)
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=F64), atol=1e-10, rtol=0)
    true_res = torch.linalg.vector_norm(A @ V - V * res.eigenvalues, dim=0)
    torch.testing.assert_close(res.residual_norms, true_res, atol=1e-12, rtol=1e-6)


def test_default_step_budget_converges_on_outliers_and_is_cheaper_than_n():
    lam = SPECTRA["outliers"]
    A = known_spectrum(lam)
    res = eigsh(A, k=4, which="LA")
    assert res.converged.all() and res.num_steps < N
    np.testing.assert_allclose(res.eigenvalues.numpy(), [20.0, 30.0, 45.0, 100.0], rtol=1e-8)


def test_order_and_which_agree_with_scipy():
    lam = SPECTRA["indefinite"]
    A = known_spectrum(lam)
    for which in ["LA", "SA", "LM", "BE"]:
        ours = eigsh(A, k=6, which=which, num_steps=N).eigenvalues.numpy()
        theirs = sla.eigsh(A.numpy(), k=6, which=which, tol=1e-12)[0]
        np.testing.assert_allclose(ours, theirs, rtol=1e-8)  # both ascending


def test_float32_operator_accumulated_in_float64():
    lam = SPECTRA["outliers"]
    A32 = known_spectrum(lam).to(torch.float32)
    res = eigsh(A32, k=3, which="LA", accumulate_dtype=torch.float64)
    assert res.eigenvectors.dtype == F64 and res.converged.all()
    # The operator is exact only to float32 rounding: eigenvalues to ~1e-6 relative.
    np.testing.assert_allclose(res.eigenvalues.numpy(), [30.0, 45.0, 100.0], rtol=1e-5)


def test_unconverged_pairs_warn_and_are_flagged():
    lam = SPECTRA["clustered"]
    A = known_spectrum(lam)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = eigsh(A, k=4, which="LA", num_steps=12)
    assert not res.converged.all()
    assert res.num_steps == 12


def test_bad_arguments():
    A = torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match="which"):
        eigsh(A, k=2, which="SM")
    with pytest.raises(ValueError, match="k must"):
        eigsh(A, k=6)


def test_null_space_found_when_basis_nearly_fills_the_space():
    # Regression: restart vectors were rejected when fewer than 1/4 of the dimensions were left
    # (a fixed 0.5 norm threshold), so eigsh stopped with one copy of a multiple zero eigenvalue.
    n = 40
    lam = torch.cat([torch.zeros(10, dtype=F64), torch.linspace(1.0, 2.0, n - 10, dtype=F64)])
    A = known_spectrum(lam, seed=7)
    res = eigsh(A, k=6, which="SA", num_steps=n)
    assert res.converged.all()
    assert (res.eigenvalues.abs() < 1e-12).all(), res.eigenvalues
