"""A model as a pure function of its selected parameters, via ``torch.func.functional_call``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn


def functional_model(
    model: nn.Module, param_names: list[str]
) -> Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """Return ``f(params, inputs) -> outputs`` with only ``param_names`` treated as arguments.

    The other parameters and the buffers are read from ``model`` at call time, detached, so that
    they act as constants for every ``torch.func`` transform.

    Args:
        model: The network (not a ``DistributedDataParallel`` wrapper: pass ``ddp.module``).
        param_names: Names of the parameters that span θ.

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

    def f(params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        # tie_weights=True (the default) lets a shared weight enter under its first name only.
        return torch.func.functional_call(model, {**fixed_tensors(), **params}, (inputs,))

    return f
