"""Refuse models whose loss is not a deterministic, per-example function of θ."""

from __future__ import annotations

from torch import nn

_COUPLING = (nn.modules.batchnorm._BatchNorm,)
_RANDOM = (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)


def check_model_mode(model: nn.Module, allow_train_mode: bool = False) -> None:
    """Raise if a layer makes the loss couple examples or become random.

    BatchNorm in train mode normalizes with batch statistics (examples are coupled, per-example
    Jacobians are not what the formulas assume); Dropout in train mode makes the function random,
    so products with the "same" matrix differ.

    Args:
        model: The network.
        allow_train_mode: Skip the check (the user accepts the consequences).

    Raises:
        ValueError: Naming the offending layer and suggesting ``model.eval()``.
    """
    if allow_train_mode:
        return
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, _COUPLING):
            raise ValueError(
                f"Layer {name!r} ({type(module).__name__}) is in train mode: it normalizes with "
                "batch statistics, which couples examples. Call model.eval() first, or pass "
                "allow_train_mode=True if you want the train-mode function."
            )
        # nn.MultiheadAttention applies dropout to its attention weights without a Dropout module.
        attention_dropout = isinstance(module, nn.MultiheadAttention) and module.dropout > 0
        if (isinstance(module, _RANDOM) and module.p > 0) or attention_dropout:
            raise ValueError(
                f"Layer {name!r} ({type(module).__name__}) is in train mode: dropout makes the "
                "loss random, so curvature products are not reproducible. Call model.eval() "
                "first, or pass allow_train_mode=True."
            )
