"""conv_double_backward: Hessian-vector products through convolutions, against dense Hessians.

The reference is the dense Hessian of the loss with respect to the flattened parameters
(torch.autograd.functional.hessian, float64, PyTorch's own double backward), an independent
computation: H v through the rerouted convolutions must match it to float64 rounding, the
gradient must equal PyTorch's, and the graph must show that the reroute happened.
"""

from __future__ import annotations

import pytest
import torch
from operator_helpers import DEVICES
from test_core_backward_for_jvp import CONVOLUTIONS, _graph_nodes
from torch import nn

from hessian_lab.core import conv_double_backward


def _network(case: str) -> tuple[nn.Module, torch.Tensor]:
    """conv -> tanh -> a 1×1 conv of the same kind -> tanh, float64 (every conv's output is
    curved through the loss, and the second conv's input carries gradient)."""
    torch.manual_seed(0)
    make, shape = CONVOLUTIONS[case]
    first = make()
    with torch.no_grad():
        channels = first(torch.zeros(shape)).shape[1]
    model = nn.Sequential(first, nn.Tanh(), type(first)(channels, 2, 1), nn.Tanh())
    return model.double(), torch.randn(shape, dtype=torch.float64)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out - 0.3).square().sum() + out.sum().sin()


def _dense_hessian(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    shapes = [dict(model.named_parameters())[n].shape for n in names]
    sizes = [s.numel() for s in shapes]

    def h(flat: torch.Tensor) -> torch.Tensor:
        parts = [t.reshape(s) for t, s in zip(flat.split(sizes), shapes, strict=True)]
        params = {**fixed, **dict(zip(names, parts, strict=True))}
        return _loss(torch.func.functional_call(model, params, (x,)))

    theta = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])
    return torch.autograd.functional.hessian(h, theta)


def _check_hvp(model: nn.Module, x: torch.Tensor, names: list[str]) -> None:
    params = [dict(model.named_parameters())[n] for n in names]
    with conv_double_backward():
        grads = torch.autograd.grad(_loss(model(x)), params, create_graph=True)
    nodes = _graph_nodes(*grads)
    assert "LeanConvolutionBackwardBackward" in nodes  # rerouted, else this checks PyTorch's path
    assert "ConvolutionBackwardBackward0" not in nodes
    reference_grads = torch.autograd.grad(_loss(model(x)), params)
    for g, ref in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-13, atol=1e-13)
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(grads, params, v)
    H = _dense_hessian(model, x, names).to(x.device)
    expected = H @ torch.cat([t.reshape(-1) for t in v])
    got = torch.cat([t.reshape(-1) for t in hv])
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-11 * expected.abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CONVOLUTIONS))
def test_hessian_vector_product_matches_the_dense_hessian(case, device):
    model, x = _network(case)
    model, x = model.to(device), x.to(device)
    _check_hvp(model, x, [n for n, _ in model.named_parameters()])


@pytest.mark.parametrize("frozen", ["0.weight", "0.bias", "2.weight"])
def test_frozen_parameters(frozen):
    # A frozen weight: no W̃ for that convolution, only b̃ (and x̃ from later layers).
    model, x = _network("conv2d_stride_dilation")
    _check_hvp(model, x, [n for n, _ in model.named_parameters() if n != frozen])


def test_hessian_with_respect_to_the_input_too():
    # The input as a variable: the first convolution's x̄ and ȳ ⋆ᵀ W̃ terms are needed.
    model, x = _network("conv1d")
    x = x.requires_grad_(True)
    params = [x, *model.parameters()]
    with conv_double_backward():
        grads = torch.autograd.grad(_loss(model(x)), params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(grads, params, v)
    ref_grads = torch.autograd.grad(_loss(model(x)), params, create_graph=True)
    ref = torch.autograd.grad(ref_grads, params, v)  # PyTorch's own double backward
    for a, b in zip(hv, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_string_padding_and_no_grad_keep_pytorchs_path():
    conv = nn.Conv2d(2, 3, 3, padding="same").double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with conv_double_backward():
        y = conv(x)
        with torch.no_grad():
            z = conv(x)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"
    assert z.grad_fn is None
