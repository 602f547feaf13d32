"""compare_operators on dense matrices with known eigenvectors."""

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch

from hessian_lab.linalg import COMPARE_COLUMNS, compare_operators

F64 = torch.float64
N, K = 150, 4


def haar(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    return Q


Q = haar(N, 0)
g = torch.Generator().manual_seed(1)
# A: PSD, four outliers. B: A plus a small symmetric perturbation. C: indefinite, with a top
# eigenspace that shares two directions with A's.
LAM_A = torch.cat(
    [torch.tensor([40.0, 30.0, 20.0, 10.0], dtype=F64), torch.rand(N - 4, generator=g, dtype=F64)]
)
A = (Q * LAM_A) @ Q.T
E = torch.randn(N, N, generator=g, dtype=F64)
B = A + 0.05 * (E + E.T)
Qc = Q.clone()
Qc[:, 2:4] = Q[:, 10:12]
Qc[:, 10:12] = Q[:, 2:4]
LAM_C = torch.cat(
    [
        torch.tensor([35.0, 25.0, 15.0, 12.0], dtype=F64),
        torch.linspace(-2.0, -0.5, 30, dtype=F64),
        torch.linspace(0.5, 1.0, N - 34, dtype=F64),
    ]
)
C = (Qc * LAM_C) @ Qc.T
OPS = {"A": A, "B": B, "C": C}


def top_vectors(M):
    _, V = torch.linalg.eigh(M)
    return V[:, -K:]


def value(df, metric, op, other=None, index=None):
    sel = (df.metric == metric) & (df.operator == op)
    if other is not None:
        sel &= df.other == other
    if index is not None:
        sel &= df["index"] == index
    rows = df[sel]
    assert len(rows) == 1, rows
    return rows.value.item(), rows.standard_error.item()


@pytest.fixture(scope="module")
def table():
    d = torch.randn(N, dtype=F64, generator=torch.Generator().manual_seed(5))
    return compare_operators(OPS, k=K, direction=d, num_probes=60, seed=0, slq_probes=20), d


def test_table_layout(table):
    df, _ = table
    assert list(df.columns) == COMPARE_COLUMNS
    assert set(df.metric) == {
        "eigenvalue",
        "eigenvalue_residual",
        "eigenspace_overlap",
        "principal_angle",
        "relative_frobenius_distance",
        "trace",
        "rayleigh_quotient",
        "negative_mass",
    }
    # Eigenvalues side by side: one pivot.
    wide = df[df.metric == "eigenvalue"].pivot(index="index", columns="operator", values="value")
    assert wide.shape == (K, 3)
    np.testing.assert_allclose(wide["A"].to_numpy(), [40.0, 30.0, 20.0, 10.0], rtol=1e-8)
    np.testing.assert_allclose(wide["C"].to_numpy(), [35.0, 25.0, 15.0, 12.0], rtol=1e-8)
    ref_b = torch.linalg.eigvalsh(B).flip(0)[:K].numpy()
    np.testing.assert_allclose(wide["B"].to_numpy(), ref_b, rtol=1e-8)
    # Pairwise metrics: every ordered pair, so pivots give full matrices.
    ov = df[df.metric == "eigenspace_overlap"].pivot(
        index="operator", columns="other", values="value"
    )
    assert ov.shape == (3, 3) and ov.isna().to_numpy().sum() == 3  # the diagonal
    assert pd.api.types.is_integer_dtype(df["index"])


def test_overlaps_and_angles_match_dense(table):
    df, _ = table
    V = {name: top_vectors(M) for name, M in OPS.items()}  # dense reference
    for a in OPS:
        for b in OPS:
            if a == b:
                continue
            exact = ((V[a].T @ V[b]) ** 2).sum().item() / K
            assert value(df, "eigenspace_overlap", a, b)[0] == pytest.approx(exact, abs=1e-8)
            angles = np.sort(scipy.linalg.subspace_angles(V[a].numpy(), V[b].numpy()))
            ours = [value(df, "principal_angle", a, b, i)[0] for i in range(K)]
            np.testing.assert_allclose(ours, angles, atol=1e-6)
    # A and C share exactly two of four top directions.
    assert value(df, "eigenspace_overlap", "A", "C")[0] == pytest.approx(0.5, abs=1e-8)


def test_frobenius_distances_traces_within_three_standard_errors(table):
    df, _ = table
    for a in OPS:
        tr, se = value(df, "trace", a)
        assert abs(tr - torch.trace(OPS[a]).item()) <= 3 * se
        for b in OPS:
            if a == b:
                continue
            exact = (torch.linalg.norm(OPS[a] - OPS[b]) / torch.linalg.norm(OPS[a])).item()
            est, se = value(df, "relative_frobenius_distance", a, b)
            assert se > 0 and abs(est - exact) <= 3 * se, (a, b, est, exact, se)


def test_rayleigh_quotients_and_negative_mass(table):
    df, d = table
    for name, M in OPS.items():
        exact = (d @ M @ d / (d @ d)).item()
        assert value(df, "rayleigh_quotient", name)[0] == pytest.approx(exact, rel=1e-12)
    # A and B are PSD up to the perturbation... A is exactly PSD: no negative mass.
    assert value(df, "negative_mass", "A")[0] == 0.0
    mass, se = value(df, "negative_mass", "C")
    assert abs(mass - 30 / N) <= 3 * se


def test_details_and_errors():
    df, details = compare_operators({"A": A}, k=2, num_probes=0, slq_probes=3, return_details=True)
    assert set(details) == {"eigsh", "density"} and details["eigsh"]["A"].eigenvalues.shape == (2,)
    assert set(df.metric) == {"eigenvalue", "eigenvalue_residual", "negative_mass"}
    with pytest.raises(ValueError, match="same size"):
        compare_operators({"A": A, "small": torch.eye(3, dtype=F64)}, k=2)
    with pytest.raises(ValueError, match="gradient"):
        compare_operators({"A": A}, k=2, direction="gradient")
