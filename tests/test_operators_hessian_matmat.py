"""H ``matmat`` against a dense float64 Hessian, through LayerNorm and an unused parameter.

The loop of ``matmat="loop"`` (the CPU default) reads its columns from one transposed copy of V
and writes rows of a ``[k, P]`` buffer; these tests pin every column to the dense reference
(double backward row by row on a flat θ, checked against finite differences), for one batch and
for batches of unequal size, for contiguous and strided V, in both matmat modes.
"""

from __future__ import annotations

import pytest
import torch
from dense_reference import dense_hessian
from torch import nn

from hessian_lab import EmpiricalFisherOperator, GGNOperator, HessianOperator

TOL = 1e-10


class WithUnused(nn.Module):
    """tanh MLP with a LayerNorm and a parameter that the loss does not depend on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.unused = nn.Parameter(torch.randn(3))
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc2(tanh(norm(fc1(x)))); ``unused`` never enters."""
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def _layernorm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.LayerNorm(32), nn.Linear(32, 3)
    )


MODELS = {"layernorm_mlp": _layernorm_mlp, "unused_param": WithUnused, "cnn": _cnn}


def _setup(name: str, loss_kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS[name]().double()
    shape = (9, 1, 6, 6) if name == "cnn" else (9, 4)
    x = torch.randn(*shape, dtype=torch.float64)
    if loss_kind == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (9,))
    return model, nn.MSELoss(), x, torch.randn(9, 3, dtype=torch.float64)


def _reference(model: nn.Module, loss: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(risk of a flat θ, θ₀, dense H at θ₀), H by double backward one row at a time."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def risk(theta: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = theta[offset : offset + s.numel()].view(s)
            offset += s.numel()
        return loss(torch.func.functional_call(model, params, (x,)), y)

    return risk, theta0, dense_hessian(risk, theta0)[2]


def test_reference_matches_finite_differences():
    """The reference itself: H v against central differences of the gradient, and symmetric."""
    model, loss, x, y = _setup("unused_param", "ce")
    risk, theta0, hessian = _reference(model, loss, x, y)

    def grad(theta: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            return torch.autograd.grad(risk(t), t, allow_unused=True)[0]

    v = torch.randn(theta0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v /= v.norm()
    eps = 1e-5
    fd = (grad(theta0 + eps * v) - grad(theta0 - eps * v)) / (2 * eps)
    assert (fd - hessian @ v).norm() <= 1e-7 * (hessian @ v).norm()
    assert (hessian - hessian.T).norm() <= 1e-12 * hessian.norm()


@pytest.mark.parametrize("mode", ["loop", "vmap"])
@pytest.mark.parametrize("batches", [1, 2], ids=["one batch", "batches 5+4"])
@pytest.mark.parametrize("loss_kind", ["ce", "mse"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matmat_matches_dense_hessian(name, loss_kind, batches, mode):
    model, loss, x, y = _setup(name, loss_kind)
    _, _, hessian = _reference(model, loss, x, y)
    data = (x, y) if batches == 1 else [(x[:5], y[:5]), (x[5:], y[5:])]
    op = HessianOperator(model, loss, data, matmat=mode)
    gen = torch.Generator().manual_seed(2)
    V = torch.randn(op.num_params, 6, dtype=torch.float64, generator=gen)
    strided = torch.randn(6, op.num_params, dtype=torch.float64, generator=gen).T  # [P, 6] view
    for W in (V, strided, V[:, 2:3]):
        want = hessian @ W
        got = op.matmat(W)
        assert got.shape == want.shape
        assert (got - want).norm() <= TOL * want.norm()
    if name == "unused_param":  # a zero row of H, in the reference and in every product
        assert torch.count_nonzero(op.vector_to_params(hessian)["unused"]) == 0
        assert torch.count_nonzero(op.vector_to_params(op.matmat(V))["unused"]) == 0


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, EmpiricalFisherOperator])
def test_loop_columns_from_a_strided_matrix(cls):
    """The loop's transposed copy gives the same columns as products one at a time."""
    model, loss, x, y = _setup("layernorm_mlp", "ce")
    op = cls(model, loss, [(x[:5], y[:5]), (x[5:], y[5:])], matmat="loop")
    W = torch.randn(4, op.num_params, dtype=torch.float64).T
    by_columns = torch.stack([op.matvec(W[:, i].contiguous()) for i in range(4)], dim=1)
    assert (op.matmat(W) - by_columns).norm() <= 1e-12 * by_columns.norm()


def test_unused_parameter_in_gradient_and_quadratic_form():
    model, loss, x, y = _setup("unused_param", "ce")
    risk, theta0, hessian = _reference(model, loss, x, y)
    op = HessianOperator(model, loss, [(x[:5], y[:5]), (x[5:], y[5:])])
    v = torch.randn(op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.count_nonzero(op.vector_to_params(op.gradient())["unused"]) == 0
    assert abs(float(op.quadratic_form(v)) - float(v @ hessian @ v)) <= TOL * float(
        v.abs() @ hessian.abs() @ v.abs()
    )
    assert abs(float(op.loss()) - float(risk(theta0))) <= 1e-12
