"""Selective reorthogonalization (Parlett & Scott 1979) against dense references.

Every check compares with ``torch.linalg.eigh`` of the explicit matrix (float64) or with the
fully reorthogonalized recurrence, with tolerances derived from the working precision:

* Ritz values: a Ritz pair ``(θ_i, V s_i)`` of a semi-orthogonal Lanczos basis has an eigenvalue
  of ``A`` within its error bound :math:`b_i = \\beta_m |e_m^\\top s_i|` plus the rounding of
  ``m`` steps, :math:`m \\varepsilon \\|A\\|` (Paige; Simon 1984), so converged ones (``b_i``
  tiny) match the reference eigenvalues to :math:`m \\varepsilon \\|A\\|`; we allow 10 times that.
* semi-orthogonality: :math:`\\max |V^\\top V - I| \\le \\sqrt\\varepsilon`, the level Simon's
  analysis needs for ``T_m`` to be the projection of ``A`` to working precision.
"""

import math

import pytest
import torch

from hessian_lab.linalg import eigsh, lanczos, spectral_density
from hessian_lab.linalg.lanczos import (
    REORTHOGONALIZATION_MODES,
    LanczosRecurrence,
    batched_lanczos,
    reorthogonalization_mode,
    tridiagonal_eigh,
)
from hessian_lab.linalg.linear_operator import as_linear_operator

F64, F32 = torch.float64, torch.float32
N, M = 800, 100


def rotated(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """H diag(lam) H with a random Householder reflection H (dense, explicit, float64)."""
    u = torch.randn(lam.shape[0], dtype=F64, generator=torch.Generator().manual_seed(seed))
    u = u / torch.linalg.vector_norm(u)
    H = torch.eye(lam.shape[0], dtype=F64) - 2.0 * torch.outer(u, u)
    A = (H * lam) @ H
    return (A + A.T) / 2


def outlier_spectrum(n: int = N) -> torch.Tensor:
    """A GGN-like spectrum: a bulk crowded near 0 and 10 separated "class" outliers in [2, 20]."""
    bulk = 0.1 * torch.linspace(0.0, 1.0, n - 10, dtype=F64) ** 2
    return torch.cat([bulk, torch.logspace(math.log10(2.0), math.log10(20.0), 10, dtype=F64)])


def even_spectrum(n: int = N) -> torch.Tensor:
    """Evenly spread and indefinite: no Ritz value converges early."""
    return torch.linspace(-1.0, 1.0, n, dtype=F64)


def cluster_spectrum(n: int = N) -> torch.Tensor:
    """Two tight clusters of three outliers (gaps 1e-4 and 1e-3) above a bulk in [0, 1]."""
    bulk = torch.linspace(0.0, 1.0, n - 6, dtype=F64)
    tight = torch.arange(3, dtype=F64)
    return torch.cat([bulk, 10.0 + 1e-4 * tight, 20.0 + 1e-3 * tight])


SPECTRA = {"outliers": outlier_spectrum, "even": even_spectrum, "clusters": cluster_spectrum}


def run(A: torch.Tensor, mode: str, m: int = M, seed: int = 0) -> LanczosRecurrence:
    op = as_linear_operator(A)
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(op.n, 1, dtype=A.dtype, generator=gen)
    proc = LanczosRecurrence(op, v0, capacity=m, reorthogonalize=mode, keep_basis=True)
    proc.run(m)
    return proc


def ritz(proc: LanczosRecurrence) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values (ascending) and their error bounds β_m |e_mᵀ s_i|."""
    res = proc.result(0)
    theta, S = tridiagonal_eigh(res.alphas, res.betas)
    return theta, res.beta_last * S[-1].abs()


def max_loss_of_orthogonality(proc: LanczosRecurrence) -> float:
    V = proc.basis[0, : proc.m].double()
    return (V @ V.T - torch.eye(proc.m, dtype=F64)).abs().max().item()


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_selective_matches_dense_reference_and_stays_semi_orthogonal(spectrum, dtype):
    A = rotated(SPECTRA[spectrum]()).to(dtype)
    lam = torch.linalg.eigvalsh(A.double())  # the reference: eigh of the explicit matrix
    eps, anorm = torch.finfo(dtype).eps, lam.abs().max().item()
    rounding = 10 * M * eps * anorm
    proc = run(A, "selective")
    assert proc.m == M
    assert max_loss_of_orthogonality(proc) <= math.sqrt(eps)
    theta, bound = ritz(proc)
    # Every Ritz value has an eigenvalue within its error bound (plus rounding).
    nearest = (theta[:, None] - lam[None, :]).abs().min(dim=1).values
    assert bool(torch.all(nearest <= bound + rounding))
    # The extreme Ritz values: the top/bottom eigenvalues where they converged, and never
    # outside the spectrum (Cauchy interlacing, to rounding).
    assert theta.max() <= lam.max() + rounding and theta.min() >= lam.min() - rounding
    if spectrum == "outliers":  # the 10 outliers converge within M steps: one copy each
        torch.testing.assert_close(theta[-10:], lam[-10:], rtol=0, atol=rounding)
        for value in lam[-10:]:
            assert int(((theta - value).abs() <= 1e-3 * anorm).sum()) == 1
    elif spectrum == "clusters":  # each cluster member once (resolved to its bound), no ghosts
        assert bool(torch.all((theta[-6:] - lam[-6:]).abs() <= bound[-6:] + rounding))
        for centre in (10.0, 20.0):
            assert int(((theta - centre).abs() < 0.01).sum()) == 3
    else:  # both ends converge slowly; the bound says how far they are
        for i in (0, 1, -2, -1):
            assert abs(theta[i] - lam[i]) <= bound[i] + rounding
            assert abs(theta[i] - lam[i]) <= 0.05 * anorm
    # The same Ritz values as with full reorthogonalization where they converged.
    theta_full, bound_full = ritz(run(A, "full"))
    done = (bound <= math.sqrt(eps) * anorm) & (bound_full <= math.sqrt(eps) * anorm)
    assert bool(torch.all((theta - theta_full).abs()[done] <= rounding))


def test_selective_reads_a_fraction_of_the_basis_on_outliers_in_float64():
    # Few converged Ritz vectors, accurate products: the case selective orthogonalization is for.
    A = rotated(outlier_spectrum())
    full, part, sel = (run(A, mode) for mode in ("full", "partial", "selective"))
    assert sel.mode == "selective" and sel.switched_to_partial is None
    assert sel.ritz_vector_builds >= 1 and sel.ritz_checks <= M // 4
    # Once the 10 outliers converged, a step reads their 10 Ritz vectors twice (20 vectors)
    # where full reorthogonalization reads the j-vector basis twice.
    assert sel.basis_vector_reads < 0.25 * full.basis_vector_reads
    assert sel.basis_vector_reads < 0.8 * part.basis_vector_reads
    # Its good Ritz vectors are (near) eigenvectors of the 10 outliers, nothing of the bulk.
    Y = sel._ritz.double()
    assert 10 <= Y.shape[0] <= 16
    lam, Q = torch.linalg.eigh(A)
    assert torch.linalg.matrix_norm(Y @ Q[:, -10:]) ** 2 >= 10 - 1e-6


def test_selective_is_cheap_on_an_evenly_spread_spectrum():
    A = rotated(even_spectrum())
    full, sel = run(A, "full", m=150), run(A, "selective", m=150)
    assert max_loss_of_orthogonality(sel) <= math.sqrt(torch.finfo(F64).eps)
    assert sel.basis_vector_reads <= 0.1 * full.basis_vector_reads


def test_selective_hands_over_to_partial_when_most_ritz_values_converge():
    # 150 steps on 200 log-spaced eigenvalues: most Ritz values converge, the good set would
    # outgrow max(16, j/4) vectors, and Simon's ranges are cheaper from there on. The hand-over
    # reorthogonalizes against the whole basis once, so semi-orthogonality survives it.
    lam = torch.logspace(-3.0, 0.0, 200, dtype=F64)
    A = rotated(lam)
    eps = torch.finfo(F64).eps
    sel = run(A, "selective", m=150)
    assert sel.requested_mode == "selective" and sel.mode == "partial"
    assert sel.switched_to_partial is not None and 0 < sel.switched_to_partial < 150
    assert sel.num_good_ritz_vectors == 0
    assert max_loss_of_orthogonality(sel) <= math.sqrt(eps)
    theta, bound = ritz(sel)
    nearest = (theta[:, None] - lam[None, :]).abs().min(dim=1).values
    assert bool(torch.all(nearest <= bound + 10 * 150 * eps))


def test_selective_runs_partial_in_float32():
    # In float32, sqrt(eps)·||T|| = 3e-4·||T||: most Ritz values of a GGN-like spectrum pass the
    # convergence test, and the good set would be the basis. The mode is then "partial" from the
    # first step: the same numbers.
    A = rotated(outlier_spectrum()).to(F32)
    sel, part = run(A, "selective"), run(A, "partial")
    assert sel.requested_mode == "selective" and sel.mode == "partial"
    assert sel.switched_to_partial == 0
    torch.testing.assert_close(sel.result(0).alphas, part.result(0).alphas, rtol=0, atol=0)
    # Also with float64 vectors for a float32 operator: the products round at float32's eps,
    # Paige's gamma is eps_op·||T||, and the good set follows (or the process hands over).
    op = as_linear_operator(A)
    v0 = torch.randn(op.n, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    mixed = LanczosRecurrence(op, v0, capacity=M, reorthogonalize="selective", keep_basis=True)
    mixed.run(M)
    assert max_loss_of_orthogonality(mixed) <= math.sqrt(torch.finfo(F64).eps)


def test_selective_through_lanczos_spectral_density_and_batched_lanczos():
    A = rotated(outlier_spectrum(300))
    eps = torch.finfo(F64).eps
    v0 = torch.randn(300, dtype=F64, generator=torch.Generator().manual_seed(1))
    res = lanczos(A, 60, v0=v0, reorthogonalize="selective", return_basis=True)
    proc = run(A, "selective", m=60, seed=1)
    V = res.basis
    assert (V.T @ V - torch.eye(60, dtype=F64)).abs().max() <= math.sqrt(eps)
    # A V = V T + β_m v_{m+1} e_mᵀ holds to working precision with a semi-orthogonal basis.
    R = A @ V - V @ res.tridiagonal()
    # Removing the good Ritz vectors' components (≤ sqrt(eps)·β each) perturbs the relation by
    # that much, as partial reorthogonalization does (Simon 1984).
    assert torch.linalg.vector_norm(R[:, :-1]) <= math.sqrt(eps) * 20.0
    assert proc.mode == "selective"
    # Several columns run the batched monitor of "partial" (the same numbers).
    V0 = torch.randn(300, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    sel = batched_lanczos(A, V0, 40, reorthogonalize="selective")
    part = batched_lanczos(A, V0, 40, reorthogonalize="partial")
    for a, b in zip(sel, part, strict=True):
        assert torch.equal(a, b)
    # spectral_density passes the mode on: one probe per batch runs selective, several partial.
    # Nodes as with full reorthogonalization to m ε ‖A‖ (Weyl, T_m to working precision; the
    # probes depend on the batch size, so each is compared with full at the same one).
    m = 50
    for batch in (1, 4):
        kw = {"num_probes": 4, "num_steps": m, "probe_batch_size": batch}
        ref = spectral_density(A, **kw)
        sd = spectral_density(A, reorthogonalize="selective", **kw)
        assert (sd.nodes - ref.nodes).abs().max() <= m * eps * 20


def test_selective_after_breakdown_restarts_goes_on_as_partial():
    # Three distinct eigenvalues, multiplicity 100 each: breakdowns after steps 3, 6 and 9.
    lam = torch.tensor([1.0, 2.0, 5.0], dtype=F64).repeat(100)
    A = rotated(lam, seed=1)
    res = lanczos(A, 12, on_breakdown="restart", reorthogonalize="selective", return_basis=True)
    assert res.num_steps == 12 and int((res.betas == 0).sum()) == 3
    theta, _ = tridiagonal_eigh(res.alphas, res.betas)
    for value in (1.0, 2.0, 5.0):
        assert int(((theta - value).abs() < 1e-10).sum()) == 4
    V = res.basis
    assert (V.T @ V - torch.eye(12, dtype=F64)).abs().max() <= math.sqrt(torch.finfo(F64).eps)


def test_eigsh_keeps_full_reorthogonalization():
    # eigsh builds its Ritz vectors from the basis and takes no reorthogonalize argument.
    A = rotated(outlier_spectrum(200))
    with pytest.raises(TypeError):
        eigsh(A, k=2, reorthogonalize="selective")


@pytest.mark.parametrize("bad", ["Selective", "select", "", "full ", None, 1, 0.5])
def test_bad_reorthogonalize_values_name_the_valid_modes(bad):
    assert REORTHOGONALIZATION_MODES == ("full", "partial", "selective", "none")
    A = rotated(even_spectrum(50))
    for call in (
        lambda: reorthogonalization_mode(bad),
        lambda: lanczos(A, 5, reorthogonalize=bad),
        lambda: spectral_density(A, num_probes=1, num_steps=5, reorthogonalize=bad),
    ):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert all(repr(mode) in message for mode in REORTHOGONALIZATION_MODES)
        assert repr(bad) in message
