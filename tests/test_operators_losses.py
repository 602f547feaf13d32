"""Custom callable losses and the autograd fallback for Λ, against closed forms and references."""

import pytest
import torch
from dense_reference import LOSSES, NUM_CLASSES, REDUCTIONS, get_case, make_loss, output_hessians
from operator_helpers import SAME_TOL, TOL, make_data, make_operator, random_matrix, rel_err
from torch import nn
from torch.nn import functional as F  # noqa: N812

from hessian_lab.output_curvature import (
    AutogradCurvature,
    BCEWithLogitsCurvature,
    CrossEntropyCurvature,
    MSECurvature,
    output_curvature,
)

F64 = TOL[torch.float64]
FUNCTIONAL = {
    "ce": F.cross_entropy,
    "mse": F.mse_loss,
    "bce": F.binary_cross_entropy_with_logits,
}


class SumLoss:
    """A callable (not an nn loss) that declares its reduction through a ``reduction`` attribute."""

    reduction = "sum"

    def __init__(self, kind: str) -> None:
        self.fn = FUNCTIONAL[kind]

    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(z, y, reduction="sum")


def callable_loss(kind: str, reduction: str):
    """A plain function for "mean" (declared to the operator); SumLoss for "sum"."""
    if reduction == "mean":
        fn = FUNCTIONAL[kind]
        return lambda z, y: fn(z, y)
    return SumLoss(kind)


@pytest.mark.parametrize("op_name", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("model, activation", [("mlp", "sigmoid"), ("vit", "tanh")])
def test_callable_loss_matches_reference(model, activation, kind, reduction, op_name):
    """Autograd Λ (double backward in output space) through several batches, with LayerNorm."""
    c = get_case(model, activation, kind, reduction)
    x, y = c.data_as(torch.float64)
    data, cache = make_data("list-nocache", x, y)
    loss_fn = callable_loss(kind, reduction)
    # A plain function has no `reduction` attribute: with several batches it must be declared.
    declared = {"reduction": "mean"} if reduction == "mean" else {}
    op = make_operator(op_name, c.model_as(torch.float64), loss_fn, data, **cache, **declared)
    ref = c.ref.matrix(op_name)
    V = random_matrix(op.num_params, 2, torch.float64, "cpu", seed=7)
    assert rel_err(op.matmat(V), ref @ V) <= F64
    v = V[:, 0]
    scale = float(ref.norm() * v.norm() ** 2)
    assert abs(float(op.quadratic_form(v)) - float(v @ ref @ v)) <= F64 * scale
    assert rel_err(op.gradient(), c.ref.gradient) <= F64
    assert rel_err(op.loss(), c.ref.loss) <= F64


# ------------------------------------------------------------------------------------------------
# Output space: closed forms vs forced autograd vs the explicit Λ of the tests.

CLOSED = {"ce": CrossEntropyCurvature, "mse": MSECurvature, "bce": BCEWithLogitsCurvature}


def _batch(kind: str, n: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n, NUM_CLASSES, generator=gen, dtype=torch.float64)
    if kind == "ce":
        y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    elif kind == "mse":
        y = torch.randn(n, NUM_CLASSES, generator=gen, dtype=torch.float64)
    else:
        y = torch.rand(n, NUM_CLASSES, generator=gen, dtype=torch.float64)
    return z, y


def _explicit_batch_hessian(kind: str, reduction: str, z: torch.Tensor) -> torch.Tensor:
    """Λ of the batch loss L_b = w Σ ℓ_n: block diagonal, w Λ_n per example, ``[N, C, C]``."""
    w = 1.0 / z.shape[0] if reduction == "mean" else 1.0
    return w * output_hessians(kind, reduction, z)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", LOSSES)
def test_closed_form_and_autograd_output_curvature_agree(kind, reduction):
    loss = make_loss(kind, reduction)
    z, y = _batch(kind)
    closed = output_curvature(loss, z, y)
    auto = output_curvature(loss, z, y, force_autograd=True)
    assert type(closed) is CLOSED[kind]
    assert type(auto) is AutogradCurvature
    s_closed, s_auto = closed.state(z, y), auto.state(z, y)
    assert torch.allclose(s_closed.loss, loss(z, y), rtol=1e-15, atol=0)
    assert rel_err(s_auto.output_grad, s_closed.output_grad) <= SAME_TOL

    lam = _explicit_batch_hessian(kind, reduction, z)
    gen = torch.Generator().manual_seed(1)
    U = torch.randn(4, *z.shape, generator=gen, dtype=torch.float64)  # 4 tangents at once
    want = torch.einsum("nab,knb->kna", lam, U)
    for curv, state in ((closed, s_closed), (auto, s_auto)):
        assert rel_err(curv.hessian_vector(state, U), want) <= SAME_TOL
        assert rel_err(curv.hessian_vector(state, U[0]), want[0]) <= SAME_TOL
        quad = curv.quadratic_form(state, U)
        assert quad.shape == (4,)
        assert rel_err(quad, torch.einsum("kna,kna->k", U, want)) <= SAME_TOL


@pytest.mark.parametrize(
    "loss, kind",
    [
        (nn.CrossEntropyLoss(label_smoothing=0.1), "ce"),
        (nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)), "ce"),
        (nn.CrossEntropyLoss(ignore_index=1), "ce"),
        (
            nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)),
            "bce",
        ),
        (lambda z, y: F.cross_entropy(z, y) + 0.1 * (z**4).mean(), "ce"),
    ],
    ids=["label_smoothing", "class_weight", "ignore_index", "pos_weight", "custom"],
)
def test_output_curvature_of_loss_variants_matches_autograd_hessian(loss, kind):
    """Whatever form is chosen, Λ equals the dense Hessian of the batch loss in z."""
    z, y = _batch(kind, n=4, seed=2)
    curv = output_curvature(loss, z, y)
    state = curv.state(z, y)
    dense = torch.autograd.functional.hessian(lambda t: loss(t.view_as(z), y), z.reshape(-1))
    U = torch.randn(3, *z.shape, generator=torch.Generator().manual_seed(3), dtype=z.dtype)
    want = torch.einsum("ij,kj->ki", dense, U.reshape(3, -1)).reshape(U.shape)
    assert rel_err(curv.hessian_vector(state, U), want) <= SAME_TOL
    assert rel_err(curv.quadratic_form(state, U), (U * want).sum((1, 2))) <= SAME_TOL


def test_closed_forms_are_used_only_where_exact():
    z, y = _batch("ce")
    assert type(output_curvature(nn.CrossEntropyLoss(), z, y)) is CrossEntropyCurvature
    weighted = nn.CrossEntropyLoss(weight=torch.ones(NUM_CLASSES, dtype=torch.float64))
    assert type(output_curvature(weighted, z, y)) is AutogradCurvature
    y_ignored = y.clone()
    y_ignored[0] = -100  # the closed form masks ignored targets (exactness checked above)
    assert type(output_curvature(nn.CrossEntropyLoss(), z, y_ignored)) is CrossEntropyCurvature
    probs = torch.softmax(torch.randn_like(z), dim=-1)  # class-probability targets
    assert type(output_curvature(nn.CrossEntropyLoss(), z, probs)) is AutogradCurvature
    assert type(output_curvature(lambda a, b: F.cross_entropy(a, b), z, y)) is AutogradCurvature
