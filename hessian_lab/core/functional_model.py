"""A model as a pure function of its selected parameters, via ``torch.func.functional_call``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from hessian_lab.core.attention import differentiable_attention
from hessian_lab.core.model_call import ModelInputs, OutputFn, call_arguments, prediction


def functional_model(
    model: nn.Module, param_names: list[str], output_fn: OutputFn | None = None
) -> Callable[[Mapping[str, torch.Tensor], ModelInputs], torch.Tensor]:
    """Return ``f(params, inputs) -> z`` with only ``param_names`` treated as arguments.

    The other parameters and the buffers are read from ``model`` at call time, detached, so that
    they act as constants for every ``torch.func`` transform. Inputs are unpacked as
    :func:`~hessian_lab.core.model_call.call_arguments` says, attention runs through kernels
    that support forward mode and double backward
    (:func:`~hessian_lab.core.attention.differentiable_attention`), and the output is mapped to
    the loss's input by :func:`~hessian_lab.core.model_call.prediction`.

    Args:
        model: The network (not a ``DistributedDataParallel`` wrapper: pass ``ddp.module``).
        param_names: Names of the parameters that span θ.
        output_fn: Maps the model's output to z (default: the tensor, or its ``logits``).

    Returns:
        The pure function z = f(x; θ).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "torch.func transforms cannot run through a DistributedDataParallel wrapper; "
            "pass ddp_model.module instead."
        )
    selected = set(param_names)

    def fixed_tensors() -> dict[str, torch.Tensor]:
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in selected}
        # Copies: a train-mode BatchNorm updates its running statistics in place, which
        # torch.func forbids on captured tensors and which must not change the user's model.
        fixed.update({n: b.clone() for n, b in model.named_buffers()})
        return fixed

    def f(params: Mapping[str, torch.Tensor], inputs: ModelInputs) -> torch.Tensor:
        args, kwargs = call_arguments(inputs)
        with differentiable_attention():
            # tie_weights=True (the default) lets a shared weight enter under its first name.
            output = torch.func.functional_call(model, {**fixed_tensors(), **params}, args, kwargs)
        return prediction(output, output_fn)

    return f
