"""backward_for_jvp: JVPs by double backward through convolutions, LayerNorm and eval-mode
BatchNorm, against dense references.

The reference is the dense Jacobian of the flattened output with respect to the flattened
parameters (torch.autograd.functional.jacobian, float64), an independent computation: u = J v
must match to float64 rounding; the first backward (the gradient) must equal PyTorch's own.
"""

from __future__ import annotations

import pytest
import torch
from operator_helpers import DEVICES
from torch import nn

from hessian_lab.core import backward_for_jvp
from hessian_lab.core.convolution_call import RoutedConvolution

CONVOLUTIONS = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (5, 3, 9)),
    "conv2d_stride_dilation": (
        lambda: nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=2),
        (3, 3, 9, 9),
    ),
    "conv2d_groups_no_bias": (lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False), (3, 4, 7, 7)),
    "conv2d_reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 6, 6)),
    "conv2d_circular": (
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
        (2, 2, 6, 6),
    ),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (2, 2, 4, 5, 4)),
}
LAYER_NORMS = {
    "layer_norm_affine": lambda: nn.LayerNorm(6),
    "layer_norm_no_affine": lambda: nn.LayerNorm(6, elementwise_affine=False),
    "layer_norm_no_bias_two_dims": lambda: nn.LayerNorm((3, 6), bias=False),
}
BATCH_NORMS = {  # (affine, 2-d): eval mode, with non-trivial running statistics
    "batch_norm_2d": (True, True),
    "batch_norm_2d_no_affine": (False, True),
    "batch_norm_1d": (True, False),
    "batch_norm_1d_no_affine": (False, False),
}
CASES = sorted([*CONVOLUTIONS, *LAYER_NORMS, *BATCH_NORMS])


def _perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():  # away from γ = 1, β = 0
            p.add_(0.3 * torch.randn_like(p))


def _network(case: str) -> tuple[nn.Module, torch.Tensor]:
    """A small float64 network around the operation, and its input; every operation after the
    first sees an input with a tangent."""
    torch.manual_seed(0)
    if case in CONVOLUTIONS:  # conv -> tanh -> a conv of the same kind on its output -> flatten
        make, shape = CONVOLUTIONS[case]
        first = make()
        with torch.no_grad():
            out_channels = first(torch.zeros(shape)).shape[1]
        layers = [first, nn.Tanh(), type(first)(out_channels, 2, 1), nn.Flatten()]
        x = torch.randn(shape)
    elif case in LAYER_NORMS:  # linear -> LayerNorm -> tanh -> linear on [batch, 3, 6]
        norm = LAYER_NORMS[case]()
        _perturb(norm)
        layers = [nn.Linear(4, 6), norm, nn.Tanh(), nn.Linear(6, 2), nn.Flatten()]
        x = torch.randn(5, 3, 4)
    else:  # conv (or linear) -> eval BatchNorm -> tanh -> head
        affine, two_d = BATCH_NORMS[case]
        norm = nn.BatchNorm2d(3, affine=affine) if two_d else nn.BatchNorm1d(3, affine=affine)
        with torch.no_grad():
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
        _perturb(norm)
        if two_d:
            layers = [nn.Conv2d(2, 3, 3), norm, nn.Tanh(), nn.Conv2d(3, 1, 1), nn.Flatten()]
            x = torch.randn(4, 2, 5, 5)
        else:
            layers = [nn.Linear(2, 3), norm, nn.Tanh(), nn.Linear(3, 2)]
            x = torch.randn(6, 2)
    return nn.Sequential(*layers).double().eval(), x.double()


def _dense_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,)).reshape(
            -1
        )

    blocks = torch.autograd.functional.jacobian(f, params)
    return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1)


def _graph_nodes(*tensors: torch.Tensor) -> set[str]:
    """The class names of every autograd node behind the tensors."""
    seen, stack, names = set(), [t.grad_fn for t in tensors], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _rerouted_node(case: str) -> str:
    """The autograd node of the Function the case's operation must run as."""
    if case in CONVOLUTIONS:
        return "RoutedConvolutionBackward"
    return "_LayerNormBackward" if case in LAYER_NORMS else "_BatchNormEvalBackward"


def _double_backward_jvp(model: nn.Module, x: torch.Tensor, v: list[torch.Tensor]) -> torch.Tensor:
    params = list(model.parameters())
    with backward_for_jvp():
        z = model(x)
    w = torch.zeros_like(z, requires_grad=True)
    gw = torch.autograd.grad(z, params, w, create_graph=True)
    (u,) = torch.autograd.grad(gw, w, v)
    return u


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_jvp_by_double_backward_matches_the_dense_jacobian(case, device):
    model, x = _network(case)
    model, x = model.to(device), x.to(device)
    with backward_for_jvp():  # the operation is rerouted (else this test would check PyTorch's)
        assert _rerouted_node(case) in _graph_nodes(model(x))
    J = _dense_jacobian(model, x)
    v = [torch.randn_like(p) for p in model.parameters()]
    u = _double_backward_jvp(model, x, v)
    expected = J @ torch.cat([t.reshape(-1) for t in v])
    torch.testing.assert_close(u.reshape(-1), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_gradient_is_pytorchs_own(case, device):
    model, x = _network(case)
    model, x = model.to(device), x.to(device)
    w = torch.randn_like(model(x))
    reference = torch.autograd.grad(model(x), list(model.parameters()), w)
    with backward_for_jvp():
        z = model(x)
    ours = torch.autograd.grad(z, list(model.parameters()), w)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_train_mode_batch_norm_keeps_pytorchs_path():
    """Batch statistics make BatchNorm a different function: it is not rerouted."""
    model, x = _network("batch_norm_2d")
    model.train()
    with backward_for_jvp():
        out = model[1](model[0](x))
    assert "NativeBatchNorm" in type(out.grad_fn).__name__


def test_frozen_weight_and_input_without_grad():
    """A frozen convolution passes the tangent of its input; the first one has no input tangent."""
    model, x = _network("conv2d_stride_dilation")
    model[2].weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]
    with backward_for_jvp():
        z = model(x)
    w = torch.zeros_like(z, requires_grad=True)
    gw = torch.autograd.grad(z, params, w, create_graph=True)
    (u,) = torch.autograd.grad(gw, w, v)
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, {**fixed, **p}, (x,))

    primals = {n: p.detach() for n, p in zip(names, params, strict=True)}
    _, expected = torch.func.jvp(f, (primals,), (dict(zip(names, v, strict=True)),))
    torch.testing.assert_close(u, expected, rtol=1e-12, atol=1e-12)


def test_only_integer_padding_is_rerouted():
    """String padding keeps PyTorch's own convolution (and its exact double backward)."""
    seen = []
    original = RoutedConvolution.apply

    def spy(*args):
        seen.append(args[3].padding)
        return original(*args)

    conv = nn.Conv2d(2, 2, 3, padding="same").double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    try:
        RoutedConvolution.apply = spy  # type: ignore[method-assign]
        with backward_for_jvp():
            conv(x)
            nn.Conv2d(2, 2, 3, padding=1).double()(x)
    finally:
        RoutedConvolution.apply = original  # type: ignore[method-assign]
    assert seen == [[1, 1]]


def test_autocast_keeps_pytorchs_path():
    """Under autocast the casts belong to PyTorch's path: nothing is rerouted, nothing breaks."""
    model, x = _network("conv2d_stride_dilation")
    model, x = model.float(), x.float()
    with torch.autocast("cpu", dtype=torch.bfloat16), backward_for_jvp():
        z = model(x)
    assert not {"RoutedConvolutionBackward"} & _graph_nodes(z)
    torch.autograd.grad(z.float().sum(), list(model.parameters()), create_graph=True)


def test_no_graph_no_reroute():
    """Under no_grad the convolution is PyTorch's own, with no autograd Function in between."""
    conv = nn.Conv2d(2, 2, 3)
    with torch.no_grad(), backward_for_jvp():
        y = conv(torch.randn(1, 2, 5, 5))
    assert y.grad_fn is None


@pytest.mark.parametrize("exact", [False, True], ids=["jvp", "hessian"])
def test_output_gradient_is_kept_only_where_a_hessian_needs_it(exact):
    """The Jᵀw graph keeps x and W of a convolution, ȳ only for the exact (Hessian) reroute.

    ȳ enters only the backward's x and W terms (ȳ ⋆ᵀ W̃, x̃ ⋆ ȳ); a JVP by double backward needs
    neither, and keeping ȳ of every convolution would grow the graph by one activation each.
    """
    from hessian_lab.core import conv_double_backward

    conv = nn.Conv2d(2, 3, 3).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    with conv_double_backward() if exact else backward_for_jvp():
        y = conv(x)
    w = torch.randn_like(y, requires_grad=True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.autograd.grad(y, list(conv.parameters()), w, create_graph=True)
    assert shapes.count(tuple(x.shape)) == 1 and shapes.count(tuple(conv.weight.shape)) == 1
    assert shapes.count(tuple(y.shape)) == (1 if exact else 0), shapes
