"""forward_jvp: forward-mode JVPs that skip the zero tangent of the data, against dense references.

The reference is the dense Jacobian of the flattened output with respect to the flattened
parameters (torch.autograd.functional.jacobian, float64), an independent computation: u = J v
must match to float64 rounding and z must equal the model's output. Each layer kind is checked
as the first layer (input without a tangent: the rerouted path) and after a layer (input with a
tangent: PyTorch's own rule), and the rerouted path is shown to run one product less.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from operator_helpers import DEVICES
from torch import nn
from torch.profiler import profile

from hessian_lab.core import forward_jvp


class _KeywordLinear(nn.Linear):
    """A Linear that calls ``F.linear`` with keyword weight and bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight=self.weight, bias=self.bias)


LAYERS = {  # first layer and its input shape
    "linear": (lambda: nn.Linear(5, 4), (6, 5)),
    "linear_no_bias": (lambda: nn.Linear(5, 4, bias=False), (6, 5)),
    "linear_keywords": (lambda: _KeywordLinear(5, 4), (6, 5)),
    "linear_3d_input": (lambda: nn.Linear(5, 4), (2, 3, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (5, 3, 9)),
    "conv2d_stride_dilation_groups": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2),
        (3, 4, 9, 9),
    ),
    "conv2d_same": (lambda: nn.Conv2d(2, 3, 3, padding="same"), (2, 2, 6, 6)),
    "conv2d_reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (2, 2, 4, 5, 4)),
    "conv_transpose2d": (
        lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, output_padding=1),
        (2, 2, 4, 4),
    ),
    "conv_transpose1d_no_bias": (lambda: nn.ConvTranspose1d(3, 2, 4, bias=False), (3, 3, 7)),
}


def _network(case: str, repeat: bool) -> tuple[nn.Module, torch.Tensor]:
    """layer -> tanh (-> the layer's kind again, on an input that carries a tangent)."""
    torch.manual_seed(0)
    make, shape = LAYERS[case]
    first = make()
    x = torch.randn(shape)
    layers = [first, nn.Tanh()]
    if repeat:  # the same kind of layer, now on an input with a tangent: PyTorch's own rule
        with torch.no_grad():
            h = first(x)
        if isinstance(first, nn.Linear):
            layers.append(nn.Linear(h.shape[-1], 3))
        else:
            kind = type(first)
            layers.append(kind(h.shape[1], 2, 1))
    return nn.Sequential(*layers).double(), x.double()


def _dense_jacobian(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}

    def f(*ps: torch.Tensor) -> torch.Tensor:
        params = {**fixed, **dict(zip(names, ps, strict=True))}
        return torch.func.functional_call(model, params, (x,)).reshape(-1)

    params = tuple(dict(model.named_parameters())[n].detach() for n in names)
    blocks = torch.autograd.functional.jacobian(f, params)
    return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1)


def _check_against_dense(model: nn.Module, x: torch.Tensor, names: list[str]) -> None:
    all_params = {n: p.detach() for n, p in model.named_parameters()}
    primals = {n: all_params[n] for n in names}
    fixed = {n: p for n, p in all_params.items() if n not in names}
    tangents = {n: torch.randn_like(p) for n, p in primals.items()}

    def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, {**fixed, **params}, (x,))

    z, u = forward_jvp(f, primals, tangents)
    J = _dense_jacobian(model, x, names)
    expected = J @ torch.cat([tangents[n].reshape(-1) for n in names])
    with torch.no_grad():
        torch.testing.assert_close(z, model(x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(u.reshape(-1), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("repeat", [False, True], ids=["first_layer", "first_and_later"])
@pytest.mark.parametrize("case", sorted(LAYERS))
def test_jvp_matches_the_dense_jacobian(case, repeat, device):
    model, x = _network(case, repeat)
    model, x = model.to(device), x.to(device)
    _check_against_dense(model, x, [n for n, _ in model.named_parameters()])


@pytest.mark.parametrize("frozen", ["0.weight", "0.bias"])
@pytest.mark.parametrize("case", ["linear", "conv2d_stride_dilation_groups", "conv_transpose2d"])
def test_jvp_with_a_frozen_first_weight_or_bias(case, frozen):
    # A frozen weight: the first layer has only ḃ (PyTorch's rule); a frozen bias: Ẇ only.
    model, x = _network(case, repeat=False)
    _check_against_dense(model, x, [n for n, _ in model.named_parameters() if n != frozen])


def _products(run, name: str) -> int:
    """How many ``aten::<name>`` calls ``run()`` makes."""
    with profile() as prof:
        run()
    return sum(e.count for e in prof.key_averages() if e.key == f"aten::{name}")


@pytest.mark.parametrize(
    ("layer", "shape", "op"),
    [
        (nn.Linear(7, 5), (4, 7), ("mm", "addmm")),
        (nn.Conv2d(3, 4, 3), (2, 3, 6, 6), ("convolution",)),
    ],
)
def test_first_layer_runs_two_products_not_three(layer, shape, op):
    # The point of the module: ẏ = x Ẇ + ḃ, without PyTorch's product of the zero tangent ẋ.
    x = torch.randn(shape)
    primals = {k: p.detach() for k, p in layer.named_parameters()}
    tangents = {k: torch.randn_like(p) for k, p in primals.items()}

    def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(layer, params, (x,))

    ours = sum(_products(lambda: forward_jvp(f, primals, tangents), name) for name in op)
    assert ours == 2  # y = op(x, W, b) and ẏ = op(x, Ẇ, ḃ)
    _, reference = torch.func.jvp(f, (primals,), (tangents,))
    torch.testing.assert_close(forward_jvp(f, primals, tangents)[1], reference)


def test_output_without_dependence_on_the_parameters_has_zero_tangent():
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    primals = {k: p.detach() for k, p in layer.named_parameters()}
    tangents = {k: torch.ones_like(p) for k, p in primals.items()}
    z, u = forward_jvp(lambda p: x * 2.0, primals, tangents)
    assert torch.equal(u, torch.zeros_like(z))


def test_mismatched_tangent_keys_raise():
    primals = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="keys of primals.*missing \\['w'\\]"):
        forward_jvp(lambda p: p["w"], primals, {"v": torch.ones(2)})
