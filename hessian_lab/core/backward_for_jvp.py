r"""Operations whose backward is cheap to differentiate again, for JVPs by double backward.

The double-backward JVP (:mod:`hessian_lab.core.linearization`) builds g(w) = Jᵀw with
``create_graph=True`` and gets u = J v as one more backward, ∂(g(w)·v)/∂w. That second backward
needs, per operation, only the derivative of its backward with respect to the output gradient,
which is the operation's tangent. PyTorch gets it wastefully for three (torch 2.13, CPU):

* **Convolution** y = x ⋆ W + b, tangent ẏ = ẋ ⋆ W + x ⋆ Ẇ + ḃ (two convolutions).
  ``ConvolutionBackwardBackward`` measured 13 convolutions and copies per JVP on a
  5-convolution CNN where 9 suffice (3.3 gradients instead of about 1.5).
* **LayerNorm** y = γ ⊙ x̂ + β with x̂ = (x − μ)/σ over the normalized dimensions, tangent

  .. math:: \dot y = \gamma \odot \frac{\dot x - \overline{\dot x}
            - \hat x\, \overline{\dot x \odot \hat x}}{\sigma} + \dot\gamma \odot \hat x + \dot\beta

  (bars: means over the normalized dimensions). ``NativeLayerNormBackwardBackward`` forms it from
  about 36 small kernels, 30% of a small ViT's JVP.
* **BatchNorm in eval mode** (running statistics μ, σ²), tangent ẏ = ẋ ⊙ γ/σ + γ̇ ⊙ x̂ + β̇.
  PyTorch's double backward keeps the output gradient ȳ of every BatchNorm (68 MiB of a
  ResNet-18's Jᵀw graph on 32 CIFAR images, beside 143 MiB of activations). Train-mode BatchNorm
  (batch statistics) keeps PyTorch's own path.

Inside :func:`backward_for_jvp`, ``F.conv1d``/``conv2d``/``conv3d`` with integer padding (what
``nn.Conv*d`` calls, also with ``padding_mode != "zeros"``), ``F.layer_norm`` and eval-mode
``F.batch_norm`` run as autograd Functions with PyTorch's own forward and first backward
(``aten.convolution_backward``, ``aten.native_layer_norm_backward``,
``aten.native_batch_norm_backward``), but a backward built under ``create_graph=True`` is
differentiable **with respect to the output gradient only**, by the tangents above. That is
exactly what a JVP by double backward differentiates; a Hessian, which also needs the derivatives
with respect to x and the parameters, must not be built under this mode (its missing terms would
be zeros). Only the library uses it, around the forward whose graph serves JVPs. Under autocast
nothing is rerouted (the casts are PyTorch's own path's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hessian_lab.core.convolution_call import (
    RoutedConvolution,
    autocast_enabled,
    bind_convolution,
)


def _wanted(
    values: Sequence[torch.Tensor | None], mask: Sequence[bool]
) -> tuple[torch.Tensor, ...]:
    """The values a backward was asked for (``mask``), as a Function's outputs."""
    return tuple(v for v, wanted in zip(values, mask, strict=True) if wanted)


def _unmask(values: Sequence[torch.Tensor], mask: Sequence[bool]) -> list[torch.Tensor | None]:
    """The inverse of :func:`_wanted`: None where the mask asked for nothing."""
    it = iter(values)
    return [next(it) if wanted else None for wanted in mask]


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


class _LayerNormBackward(torch.autograd.Function):
    """(x̄, γ̄, β̄) = LayerNorm's backward at fixed x, γ, as a linear function of ȳ.

    Its own backward maps (ẋ, γ̇, β̇) to the tangent ẏ of the module docstring.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        grad_out: torch.Tensor,
        x: torch.Tensor,
        shape: list[int],
        mean: torch.Tensor,
        rstd: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mask: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.dims, ctx.mask = tuple(range(-len(shape), 0)), mask
        grads = torch.ops.aten.native_layer_norm_backward(
            grad_out, x, shape, mean, rstd, weight, bias, list(mask)
        )
        return _wanted(grads, mask)

    @staticmethod
    def backward(ctx: Any, *tangents: torch.Tensor | None) -> tuple[Any, ...]:
        x, mean, rstd, weight = ctx.saved_tensors
        dx, dw, db = _unmask(tangents, ctx.mask)
        x_hat = (x - mean) * rstd
        out = None
        if dx is not None:
            centred = dx - dx.mean(ctx.dims, keepdim=True)
            projection = (dx * x_hat).mean(ctx.dims, keepdim=True)
            out = (centred - x_hat * projection) * rstd
            if weight is not None:
                out = out * weight
        if dw is not None:
            out = x_hat * dw if out is None else out + x_hat * dw
        if db is not None:
            out = db.expand_as(x) if out is None else out + db
        return out, None, None, None, None, None, None, None


class _LayerNorm(torch.autograd.Function):
    """y = γ ⊙ x̂ + β with aten's forward and backward.

    Under ``create_graph`` the backward is :class:`_LayerNormBackward`, differentiable with
    respect to ȳ only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        shape: list[int],
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, mean, rstd, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = (needs[0], weight is not None and needs[2], bias is not None and needs[3])
        if not any(mask):
            return None, None, None, None, None
        # As for convolutions: the linear map ȳ ↦ (x̄, γ̄, β̄), differentiable in ȳ only.
        linear_map = _LayerNormBackward.apply(
            grad_out, x.detach(), ctx.shape, mean, rstd, _detached(weight), _detached(bias), mask
        )
        grads = _unmask(linear_map, mask)
        return grads[0], None, grads[1], grads[2], None


def _layer_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """``F.layer_norm`` through :class:`_LayerNorm`, or None where its arguments are unusual."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    call = {"weight": None, "bias": None, "eps": 1e-5, **dict(zip(names, args, strict=False))}
    call.update(kwargs)
    x = call["input"]
    if not isinstance(x, torch.Tensor) or "normalized_shape" not in call:
        return None
    shape = call["normalized_shape"]
    shape = [int(shape)] if isinstance(shape, int) else [int(s) for s in shape]
    return _LayerNorm.apply(x, shape, call["weight"], call["bias"], float(call["eps"]))


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[C]`` tensor viewed to broadcast over ``[N, C, *spatial]``."""
    return t.reshape((1, -1) + (1,) * (like.dim() - 2))


class _BatchNormEvalBackward(torch.autograd.Function):
    """(x̄, γ̄, β̄) = eval-mode BatchNorm's backward at fixed x, γ, as a linear function of ȳ.

    Its own backward maps (ẋ, γ̇, β̇) to ẏ = ẋ ⊙ γ/σ + γ̇ ⊙ x̂ + β̇ (σ, x̂ from running statistics),
    written as ẏ = a ⊙ ẋ + b ⊙ x + c with per-channel a = γ/σ, b = γ̇/σ, c = β̇ − μ γ̇/σ.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        grad_out: torch.Tensor,
        x: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        weight: torch.Tensor | None,
        eps: float,
        mask: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(x, mean, var, weight)
        ctx.eps, ctx.mask = eps, mask
        grads = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, mean, var, None, None, False, eps, list(mask)
        )
        return _wanted(grads, mask)

    @staticmethod
    def backward(ctx: Any, *tangents: torch.Tensor | None) -> tuple[Any, ...]:
        x, mean, var, weight = ctx.saved_tensors
        dx, dw, db = _unmask(tangents, ctx.mask)
        rstd = torch.rsqrt(var + ctx.eps)
        c = torch.zeros_like(mean) if db is None else db
        out = None
        if dw is not None:
            b = dw * rstd
            out = torch.addcmul(_per_channel(c - mean * b, x), x, _per_channel(b, x))
        if dx is not None:
            a = rstd if weight is None else weight * rstd
            if out is None:
                out = torch.addcmul(_per_channel(c, x), dx, _per_channel(a, x))
            else:
                out.addcmul_(dx, _per_channel(a, x))
        if out is None:
            out = _per_channel(c, x).expand_as(x)
        return out, None, None, None, None, None, None


class _BatchNormEval(torch.autograd.Function):
    """y = γ ⊙ (x − μ)/σ + β with running statistics (eval mode), aten's forward and backward.

    Under ``create_graph`` the backward is :class:`_BatchNormEvalBackward`, differentiable with
    respect to ȳ only (PyTorch's own keeps ȳ of every BatchNorm for its double backward).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, mean, var, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, mean, var, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = (needs[0], weight is not None and needs[3], ctx.has_bias and needs[4])
        if not any(mask):
            return None, None, None, None, None, None
        # As for convolutions: the linear map ȳ ↦ (x̄, γ̄, β̄), differentiable in ȳ only.
        linear_map = _BatchNormEvalBackward.apply(
            grad_out, x.detach(), mean, var, _detached(weight), ctx.eps, mask
        )
        grads = _unmask(linear_map, mask)
        return grads[0], None, None, grads[1], grads[2], None


def _batch_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Eval-mode ``F.batch_norm`` through :class:`_BatchNormEval`; None for anything else."""
    names = (
        "input",
        "running_mean",
        "running_var",
        "weight",
        "bias",
        "training",
        "momentum",
        "eps",
    )
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    call = {"weight": None, "bias": None, "training": False, "eps": 1e-5}
    call.update(zip(names, args, strict=False))
    call.update(kwargs)
    x, mean, var = call.get("input"), call.get("running_mean"), call.get("running_var")
    tensors = all(isinstance(t, torch.Tensor) for t in (x, mean, var))
    if call["training"] or not tensors or x.dim() < 2 or mean.requires_grad or var.requires_grad:
        return None  # batch statistics, or unusual arguments: PyTorch's own path
    return _BatchNormEval.apply(x, mean, var, call["weight"], call["bias"], float(call["eps"]))


class _BackwardForJVP(TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if not torch.is_grad_enabled() or autocast_enabled():
            # Nothing to differentiate, or autocast, whose casts live in PyTorch's own path.
            return func(*args, **kwargs)
        if func is F.layer_norm or func is F.batch_norm:
            rerouted = _layer_norm if func is F.layer_norm else _batch_norm
            out = rerouted(args, kwargs)
            return func(*args, **kwargs) if out is None else out
        call = bind_convolution(func, args, kwargs)
        if call is not None:  # string padding and unusual arguments keep PyTorch's own path
            return RoutedConvolution.apply(call.input, call.weight, call.bias, call.geometry, False)
        return func(*args, **kwargs)


@contextlib.contextmanager
def backward_for_jvp() -> Iterator[None]:
    """Convolutions and normalizations whose backward differentiates cheaply (to the tangent).

    A backward built under ``create_graph`` inside this context gives JVPs by double backward at
    the cost of the operations' tangents (module docstring). Not for Hessians.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> conv = nn.Conv2d(2, 3, 3, padding=1)
        >>> x = torch.randn(4, 2, 5, 5)
        >>> v = {k: torch.randn_like(p) for k, p in conv.named_parameters()}
        >>> with backward_for_jvp():
        ...     y = conv(x)
        >>> w = torch.zeros_like(y, requires_grad=True)
        >>> gw = torch.autograd.grad(y, list(conv.parameters()), w, create_graph=True)
        >>> (u,) = torch.autograd.grad(gw, w, list(v.values()))
        >>> _, ref = torch.func.jvp(lambda p: torch.func.functional_call(conv, p, (x,)),
        ...                         (dict(conv.named_parameters()),), (v,))
        >>> torch.allclose(u, ref, atol=1e-5)
        True
    """
    with _BackwardForJVP():
        yield
