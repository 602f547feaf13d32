"""``matmat`` batches k products by vmap or by a loop; both equal column-wise products."""

import pytest
import torch
from torch import nn

from hessian_lab import EmpiricalFisherOperator, GGNOperator, HessianOperator

OPERATORS = [HessianOperator, GGNOperator, EmpiricalFisherOperator]


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()


@pytest.mark.parametrize("cls", OPERATORS)
def test_loop_and_vmap_agree(cls):
    model = _conv_model()
    x = torch.randn(7, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    loss = nn.CrossEntropyLoss()
    looped = cls(model, loss, data, matmat="loop")
    vmapped = cls(model, loss, data, matmat="vmap")
    V = torch.randn(looped.num_params, 4, dtype=torch.float64)
    by_columns = torch.stack([vmapped.matvec(V[:, i]) for i in range(4)], dim=1)
    scale = by_columns.norm()
    assert (looped.matmat(V) - by_columns).norm() <= 1e-12 * scale
    assert (vmapped.matmat(V) - by_columns).norm() <= 1e-12 * scale


def test_auto_loops_on_cpu():
    # Measured fastest per column on CPU for H, Q and GN (analyses/benchmark_operators.py).
    data = (torch.randn(2, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (2,)))
    assert GGNOperator(_conv_model(), nn.CrossEntropyLoss(), data).matmat_mode == "loop"
    mlp = nn.Sequential(nn.Linear(4, 3)).double()
    flat = (torch.randn(2, 4, dtype=torch.float64), torch.randint(0, 3, (2,)))
    assert HessianOperator(mlp, nn.CrossEntropyLoss(), flat).matmat_mode == "loop"
    with pytest.raises(ValueError, match="matmat='columns' is not one of"):
        GGNOperator(mlp, nn.CrossEntropyLoss(), flat, matmat="columns")


@pytest.mark.parametrize(
    "loss, uses_forward_mode",
    [(nn.CrossEntropyLoss(), True), (nn.MSELoss(), False)],
    ids=["ce: forward-over-reverse", "mse-mean: falls back to double backward"],
)
def test_hessian_matmat_through_layernorm(loss, uses_forward_mode):
    """vmap(jvp(grad)) is exact through LayerNorm; where forward mode raises (MSELoss "mean"
    in torch 2.13) the double-backward path takes over and gives the same columns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (9,)) if uses_forward_mode else torch.randn(9, 3, dtype=torch.float64)
    op = HessianOperator(model, loss, (x, y), matmat="vmap")
    V = torch.randn(op.num_params, 5, dtype=torch.float64)
    by_columns = torch.stack([op.matvec(V[:, i]) for i in range(5)], dim=1)
    assert (op.matmat(V) - by_columns).norm() <= 1e-12 * by_columns.norm()
    assert op._forward_over_reverse is uses_forward_mode
