"""Convolutions through the library's own autograd Functions, shared by two modes.

The modes (:mod:`~hessian_lab.core.backward_for_jvp` for JVPs by double backward,
:mod:`~hessian_lab.core.conv_double_backward` for Hessians) see the functional call with
positional and keyword arguments; :func:`bind_convolution` reads it, :class:`ConvolutionGeometry`
replays the forward, the tangent and PyTorch's own backward kernels (``aten.convolution_backward``)
with the same stride, padding, dilation and groups, and :class:`RoutedConvolution` runs the
convolution with :class:`LeanConvolutionBackward` as its backward, differentiable in the output
gradient only (``exact=False``) or in everything (``exact=True``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

#: The functional convolutions and their number of spatial dimensions.
CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_SIGNATURE = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _as_list(value: int | Sequence[int], dims: int) -> list[int]:
    return [int(value)] * dims if isinstance(value, int) else [int(v) for v in value]


class ConvolutionGeometry:
    """Stride, padding, dilation and groups of one convolution, in ``aten`` form."""

    def __init__(self, func: Any, dims: int, stride: Any, padding: Any, dilation: Any, groups: int):
        self.func, self.dims = func, dims
        self.stride = _as_list(stride, dims)
        self.padding = _as_list(padding, dims)
        self.dilation = _as_list(dilation, dims)
        self.groups = int(groups)

    def conv(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The convolution y = x ⋆ W + b with this geometry."""
        return self.func(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def tangent(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        x_dot: torch.Tensor | None,
        weight_dot: torch.Tensor | None,
        bias_dot: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """ẏ = ẋ ⋆ W + x ⋆ Ẇ + ḃ, the convolution's tangent; None when all three are None."""
        out = None
        if weight_dot is not None or bias_dot is not None:
            w = torch.zeros_like(weight) if weight_dot is None else weight_dot
            out = self.conv(x, w, bias_dot)
        if x_dot is not None:
            term = self.conv(x_dot, weight, None)
            out = term if out is None else out + term
        return out

    def backward(
        self,
        grad_out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        has_bias: bool,
        mask: list[bool],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(∂/∂x, ∂/∂W, ∂/∂b) of ⟨grad_out, y⟩ where ``mask`` asks for them (aten's kernels)."""
        bias_sizes = [weight.shape[0]] if has_bias else None
        return torch.ops.aten.convolution_backward(
            grad_out,
            x,
            weight,
            bias_sizes,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0] * self.dims,
            self.groups,
            mask,
        )


class LeanConvolutionBackward(torch.autograd.Function):
    """(x̄, W̄, b̄) = a convolution's backward as a function of (ȳ, x, W), with a lean backward.

    Forward: aten's ``convolution_backward`` for what ``mask`` asks (None elsewhere). Backward,
    given the cotangents (x̃, W̃, b̃) of the three outputs, computes only what the inputs need:

    * ȳ: x̃ ⋆ W + x ⋆ W̃ + b̃, the convolution's tangent along the cotangents (two convolutions);
    * x (if it requires grad): ȳ ⋆ᵀ W̃, the input gradient with W̃;
    * W (if it requires grad): x̃ ⋆ ȳ, the weight gradient with input x̃.

    Called with x and W detached it is differentiable in ȳ only, what a JVP by double backward
    needs (:mod:`~hessian_lab.core.backward_for_jvp`), and ȳ is not kept; with x and W live it
    is exact for Hessians (:mod:`~hessian_lab.core.conv_double_backward`). Every term is an
    ordinary differentiable operation, so higher derivatives stay exact.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        grad_out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        geometry: ConvolutionGeometry,
        mask: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor | None, ...]:
        """(x̄, W̄, b̄) where ``mask`` asks for them, None elsewhere (aten's kernels)."""
        needs = ctx.needs_input_grad
        # ȳ is needed again only for the x and W terms: a JVP's graph does not keep it.
        ctx.save_for_backward(grad_out if needs[1] or needs[2] else None, x, weight)
        ctx.geometry = geometry
        ctx.set_materialize_grads(False)
        return tuple(geometry.backward(grad_out, x, weight, mask[2], list(mask)))

    @staticmethod
    def backward(
        ctx: Any,
        x_cot: torch.Tensor | None,
        weight_cot: torch.Tensor | None,
        bias_cot: torch.Tensor | None,
    ) -> tuple[Any, ...]:
        """The cotangents of (ȳ, x, W): the three terms of the class docstring, as needed."""
        grad_out, x, weight = ctx.saved_tensors
        geometry: ConvolutionGeometry = ctx.geometry
        needs = ctx.needs_input_grad
        grad_out_cot = x_in_cot = weight_in_cot = None
        if needs[0]:
            grad_out_cot = geometry.tangent(x, weight, x_cot, weight_cot, bias_cot)
        if needs[1] and weight_cot is not None:
            x_in_cot = geometry.backward(grad_out, x, weight_cot, False, [True, False, False])[0]
        if needs[2] and x_cot is not None:
            weight_in_cot = geometry.backward(grad_out, x_cot, weight, False, [False, True, False])[
                1
            ]
        return grad_out_cot, x_in_cot, weight_in_cot, None, None


class RoutedConvolution(torch.autograd.Function):
    """y = x ⋆ W + b with aten's forward; its backward is :class:`LeanConvolutionBackward`.

    ``exact=False``: x and W enter the backward as constants, so a backward built under
    ``create_graph`` differentiates in ȳ only (JVPs by double backward); ``exact=True``: in ȳ, x
    and W (Hessians). Without ``create_graph`` both are aten's backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        geometry: ConvolutionGeometry,
        exact: bool,
    ) -> torch.Tensor:
        """The convolution y = x ⋆ W + b."""
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.has_bias, ctx.exact = geometry, bias is not None, exact
        return geometry.conv(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        """(x̄, W̄, b̄) for the inputs that need them."""
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = (needs[0], needs[1], ctx.has_bias and needs[2])
        if not any(mask):
            return None, None, None, None, None
        if not ctx.exact:
            x, weight = x.detach(), weight.detach()
        x_bar, w_bar, b_bar = LeanConvolutionBackward.apply(grad_out, x, weight, ctx.geometry, mask)
        return x_bar, w_bar, b_bar, None, None


class ConvolutionCall(NamedTuple):
    """The tensors of one convolution call and its geometry."""

    input: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    geometry: ConvolutionGeometry


def bind_convolution(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> ConvolutionCall | None:
    """The call ``func(*args, **kwargs)`` of a functional convolution, or None to leave it alone.

    None for other functions, string padding (``"same"``, ``"valid"``), unknown keywords or an
    input of the wrong rank: those keep PyTorch's own path.
    """
    dims = CONVOLUTIONS.get(func)
    if dims is None or len(args) > len(_SIGNATURE) or any(k not in _SIGNATURE for k in kwargs):
        return None
    call = dict(_DEFAULTS)
    call.update(zip(_SIGNATURE, args, strict=False))
    call.update(kwargs)
    x, weight = call["input"], call["weight"]
    if (
        isinstance(call["padding"], str)
        or not isinstance(x, torch.Tensor)
        or not isinstance(weight, torch.Tensor)
        or x.dim() != dims + 2
    ):
        return None
    geometry = ConvolutionGeometry(
        func, dims, call["stride"], call["padding"], call["dilation"], call["groups"]
    )
    return ConvolutionCall(x, weight, call["bias"], geometry)


def autocast_enabled() -> bool:
    """Whether autocast is on for the CPU or CUDA (the reroutes then keep PyTorch's path)."""
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
