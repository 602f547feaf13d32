"""Which parameters span θ: subsets by name, frozen or tied parameters, eval-mode BatchNorm."""

import copy

import pytest
import torch
from dense_reference import (
    FD_TOL,
    build_reference,
    dense_hessian,
    finite_difference_errors,
    get_case,
    make_loss,
    module_forward,
    offsets,
    output_hessians,
    unflatten,
)
from operator_helpers import OPERATORS, TOL, make_data, make_operator, rel_err
from torch import nn

from hessian_lab import params_to_vector, select_parameters, vector_to_params

F64 = TOL[torch.float64]

# Names listed out of the model's order: the flat layout must still follow the model.
SUBSETS = {
    "mlp": (("mlp", "tanh", "ce", "mean"), ["head.bias", "features.3.bias", "features.1.weight"]),
    "cnn": (("cnn", "relu", "bce", "sum"), ["head.weight", "features.2.conv1.weight"]),
    "rescnn": (
        ("rescnn", "sigmoid", "mse", "mean"),
        ["features.2.conv2.bias", "features.0.weight"],
    ),
    "vit": (
        ("vit", "relu", "ce", "sum"),
        ["head.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "pos_embed"],
    ),
}


def _index(model: nn.Module, names: list[str]) -> torch.Tensor:
    slices = offsets(model)
    return torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])


@pytest.mark.parametrize("layout", ["one", "list-nocache"])
@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("model_name", list(SUBSETS))
def test_parameter_subset_matches_reference_block(model_name, op_name, layout):
    case, names = SUBSETS[model_name]
    c = get_case(*case)
    x, y = c.data_as(torch.float64)
    data, cache = make_data(layout, x, y)
    op = make_operator(op_name, c.model_as(torch.float64), c.loss_fn(), data, names, **cache)
    in_model_order = [n for n, _ in c.model.named_parameters() if n in names]
    assert op.param_names == in_model_order
    idx = _index(c.model, in_model_order)
    assert op.num_params == len(idx) and op.shape == (len(idx), len(idx))
    ref = c.ref.matrix(op_name)[idx][:, idx]
    if op_name == "fisher_batch":
        ref = torch.outer(c.ref.gradient[idx], c.ref.gradient[idx])
    assert rel_err(op.to_dense(), ref) <= F64
    assert rel_err(op.gradient(), c.ref.gradient[idx]) <= F64
    assert rel_err(op.loss(), c.ref.loss) <= F64


@pytest.mark.parametrize("op_name", OPERATORS)
def test_frozen_parameters_are_left_out(op_name):
    c = get_case("vit", "tanh", "mse", "sum")
    model = c.model_as(torch.float64)
    frozen = ["patch_embed.weight", "blocks.0.norm2.bias", "blocks.0.mlp.0.weight"]
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    trainable = [n for n, _ in model.named_parameters() if n not in frozen]
    x, y = c.data_as(torch.float64)
    op = make_operator(op_name, model, c.loss_fn(), (x, y), cache=False)
    idx = _index(model, trainable)
    assert op.param_names == trainable
    trainable_size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert op.num_params == len(idx) == trainable_size
    assert list(select_parameters(model)) == trainable
    ref = c.ref.matrix(op_name)[idx][:, idx]
    if op_name == "fisher_batch":
        ref = torch.outer(c.ref.gradient[idx], c.ref.gradient[idx])
    assert rel_err(op.to_dense(), ref) <= F64
    assert rel_err(op.gradient(), c.ref.gradient[idx]) <= F64


# ------------------------------------------------------------------------------------------------
# A weight shared by two layers.


class TiedNet(nn.Module):
    """z = V tanh(W tanh(W x + b1) + b2) + c, with W shared by two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.hidden = nn.Linear(4, 4)
        self.hidden.weight = self.inp.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


TIED_SHAPES = [
    ("W", torch.Size([4, 4])),
    ("b1", torch.Size([4])),
    ("b2", torch.Size([4])),
    ("V", torch.Size([3, 4])),
    ("c", torch.Size([3])),
]


def tied_forward(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The same network written out by hand on a flat θ (W enters twice)."""
    p = unflatten(theta, TIED_SHAPES)
    h = torch.tanh(x @ p["W"].T + p["b1"])
    h = torch.tanh(h @ p["W"].T + p["b2"])
    return h @ p["V"].T + p["c"]


@pytest.fixture(scope="module")
def tied():
    torch.manual_seed(7)
    model = TiedNet().double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    theta0 = torch.cat(
        [
            model.inp.weight.reshape(-1),
            model.inp.bias,
            model.hidden.bias,
            model.out.weight.reshape(-1),
            model.out.bias,
        ]
    ).detach()
    ref = build_reference(tied_forward, theta0, x, y, "ce", "mean")
    return model, x, y, ref


def test_tied_reference_matches_finite_differences(tied):
    _, _, _, ref = tied
    errors = finite_difference_errors(ref)
    assert max(errors.values()) <= FD_TOL, errors


@pytest.mark.parametrize("layout", ["one", "list", "loader"])
@pytest.mark.parametrize("op_name", OPERATORS)
def test_tied_weight_counts_once_and_matches_reference(tied, op_name, layout):
    model, x, y, ref = tied
    assert list(select_parameters(model)) == [
        "inp.weight",
        "inp.bias",
        "hidden.bias",
        "out.weight",
        "out.bias",
    ]
    data, cache = make_data(layout, x, y)
    op = make_operator(op_name, model, make_loss("ce", "mean"), data, **cache)
    assert op.num_params == 16 + 4 + 4 + 12 + 3
    assert "hidden.weight" not in op.param_names
    assert rel_err(op.to_dense(), ref.matrix(op_name)) <= F64
    assert rel_err(op.gradient(), ref.gradient) <= F64


# ------------------------------------------------------------------------------------------------
# BatchNorm in eval mode is an ordinary per-example function; train mode is the opt-in.


def _bn_model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.double()


@pytest.mark.parametrize("op_name", OPERATORS)
def test_eval_mode_batchnorm_matches_reference(op_name):
    model = _bn_model().eval()
    x = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    forward, theta0, _ = module_forward(copy.deepcopy(model))
    ref = build_reference(forward, theta0, x, y, "mse", "mean")
    data, cache = make_data("list", x, y)
    op = make_operator(op_name, model, make_loss("mse", "mean"), data, **cache)
    assert rel_err(op.to_dense(), ref.matrix(op_name)) <= F64


@pytest.mark.parametrize("cache", [None, False])
def test_train_mode_batchnorm_opt_in_gives_the_train_mode_curvature(cache):
    """allow_train_mode=True: H and Q of the train-mode (batch-statistics) function.

    Regression: Q's forward under torch.func used to mutate BatchNorm's captured running
    statistics and raise an opaque torch.func RuntimeError; H's silently updated the model's
    running statistics at every forward pass.
    """
    model = _bn_model().train()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(1))
    forward, theta0, _ = module_forward(copy.deepcopy(model))
    _, g, hessian = dense_hessian(lambda t: nn.functional.cross_entropy(forward(t, x), y), theta0)
    jac = torch.func.jacrev(lambda t: forward(t, x))(theta0)  # [N, C, P], examples coupled
    lambdas = output_hessians("ce", "mean", forward(theta0, x).detach())
    ggn = torch.einsum("nap,nab,nbq->pq", jac, lambdas, jac) / x.shape[0]
    loss = make_loss("ce", "mean")
    H = make_operator("hessian", model, loss, (x, y), allow_train_mode=True, cache=cache)
    Q = make_operator("ggn", model, loss, (x, y), allow_train_mode=True, cache=cache)
    assert rel_err(H.to_dense(), hessian) <= F64
    assert rel_err(H.gradient(), g) <= F64
    assert rel_err(Q.to_dense(), ggn) <= F64
    assert rel_err(Q.gradient(), g) <= F64
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), f"buffer {name} changed"


def test_params_to_vector_and_back_round_trip():
    c = get_case("cnn", "tanh", "ce", "mean")
    params = dict(c.model.named_parameters())
    flat = params_to_vector(params)
    assert torch.equal(flat, c.ref.theta.float())
    back = vector_to_params(flat, params)
    assert list(back) == list(params)
    for name, p in params.items():
        assert torch.equal(back[name], p.detach())
