"""H, Q (GGN) and GN (empirical Fisher) against dense float64 references (issue 2, item 3).

Matrix: MLP, CNN, residual CNN, ViT (LayerNorm) × relu/sigmoid/tanh × CE/MSE/BCE × mean/sum.
All 72 cases are compared as dense matrices on one batch (``cache=False``: plain JVPs). The
default cached path (a ``torch.func.linearize`` trace per batch, which costs 0.2–1.5 s on these
tiny models), several batches (list and DataLoader, cached and streamed), float32 and the scipy
view run on 24 cases that rotate the activation over (model, loss, reduction), so that each
activation appears 8 times and every model meets every loss and reduction.
"""

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from dense_reference import NUM_EXAMPLES, all_cases, case_id, get_case, rotated_cases
from operator_helpers import (
    DEVICES,
    OPERATORS,
    PSD_OPERATORS,
    SAME_TOL,
    TOL,
    dense_operator,
    make_data,
    make_operator,
    normwise_err,
    random_matrix,
    rel_err,
)
from torch.utils.data import DataLoader, TensorDataset

ALL = all_cases()
ROTATED = rotated_cases()
# The cached path traces the network once per batch (torch.func.linearize); what it traces
# depends on the model and activation only, so one rotated case per (model, activation): 12,
# taking the CE/MSE-mean half of the rotation for MLP and ResCNN, the MSE-sum/BCE half otherwise.
CACHED = [ROTATED[6 * b + j + 3 * (b % 2)] for b in range(4) for j in range(3)]


def _ref_matrix(c, op_name):
    return c.ref.matrix(op_name)


# ------------------------------------------------------------------------------------------------
# One batch, dense, all 72 cases.


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("case", ALL, ids=case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_dense_matches_reference(device, case, op_name):
    c, op, dense = dense_operator(case, op_name, "float64", device, cache=False)
    assert op.shape == (c.ref.theta.numel(),) * 2
    assert op.num_params == c.ref.theta.numel()
    assert op.num_examples == NUM_EXAMPLES
    assert op.dtype == torch.float64 and op.device.type == device
    assert op.param_names == [n for n, _ in c.model.named_parameters()]
    assert dense.shape == op.shape and dense.device.type == device
    err = rel_err(dense, _ref_matrix(c, op_name))
    assert err <= TOL[torch.float64], f"relative error {err:.2e}"


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("case", ALL, ids=case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_and_loss_match_reference(device, case, op_name):
    c, op, _ = dense_operator(case, op_name, "float64", device, cache=False)
    assert rel_err(op.gradient(), c.ref.gradient) <= TOL[torch.float64]
    assert op.loss().dim() == 0
    assert rel_err(op.loss(), c.ref.loss) <= TOL[torch.float64]


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("case", ALL, ids=case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_dense_symmetric_and_psd(device, case, op_name):
    _, _, dense = dense_operator(case, op_name, "float64", device, cache=False)
    dense = dense.cpu()
    # Rounding-level asymmetry only: (i, j) and (j, i) come from different products.
    assert float((dense - dense.T).norm() / dense.norm()) <= SAME_TOL
    if op_name in PSD_OPERATORS:
        eig = torch.linalg.eigvalsh((dense + dense.T) / 2)
        assert eig[0] >= -1e-10 * eig[-1], f"min eigenvalue {eig[0]:.3e}, max {eig[-1]:.3e}"


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("case", CACHED, ids=case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_cached_default_matches_reference(device, case, op_name):
    c, op, dense = dense_operator(case, op_name, "float64", device)  # default: cached
    assert op.cache
    ref = _ref_matrix(c, op_name)
    assert rel_err(dense, ref) <= TOL[torch.float64]
    V = random_matrix(op.num_params, 2, torch.float64, device, seed=6)
    for _ in range(2):  # products reuse the cached batch state
        assert rel_err(op.matmat(V), ref @ V.cpu()) <= TOL[torch.float64]
    v = V[:, 0]
    scale = float(ref.norm() * v.norm() ** 2)
    assert abs(float(op.quadratic_form(v)) - float(v.cpu() @ ref @ v.cpu())) <= 1e-10 * scale
    assert rel_err(op.gradient(), c.ref.gradient) <= TOL[torch.float64]
    assert rel_err(op.loss(), c.ref.loss) <= TOL[torch.float64]


# ------------------------------------------------------------------------------------------------
# Products: matvec, matmat, @, quadratic form, symmetry of the bilinear form.


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("case", ROTATED, ids=case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_products(device, case, op_name):
    c, op, _ = dense_operator(case, op_name, "float64", device, cache=False)
    ref = _ref_matrix(c, op_name)
    p = op.num_params
    V = random_matrix(p, 3, torch.float64, device, seed=1)
    CV = op.matmat(V)
    assert CV.shape == (p, 3) and CV.dtype == torch.float64 and CV.device.type == device
    assert rel_err(CV, ref @ V.cpu()) <= TOL[torch.float64]
    # matmat equals column-wise matvec (the vmap path vs the single-vector path).
    cols = torch.stack([op.matvec(V[:, i]) for i in range(3)], dim=1)
    assert rel_err(cols, CV) <= SAME_TOL
    assert rel_err(op @ V, CV) <= SAME_TOL
    assert rel_err(op @ V[:, 0].contiguous(), CV[:, 0]) <= SAME_TOL
    # Symmetry of the bilinear form: uᵀ(Cv) = vᵀ(Cu), to rounding of the two products.
    u, v = V[:, 0], V[:, 1]
    scale = float(ref.norm() * u.norm() * v.norm())
    assert abs(float(u @ CV[:, 1] - v @ CV[:, 0])) <= SAME_TOL * scale
    # quadratic_form(v) = vᵀ(Cv) = vᵀRv.
    q = op.quadratic_form(v)
    assert q.dim() == 0 and q.dtype == torch.float64
    assert abs(float(q) - float(v @ CV[:, 1])) <= TOL[torch.float64] * scale
    assert abs(float(q) - float(v.cpu() @ ref @ v.cpu())) <= TOL[torch.float64] * scale
    if op_name in PSD_OPERATORS:
        assert float(q) >= 0


# ------------------------------------------------------------------------------------------------
# Several batches of unequal size: list [4, 3, 2] and DataLoader [4, 4, 1], cached or streamed.


# Uncached (fast) on all 24 rotated cases. How cached batches are weighted does not depend on
# the network (whose cached path is tested above), so the cached layouts run on the CNNs and MLP.
SEVERAL = [(case, layout) for case in ROTATED for layout in ("list-nocache", "loader")] + [
    (ROTATED[0], "list"),
    (ROTATED[3], "loader-cache"),
    (ROTATED[7], "list"),
    (ROTATED[14], "loader-cache"),
]


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("case, layout", SEVERAL, ids=[f"{case_id(c)}-{lay}" for c, lay in SEVERAL])
@pytest.mark.parametrize("device", DEVICES)
def test_several_batches(device, case, op_name, layout):
    c = get_case(*case)
    ref = _ref_matrix(c, op_name)
    x, y = c.data_as(torch.float64, device)
    data, cache = make_data(layout, x, y)
    op = make_operator(op_name, c.model_as(torch.float64, device), c.loss_fn(), data, **cache)
    assert op.num_examples == NUM_EXAMPLES
    assert op.cache == (layout in ("list", "loader-cache"))
    V = random_matrix(op.num_params, 2, torch.float64, device, seed=2)
    for _ in range(2 if op.cache else 1):  # the second round reuses the cached states
        assert rel_err(op.matmat(V), ref @ V.cpu()) <= TOL[torch.float64]
    v = V[:, 0]
    assert rel_err(op.matvec(v), ref @ v.cpu()) <= TOL[torch.float64]
    scale = float(ref.norm() * v.norm() ** 2)
    assert abs(float(op.quadratic_form(v)) - float(v.cpu() @ ref @ v.cpu())) <= 1e-10 * scale
    assert rel_err(op.gradient(), c.ref.gradient) <= TOL[torch.float64]
    assert rel_err(op.loss(), c.ref.loss) <= TOL[torch.float64]


@pytest.mark.parametrize("op_name", OPERATORS)
def test_shuffled_loader_is_the_same_data_set(op_name):
    """A streamed DataLoader reshuffles at every pass: each product still sees all N examples.

    The operator warns (once) that products then agree to rounding only, not bit for bit.
    """
    c = get_case("cnn", "sigmoid", "bce", "sum")
    x, y = c.data_as(torch.float64)
    loader = DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True)
    torch.manual_seed(0)
    op = make_operator(op_name, c.model_as(torch.float64), c.loss_fn(), loader)
    assert not op.cache and op.num_examples == NUM_EXAMPLES
    V = random_matrix(op.num_params, 2, torch.float64, "cpu", seed=8)
    with pytest.warns(UserWarning, match="shuffle=True"):
        for _ in range(2):
            assert rel_err(op.matmat(V), _ref_matrix(c, op_name) @ V) <= TOL[torch.float64]
        assert rel_err(op.gradient(), c.ref.gradient) <= TOL[torch.float64]


@pytest.mark.parametrize("op_name", OPERATORS)
def test_cache_false_equals_cache_true(op_name):
    c = get_case("mlp", "tanh", "bce", "mean")
    x, y = c.data_as(torch.float64)
    V = random_matrix(c.ref.theta.numel(), 3, torch.float64, "cpu", seed=3)
    out = {}
    for cache in (True, False):
        data, _ = make_data("list", x, y)
        op = make_operator(op_name, c.model_as(torch.float64), c.loss_fn(), data, cache=cache)
        out[cache] = (op.matmat(V), op.quadratic_form(V[:, 0]), op.gradient(), op.loss())
    for a, b in zip(out[True], out[False], strict=True):
        assert rel_err(a, b) <= SAME_TOL


# ------------------------------------------------------------------------------------------------
# float32: the same parameters and data, rounded values held exactly by the float64 reference.


@pytest.fixture
def no_tf32(monkeypatch):
    """True float32 on CUDA: cuDNN convolutions default to TF32 (10-bit mantissa, ~1e-3)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("case", ROTATED, ids=case_id)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.usefixtures("no_tf32")
def test_float32_dense_matches_reference(device, case, op_name):
    c, op, dense = dense_operator(case, op_name, "float32", device, cache=False)
    assert op.dtype == torch.float32 and dense.dtype == torch.float32
    err = rel_err(dense, _ref_matrix(c, op_name))
    assert err <= TOL[torch.float32], f"relative error {err:.2e}"
    assert rel_err(op.gradient(), c.ref.gradient) <= TOL[torch.float32]
    assert rel_err(op.loss(), c.ref.loss) <= TOL[torch.float32]
    V = random_matrix(op.num_params, 2, torch.float32, device, seed=4)
    assert normwise_err(op.matmat(V), _ref_matrix(c, op_name), V) <= TOL[torch.float32]
    v = V[:, 0]
    q, rv = op.quadratic_form(v), _ref_matrix(c, op_name) @ v.cpu().double()
    assert q.dtype == torch.float32
    scale = float(_ref_matrix(c, op_name).norm() * v.norm() ** 2)
    assert abs(float(q) - float(v.cpu().double() @ rv)) <= TOL[torch.float32] * scale


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("model, layout", [("mlp", "list"), ("vit", "loader")])
def test_float32_several_batches(model, layout, op_name):
    c = get_case(model, "sigmoid", "ce", "mean")
    x, y = c.data_as(torch.float32)
    data, _ = make_data(layout, x, y)
    op = make_operator(op_name, c.model_as(torch.float32), c.loss_fn(), data)
    V = random_matrix(op.num_params, 2, torch.float32, "cpu", seed=5)
    assert normwise_err(op.matmat(V), _ref_matrix(c, op_name), V) <= TOL[torch.float32]
    assert rel_err(op.gradient(), c.ref.gradient) <= TOL[torch.float32]


# ------------------------------------------------------------------------------------------------
# The scipy view: agrees with matvec; eigsh, cg and lobpcg accept it.


SCIPY_CASES = [ROTATED[0], ROTATED[7], ROTATED[14], ROTATED[21]]  # one per model


@pytest.mark.parametrize("op_name", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("case", SCIPY_CASES, ids=case_id)
def test_to_scipy(case, op_name):
    c, op, _ = dense_operator(case, op_name, "float64", "cpu", cache=False)
    ref = _ref_matrix(c, op_name).numpy()
    A = op.to_scipy()
    p = op.num_params
    assert isinstance(A, sla.LinearOperator)
    assert A.shape == (p, p) and A.dtype == np.float64
    rng = np.random.default_rng(0)
    X = rng.standard_normal((p, 3))
    for got, want in [
        (A @ X[:, 0], op.matvec(torch.from_numpy(X[:, 0])).numpy()),
        (A.matvec(X[:, :1]).ravel(), op.matvec(torch.from_numpy(X[:, 0])).numpy()),
        (A.matmat(X), op.matmat(torch.from_numpy(X)).numpy()),
        (A @ X, ref @ X),
    ]:
        assert isinstance(got, np.ndarray)
        assert np.linalg.norm(got - want) <= SAME_TOL * np.linalg.norm(want) + TOL[
            torch.float64
        ] * np.linalg.norm(ref @ X[:, : got.shape[1] if got.ndim == 2 else 1])

    eig = np.linalg.eigvalsh(ref)
    lmax = abs(eig).max()
    top = np.sort(sla.eigsh(A, k=3, which="LA", return_eigenvectors=False))
    # eigsh converges to machine precision (tol=0): eigenvalues to ~1e-12 of the largest.
    assert np.allclose(top, eig[-3:], rtol=0, atol=1e-9 * lmax)
    if op_name == "hessian":
        low = np.sort(sla.eigsh(A, k=2, which="SA", return_eigenvectors=False))
        assert np.allclose(low, eig[:2], rtol=0, atol=1e-9 * lmax)
    else:
        # cg on the PSD operator shifted to condition number <= 101: solution to ~1e-10.
        shift = 0.01 * lmax
        M = A + sla.aslinearoperator(shift * np.eye(p))
        b = ref @ X[:, 0]
        sol, info = sla.cg(M, b, rtol=1e-12, atol=0, maxiter=10 * p)
        assert info == 0
        want = np.linalg.solve(ref + shift * np.eye(p), b)
        assert np.linalg.norm(sol - want) <= 1e-8 * np.linalg.norm(want)
    vals, _ = sla.lobpcg(A, rng.standard_normal((p, 2)), largest=True, tol=1e-9, maxiter=500)
    assert np.allclose(np.sort(vals), eig[-2:], rtol=0, atol=1e-6 * lmax)


def test_to_scipy_float32_operator_takes_float64_numpy():
    c, op, _ = dense_operator(ROTATED[0], "ggn", "float32", "cpu", cache=False)
    A = op.to_scipy()
    assert A.dtype == np.float32
    x = np.random.default_rng(1).standard_normal(op.num_params)
    got = A @ x
    want = c.ref.ggn.numpy() @ x
    assert np.linalg.norm(got - want) <= TOL[torch.float32] * np.linalg.norm(want)
    top = sla.eigsh(A, k=1, which="LA", return_eigenvectors=False, tol=1e-6)
    lmax = np.linalg.eigvalsh(c.ref.ggn.numpy())[-1]
    assert abs(top[0] - lmax) <= 1e-5 * lmax


def test_to_dense_chunks_agree():
    _, op, dense = dense_operator(ROTATED[0], "hessian", "float64", "cpu", cache=False)
    assert rel_err(op.to_dense(chunk_size=7), dense) <= SAME_TOL
