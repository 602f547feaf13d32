"""Layer 4 on the curvature operators of a tiny model, against their dense matrices."""

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn

from hessian_lab.linalg import cg, compare_operators, eigsh, spectral_density
from hessian_lab.operators import EmpiricalFisherOperator, GGNOperator, HessianOperator

F64 = torch.float64


@pytest.fixture(scope="module")
def operators():
    torch.manual_seed(0)
    # Tanh MLP with cross-entropy: the Hessian's second term makes it indefinite.
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    X = torch.randn(40, 5, dtype=F64)
    y = torch.randint(0, 3, (40,))
    loss = nn.CrossEntropyLoss()
    ops = {
        "H": HessianOperator(model, loss, (X, y)),
        "Q": GGNOperator(model, loss, (X, y)),
        "GN": EmpiricalFisherOperator(model, loss, (X, y)),
    }
    dense = {name: op.to_dense() for name, op in ops.items()}
    return ops, dense


def test_eigsh_on_operators_matches_dense(operators):
    ops, dense = operators
    for name, op in ops.items():
        ref = torch.linalg.eigvalsh(dense[name])
        scale = ref.abs().max().item()
        cases = [("LA", ref[-4:])] + ([("SA", ref[:4])] if name != "GN" else [])
        for which, want in cases:
            res = eigsh(op, k=4, which=which, num_steps=op.shape[0])
            assert res.eigenvectors.shape == (op.shape[0], 4)
            # Relative to each eigenvalue, with ‖A‖ as the scale for the (near-)zero ones
            # (Q and GN are rank-deficient: rank ≤ N·C and ≤ N).
            err = (res.eigenvalues - want).abs()
            assert (err <= 1e-8 * torch.clamp(want.abs(), min=1e-6 * scale)).all(), (name, which)


def test_compare_operators_on_operators_matches_dense(operators):
    ops, dense = operators
    k = 3
    df = compare_operators(
        ops, k=k, direction="gradient", num_probes=40, seed=0, slq_probes=4, slq_steps=30
    )
    G = ops["H"].gradient()
    tops = {}
    for name, M in dense.items():
        vals, vecs = torch.linalg.eigh(M)
        tops[name] = vecs[:, -k:]
        ours = df[(df.metric == "eigenvalue") & (df.operator == name)].sort_values("index")
        np.testing.assert_allclose(ours.value.to_numpy(), vals.flip(0)[:k].numpy(), rtol=1e-8)
        rq = df[(df.metric == "rayleigh_quotient") & (df.operator == name)].value.item()
        assert rq == pytest.approx((G @ M @ G / (G @ G)).item(), rel=1e-10)
        tr = df[(df.metric == "trace") & (df.operator == name)]
        assert abs(tr.value.item() - torch.trace(M).item()) <= 3 * tr.standard_error.item()
    for a in dense:
        for b in dense:
            if a == b:
                continue
            row = df[(df.metric == "eigenspace_overlap") & (df.operator == a) & (df.other == b)]
            exact = ((tops[a].T @ tops[b]) ** 2).sum().item() / k
            assert row.value.item() == pytest.approx(exact, abs=1e-7)
            row = df[
                (df.metric == "relative_frobenius_distance") & (df.operator == a) & (df.other == b)
            ]
            exact = (torch.linalg.norm(dense[a] - dense[b]) / torch.linalg.norm(dense[a])).item()
            assert abs(row.value.item() - exact) <= 3 * row.standard_error.item()
    # Q and GN are PSD: no negative mass; H has some.
    neg = df[df.metric == "negative_mass"].set_index("operator").value
    assert neg["Q"] == 0.0 and neg["GN"] == 0.0
    assert torch.linalg.eigvalsh(dense["H"]).min() < 0 and neg["H"] > 0


def test_cg_on_indefinite_hessian_reports_negative_curvature(operators):
    ops, dense = operators
    H = dense["H"]
    assert torch.linalg.eigvalsh(H).min() < 0  # precondition: H is indefinite here
    G = ops["H"].gradient()
    x, info = cg(ops["H"], G, tol=1e-12)
    assert info.negative_curvature and info.stop_reason == "negative_curvature"
    p = info.negative_curvature_direction
    assert (p @ H @ p).item() <= 0
    assert info.curvature == pytest.approx((p @ H @ p / (p @ p)).item(), rel=1e-8)
    # On the GGN (PSD, damped) CG solves the system like torch.linalg.solve.
    lam = 1e-3
    x, info = cg(ops["Q"], G, damping=lam, tol=1e-12, maxiter=2000)
    ref = torch.linalg.solve(dense["Q"] + lam * torch.eye(H.shape[0], dtype=F64), G)
    assert info.converged
    assert (torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref)).item() < 1e-8
    # scipy's cg on the operator's scipy view reaches the same solution.
    damped = ops["Q"].to_scipy() + lam * sla.aslinearoperator(np.eye(H.shape[0]))
    xs, code = sla.cg(damped, G.numpy(), rtol=1e-12, maxiter=2000)
    assert code == 0
    assert np.linalg.norm(xs - x.numpy()) / np.linalg.norm(xs) < 1e-8


def test_spectral_density_and_scipy_view(operators):
    ops, dense = operators
    sd = spectral_density(ops["Q"], num_probes=3, num_steps=20)
    assert sd.nodes.min() >= -1e-10  # PSD: Ritz values inside the hull
    # scipy's view of the operator works with our routines too.
    res = eigsh(ops["H"].to_scipy(), k=2, num_steps=ops["H"].shape[0])
    ref = torch.linalg.eigvalsh(dense["H"])[-2:]
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-8, atol=0)
