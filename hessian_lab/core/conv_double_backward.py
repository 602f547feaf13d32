r"""Convolutions with an exact, lean double backward, for Hessian-vector products.

A Hessian-vector product by double backward (:mod:`hessian_lab.operators.hessian`) builds the
gradient with ``create_graph=True`` and backpropagates through that backward. For a convolution
y = x ⋆ W + b with output gradient ȳ, the backward is (x̄, W̄, b̄) = (ȳ ⋆ᵀ W, x ⋆ ȳ, Σ ȳ); its
own backward, given the cotangents (x̃, W̃, b̃) of those three, is exactly

.. math:: \tilde{\bar y} = \tilde x \star W + x \star \tilde W + \tilde b, \qquad
          \tilde x_{\text{in}} = \bar y \star^\top \tilde W, \qquad
          \tilde W_{\text{in}} = \tilde x \star \bar y,

two convolutions and two of PyTorch's backward kernels (``aten.convolution_backward``, asked
for the input or the weight gradient only). PyTorch's ``ConvolutionBackwardBackward``
(torch 2.13, CPU) forms the same terms with extra transposed convolutions and copies: a cached
Hessian product on the CNN of ``analyses/benchmark_operators.py`` measured 2.51 gradients with
it and 2.03 with this module (float64 results equal to 7e-16).

Inside :func:`conv_double_backward`, ``F.conv1d``/``conv2d``/``conv3d`` with integer padding
(what ``nn.Conv*d`` calls, also with ``padding_mode != "zeros"``) run as autograd Functions with
PyTorch's forward and backward kernels and the double backward above; every term is an ordinary
differentiable operation, so higher derivatives stay exact too. String padding, transposed
convolutions, autocast and no-grad calls keep PyTorch's path. Unlike
:func:`~hessian_lab.core.backward_for_jvp.backward_for_jvp` this is valid for Hessians; for
JVPs by double backward that module is cheaper (it needs the first of the three terms only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from hessian_lab.core.convolution_call import (
    RoutedConvolution,
    autocast_enabled,
    bind_convolution,
)


class _ConvDoubleBackward(TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if torch.is_grad_enabled() and not autocast_enabled():
            call = bind_convolution(func, args, kwargs)
            if call is not None:
                return RoutedConvolution.apply(
                    call.input, call.weight, call.bias, call.geometry, True
                )
        return func(*args, **kwargs)


@contextlib.contextmanager
def conv_double_backward() -> Iterator[None]:
    """Run convolutions with the exact, lean double backward of the module docstring.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 1, 2))
        >>> x = torch.randn(4, 2, 6, 6)
        >>> params = list(net.parameters())
        >>> v = [torch.randn_like(p) for p in params]
        >>> def hvp():
        ...     g = torch.autograd.grad(net(x).square().sum(), params, create_graph=True)
        ...     return torch.autograd.grad(g, params, v)
        >>> with conv_double_backward():
        ...     ours = hvp()
        >>> all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ours, hvp()))
        True
    """
    with _ConvDoubleBackward():
        yield
