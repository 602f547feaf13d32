"""Conjugate gradients against torch.linalg.solve and scipy's cg; negative curvature."""

import pytest
import scipy.sparse.linalg as sla
import torch

from hessian_lab.linalg import cg

F64 = torch.float64
N = 120


def known_spectrum(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(lam) Qᵀ with a Haar-random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = lam.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    return (Q * lam) @ Q.T


SPD = known_spectrum(torch.logspace(-2, 1, N, dtype=F64))  # condition number 1e3
INDEFINITE = known_spectrum(torch.linspace(-1.0, 5.0, N, dtype=F64), seed=1)
RHS = torch.randn(N, 3, dtype=F64, generator=torch.Generator().manual_seed(2))


def rel_err(x, y):
    return (torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y)).item()


def test_single_rhs_matches_solve_and_scipy():
    b = RHS[:, 0]
    x, info = cg(SPD, b, tol=1e-12)
    ref = torch.linalg.solve(SPD, b)
    assert info.converged and info.stop_reason == "converged" and not info.negative_curvature
    assert rel_err(x, ref) < 1e-8
    xs, code = sla.cg(SPD.numpy(), b.numpy(), rtol=1e-12, maxiter=10 * N)
    assert code == 0
    assert rel_err(x, torch.from_numpy(xs)) < 1e-8
    # Histories: start + one entry per iteration; the model decreases monotonically (SPD).
    assert info.residual_norms.shape == (info.iterations + 1,)
    assert info.residual_norms[-1] <= 1e-12 * torch.linalg.vector_norm(b)
    qm = info.quadratic_model
    assert qm[0] == 0 and (qm[1:] <= qm[:-1] + 1e-12).all()
    # Final model value: φ(x*) = -½ bᵀx*.
    assert qm[-1].item() == pytest.approx(-0.5 * (b @ ref).item(), rel=1e-10)


def test_several_rhs_with_damping_are_independent():
    lam = 0.3
    X, info = cg(SPD, RHS, damping=lam, tol=1e-12)
    ref = torch.linalg.solve(SPD + lam * torch.eye(N, dtype=F64), RHS)
    assert X.shape == (N, 3) and info.converged.all()
    for j in range(3):
        assert rel_err(X[:, j], ref[:, j]) < 1e-8
        # Same as solving column j alone: columns do not interact. The iteration counts may differ
        # by rounding (a [N, 3] product rounds unlike an [N, 1] one; the residual before the last
        # iteration is only 1.3x the threshold for column 2): ±1 in 4% of runs with products
        # perturbed by 1e-16 relative, never more than ±1 at 1e-14 (issue 9).
        xj, info_j = cg(SPD, RHS[:, j], damping=lam, tol=1e-12)
        assert abs(info_j.iterations - int(info.iterations[j])) <= 2
        assert rel_err(X[:, j], xj) < 1e-10
    assert info.residual_norms.shape == (int(info.iterations.max()) + 1, 3)


def test_scipy_cg_on_scipy_operator_reaches_same_solution():
    # The check: scipy's cg on a scipy LinearOperator (our adapter's other direction).
    op = sla.aslinearoperator(SPD.numpy())
    b = RHS[:, 1].numpy()
    xs, code = sla.cg(op, b, rtol=1e-12, maxiter=10 * N)
    x, info = cg(op, b, tol=1e-12)  # scipy operator and numpy rhs accepted
    assert code == 0 and info.converged
    assert rel_err(x, torch.from_numpy(xs)) < 1e-8


def test_x0_and_preconditioner():
    b = RHS[:, 2]
    ref = torch.linalg.solve(SPD, b)
    x0 = ref + 1e-3 * torch.ones(N, dtype=F64)
    x, info = cg(SPD, b, x0=x0, tol=1e-12)
    assert rel_err(x, ref) < 1e-8
    # Starting near the solution needs fewer iterations than from zero.
    assert info.iterations < cg(SPD, b, tol=1e-12)[1].iterations
    # Exact inverse as preconditioner: one iteration.
    inv = torch.linalg.inv(SPD)
    x, info = cg(SPD, b, tol=1e-10, preconditioner=lambda R: inv @ R)
    assert info.iterations == 1 and rel_err(x, ref) < 1e-8
    # Jacobi preconditioner given as an operator-like object (a dense tensor).
    x, info = cg(SPD, b, tol=1e-12, preconditioner=torch.diag(1 / SPD.diag()))
    assert info.converged and rel_err(x, ref) < 1e-8


def test_negative_curvature_detected_instead_of_diverging():
    X, info = cg(INDEFINITE, RHS, tol=1e-12)
    assert info.negative_curvature.all()
    assert info.stop_reason == ["negative_curvature"] * 3
    assert not info.converged.any()
    P = info.negative_curvature_direction
    curv = (P * (INDEFINITE @ P)).sum(0) / (P * P).sum(0)
    torch.testing.assert_close(curv, info.curvature)
    assert (curv <= 0).all()
    assert torch.isfinite(X).all()
    # Damping beyond |λ_min| = 1 makes the system positive definite: CG converges again.
    X, info = cg(INDEFINITE, RHS, damping=1.5, tol=1e-12)
    assert info.converged.all() and not info.negative_curvature.any()
    assert info.negative_curvature_direction is None
    ref = torch.linalg.solve(INDEFINITE + 1.5 * torch.eye(N, dtype=F64), RHS)
    assert rel_err(X, ref) < 1e-8


def test_negative_curvature_at_first_iteration_keeps_x0():
    A = torch.diag(torch.tensor([-1.0, 2.0], dtype=F64))
    x, info = cg(A, torch.tensor([1.0, 0.0], dtype=F64))
    assert info.negative_curvature and info.iterations == 0
    assert torch.equal(x, torch.zeros(2, dtype=F64))
    assert info.curvature == pytest.approx(-1.0)


def test_martens_stopping_stops_early_with_small_model_loss():
    # Slowly converging system: Martens' rule stops when φ stops improving by > k·ε relatively.
    A = known_spectrum(torch.logspace(-4, 1, N, dtype=F64), seed=3)
    b = RHS[:, 0]
    x_r, info_r = cg(A, b, tol=1e-12)
    x_m, info_m = cg(A, b, tol=1e-12, stopping="martens")
    assert info_m.stop_reason == "martens"
    assert info_m.iterations < info_r.iterations
    # At the stop, the model value is within the rule's relative progress of the optimum.
    phi_opt, phi_m = info_r.quadratic_model[-1].item(), info_m.quadratic_model[-1].item()
    assert phi_m < 0 and (phi_m - phi_opt) / abs(phi_opt) < 0.05


def test_callback_maxiter_and_zero_rhs():
    seen = []
    x, info = cg(SPD, RHS[:, 0], maxiter=5, callback=lambda x: seen.append(x.clone()))
    assert info.iterations == 5 and info.stop_reason == "maxiter" and not info.converged
    assert len(seen) == 5 and torch.equal(seen[-1], x)
    x, info = cg(SPD, torch.zeros(N, dtype=F64))
    assert info.converged and info.iterations == 0 and (x == 0).all()
    with pytest.raises(ValueError, match="stopping"):
        cg(SPD, RHS[:, 0], stopping="never")
    with pytest.raises(ValueError, match="shape"):
        cg(SPD, torch.ones(N + 1, dtype=F64))
