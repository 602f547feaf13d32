"""Every routine accepts dense tensors, numpy arrays, scipy operators and operator-like objects."""

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg as sla
import torch

from hessian_lab.linalg import (
    as_linear_operator,
    cg,
    eigsh,
    hutchinson_diagonal,
    hutchinson_trace,
    lanczos,
    spectral_density,
)

F64 = torch.float64
N = 60


def known_spectrum(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(lam) Qᵀ with a Haar-random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = lam.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    return (Q * lam) @ Q.T


LAM = torch.linspace(0.5, 3.0, N, dtype=F64)
A = known_spectrum(LAM)


class MatvecOnly:
    """Operator-like object with only a matvec (and torch attributes)."""

    def __init__(self, M):
        self.M, self.shape, self.dtype, self.device = M, tuple(M.shape), M.dtype, M.device

    def matvec(self, v):
        return self.M @ v


class MatmatOp(MatvecOnly):
    """Operator-like object with a matmat, as our curvature operators."""

    def matmat(self, V):
        assert V.dtype == self.dtype, "products must be taken in the operator's dtype"
        return self.M @ V


FORMS = {
    "tensor": lambda: A,
    "numpy": lambda: A.numpy(),
    "scipy_operator": lambda: sla.aslinearoperator(A.numpy()),
    "scipy_sparse": lambda: scipy.sparse.csr_matrix(A.numpy()),
    "matvec_only": lambda: MatvecOnly(A),
    "matmat": lambda: MatmatOp(A),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_adapter_products(form):
    op = as_linear_operator(FORMS[form]())
    assert op.shape == (N, N) and op.dtype == F64
    V = torch.randn(N, 3, dtype=F64)
    torch.testing.assert_close(op.matmat(V), A @ V)
    torch.testing.assert_close(op.matvec(V[:, 0]), A @ V[:, 0])
    # Products are returned in the caller's dtype (float32 in, float32 out).
    assert op.matmat(V.float()).dtype == torch.float32


@pytest.mark.parametrize("form", list(FORMS))
def test_all_routines_accept_each_form(form):
    op = FORMS[form]()
    top = eigsh(op, k=2, num_steps=N).eigenvalues
    np.testing.assert_allclose(top.numpy(), [LAM[-2].item(), 3.0], rtol=1e-8)
    b = torch.ones(N, dtype=F64)
    x, info = cg(op, b, tol=1e-12)
    assert info.converged
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=0)
    assert lanczos(op, 5).num_steps == 5
    assert spectral_density(op, 2, 10).num_probes == 2
    assert np.isfinite(hutchinson_trace(op, 4).estimate)
    assert hutchinson_diagonal(op, 4).estimate.shape == (N,)


def test_float32_operator_keeps_its_dtype():
    op = as_linear_operator(MatmatOp(A.float()))
    assert op.dtype == torch.float32
    # A float64 vector is cast to float32 for the product and back (MatmatOp asserts the dtype).
    out = op.matvec(torch.ones(N, dtype=F64))
    assert out.dtype == F64


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="square"):
        as_linear_operator(torch.ones(3, 4))
    with pytest.raises(ValueError, match="square"):
        as_linear_operator(np.ones((3, 4)))
    with pytest.raises(TypeError, match="matmat"):
        as_linear_operator("not an operator")
    # Integer matrices compute in float64.
    assert as_linear_operator(torch.eye(3, dtype=torch.long)).dtype == F64
