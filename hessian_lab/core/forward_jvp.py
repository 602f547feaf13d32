"""Forward-mode JVPs u = J v that do not multiply the zero tangent of the data.

u = J v is the tangent of z = f(x; θ) along v, computed alongside z with forward-mode AD
(``torch.autograd.forward_ad``). PyTorch's forward-mode rules for ``addmm`` and ``convolution``
treat an input without a tangent as a zero tangent and multiply it (torch 2.13): the network's
first layer, whose input is the data x, computes ẏ = ẋ W + x Ẇ + ḃ with ẋ = 0, one matrix
product or convolution of that layer's size for nothing. Measured (one thread, CPU) on the MLP
3072-512-512-10 of ``analyses/benchmark_optimizer.py``, where the first layer holds 84% of the
parameters: ``torch.func.jvp`` 17.4 ms for 128 examples, 12.6 ms with this module (medians).

Inside :func:`forward_jvp`, ``F.linear``, ``F.conv1d/2d/3d`` and ``F.conv_transpose1d/2d/3d``
whose input has no tangent but whose weight has one run twice, y = op(x, W, b) and
ẏ = op(x, Ẇ, ḃ), which is exactly their tangent (they are linear in (W, b)); every other call
is PyTorch's own. ``torch.autograd.forward_ad`` is used directly rather than ``torch.func.jvp``:
it measured 1-15% faster on the benchmark's MLP, CNN and ViT (without the reroute) and lets
the reroute see which tensors carry a tangent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# The operations linear in (weight, bias) whose forward-mode rule multiplies a zero input tangent.
_LINEAR_IN_WEIGHT = (
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
)


def _tangent(t: Any) -> torch.Tensor | None:
    """The forward-mode tangent of ``t`` at the current level, or None."""
    return fwAD.unpack_dual(t).tangent if isinstance(t, torch.Tensor) else None


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _replaced(
    args: tuple[Any, ...], kwargs: dict[str, Any], weight: torch.Tensor, bias: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with weight (position 1) and bias (position 2) replaced."""
    args, kwargs = list(args), dict(kwargs)
    for index, name, value in ((1, "weight", weight), (2, "bias", bias)):
        if len(args) > index:
            args[index] = value
        elif name in kwargs or value is not None:
            kwargs[name] = value
    return tuple(args), kwargs


class _SkipAbsentInputTangent(TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _LINEAR_IN_WEIGHT:
            x = _argument(args, kwargs, 0, "input")
            weight = _argument(args, kwargs, 1, "weight")
            bias = _argument(args, kwargs, 2, "bias")
            weight_tangent = _tangent(weight)
            if isinstance(x, torch.Tensor) and weight_tangent is not None and _tangent(x) is None:
                weight_primal = fwAD.unpack_dual(weight).primal
                bias_primal, bias_tangent = (
                    fwAD.unpack_dual(bias) if isinstance(bias, torch.Tensor) else (bias, None)
                )
                primal_args, primal_kwargs = _replaced(args, kwargs, weight_primal, bias_primal)
                tangent_args, tangent_kwargs = _replaced(args, kwargs, weight_tangent, bias_tangent)
                primal = func(*primal_args, **primal_kwargs)
                tangent = func(*tangent_args, **tangent_kwargs)
                return fwAD.make_dual(primal, tangent)
        return func(*args, **kwargs)


def forward_jvp(
    f: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    primals: Mapping[str, torch.Tensor],
    tangents: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output z = f(θ) and u = J v in one forward-mode pass, as ``torch.func.jvp`` gives them.

    Args:
        f: The model as a function of a parameter dict (e.g. from
            :func:`~hessian_lab.core.functional_model.functional_model` with the inputs bound).
        primals: θ, parameter tensors keyed by name (detached: no backward graph is wanted).
        tangents: v, a tensor of the same shape and dtype for every key of ``primals``.

    Returns:
        (z, u), u of the shape of z (zeros where z does not depend on θ).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> x = torch.randn(5, 4)
        >>> theta = {k: p.detach() for k, p in net.named_parameters()}
        >>> v = {k: torch.randn_like(p) for k, p in theta.items()}
        >>> def f(p):
        ...     return torch.func.functional_call(net, p, (x,))
        >>> z, u = forward_jvp(f, theta, v)
        >>> torch.allclose(u, torch.func.jvp(f, (theta,), (v,))[1], atol=1e-6)
        True
    """
    if set(tangents) != set(primals):
        missing, unexpected = (
            sorted(set(primals) - set(tangents)),
            sorted(set(tangents) - set(primals)),
        )
        raise ValueError(
            f"tangents must have the keys of primals; missing {missing}, unexpected {unexpected}."
        )
    with fwAD.dual_level(), _SkipAbsentInputTangent():
        duals = {k: fwAD.make_dual(p, tangents[k]) for k, p in primals.items()}
        z, u = fwAD.unpack_dual(f(duals))
    return z, torch.zeros_like(z) if u is None else u
