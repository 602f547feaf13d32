"""Parameter selection and conversion between flat vectors and parameter-shaped tensors.

Curvature operators act on θ ∈ R^P, the concatenation of the selected parameters in the
order of ``model.named_parameters()``. These helpers are the only place that order is fixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


def select_parameters(
    model: nn.Module, params: Sequence[str] | None = None
) -> dict[str, nn.Parameter]:
    """Return the parameters that span θ, keyed by name.

    Args:
        model: The network.
        params: ``None`` for every parameter with ``requires_grad`` (frozen ones are left out),
            or a list of names from ``model.named_parameters()``.

    Returns:
        An ordered dict ``name -> parameter``. A weight shared by two layers appears once
        (``named_parameters`` de-duplicates it), under its first name.

    Raises:
        ValueError: For an unknown or repeated name, an empty selection, or parameters that
            live on different devices or have different dtypes.
    """
    named = dict(model.named_parameters())
    if params is None:
        selected = {name: p for name, p in named.items() if p.requires_grad}
    else:
        if isinstance(params, str):
            raise TypeError(f"params must be a list of parameter names, not the string {params!r}.")
        unknown = [name for name in params if name not in named]
        if unknown:
            raise ValueError(
                f"Unknown parameter name(s) {unknown}. Valid names are {list(named)} "
                "(see model.named_parameters())."
            )
        if len(set(params)) != len(params):
            raise ValueError(f"params lists a name more than once: {list(params)}.")
        wanted = set(params)
        # Keep the model's order so that the flat layout does not depend on how names were listed.
        selected = {name: p for name, p in named.items() if name in wanted}
    if not selected:
        raise ValueError(
            "No parameters selected: the model has no parameter with requires_grad=True "
            "(or params=[] was given). Unfreeze a parameter or name one in params."
        )
    devices = {p.device for p in selected.values()}
    if len(devices) > 1:
        raise ValueError(
            f"Selected parameters live on different devices {sorted(map(str, devices))}; "
            "move the model to one device with model.to(device)."
        )
    dtypes = {p.dtype for p in selected.values()}
    if len(dtypes) > 1:
        raise ValueError(
            f"Selected parameters have different dtypes {sorted(map(str, dtypes))}; "
            "cast the model with model.to(dtype)."
        )
    return selected


def params_to_vector(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors (a dict's values in order, or a sequence) into one flat vector."""
    values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    return torch.cat([t.reshape(-1) for t in values])


def vector_to_params(
    vector: torch.Tensor, like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Split a flat vector (or a ``[P, k]`` matrix, column-wise) into tensors shaped like ``like``.

    Args:
        vector: Tensor of shape ``[P]``, or ``[P, k]`` for k vectors at once; then each returned
            tensor has shape ``[k, *shape]``, the layout ``torch.func.vmap`` expects.
        like: Name-to-tensor mapping fixing names, order and shapes.

    Returns:
        ``name -> view of vector`` with the shapes of ``like``.
    """
    total = sum(t.numel() for t in like.values())
    if vector.shape[0] != total:
        raise ValueError(f"Vector has {vector.shape[0]} entries but the parameters have {total}.")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, t in like.items():
        chunk = vector[offset : offset + t.numel()]
        if vector.dim() == 1:
            out[name] = chunk.view(t.shape)
        else:
            out[name] = chunk.T.reshape(vector.shape[1], *t.shape)
        offset += t.numel()
    return out


def params_to_matrix(batched: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`vector_to_params` for k vectors: ``{name: [k, *shape]}`` -> ``[P, k]``."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in batched.values()], dim=1).T
