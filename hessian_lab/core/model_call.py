"""How a model is called on a batch's inputs, and which tensor of its output the loss takes.

Inputs may be a tensor (``model(x)``), a tuple or list of tensors (``model(*x)``) or a dict of
tensors (``model(**x)``, e.g. a Hugging Face ``input_ids`` / ``attention_mask`` batch). The
output may be a tensor, or anything with a ``logits`` attribute or key (a Hugging Face
``ModelOutput``, a dict); ``output_fn`` maps any other output to the prediction tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from hessian_lab.core.attention import differentiable_attention


class CallArguments(NamedTuple):
    """Positional and keyword arguments together, for ``model(*args, **kwargs)``.

    E.g. a Hugging Face call ``model(input_ids, attention_mask=mask)`` recorded by ADLER.
    """

    args: tuple
    kwargs: dict


#: What a model takes: a tensor, a tuple/list of tensors, a dict of tensors, or both kinds.
ModelInputs = torch.Tensor | tuple | list | Mapping[str, Any] | CallArguments
#: Maps a model's output to the tensor z the loss takes.
OutputFn = Callable[[Any], torch.Tensor]


def is_model_inputs(inputs: Any) -> bool:
    """Whether ``inputs`` is a tensor, or a tuple/list/dict holding at least one tensor."""
    if isinstance(inputs, torch.Tensor):
        return True
    if isinstance(inputs, CallArguments):
        return is_model_inputs(inputs.args) or is_model_inputs(inputs.kwargs)
    if isinstance(inputs, Mapping):
        return any(isinstance(v, torch.Tensor) for v in inputs.values())
    if isinstance(inputs, (tuple, list)):
        return len(inputs) > 0 and any(isinstance(v, torch.Tensor) for v in inputs)
    return False


def call_arguments(inputs: ModelInputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)``: a dict is keywords, a tuple positional."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, CallArguments):
        return tuple(inputs.args), dict(inputs.kwargs)
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise TypeError(
        f"Model inputs must be a tensor, a tuple/list of tensors or a dict of tensors; got "
        f"{type(inputs).__name__}. Pass batch_fn=... to map each item of data to "
        "(inputs, targets)."
    )


def input_tensors(inputs: ModelInputs) -> Iterator[torch.Tensor]:
    """The tensors among the inputs (top level of a tuple/list/dict)."""
    if isinstance(inputs, torch.Tensor):
        yield inputs
        return
    if isinstance(inputs, CallArguments):
        yield from input_tensors(inputs.args)
        yield from input_tensors(inputs.kwargs)
        return
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v


def move_inputs(inputs: ModelInputs, device: torch.device) -> ModelInputs:
    """The inputs with every tensor on ``device`` (no copy where it is there already)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, CallArguments):
        return CallArguments(move_inputs(inputs.args, device), move_inputs(inputs.kwargs, device))
    if isinstance(inputs, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    moved = [v.to(device) if isinstance(v, torch.Tensor) else v for v in inputs]
    return tuple(moved) if isinstance(inputs, tuple) else moved


def slice_examples(inputs: ModelInputs, index: slice) -> ModelInputs:
    """The inputs of the examples ``index`` (every tensor sliced along its first dimension)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    if isinstance(inputs, CallArguments):
        return CallArguments(
            slice_examples(inputs.args, index), slice_examples(inputs.kwargs, index)
        )
    if isinstance(inputs, Mapping):
        return {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    sliced = [v[index] if isinstance(v, torch.Tensor) else v for v in inputs]
    return tuple(sliced) if isinstance(inputs, tuple) else sliced


def prediction(output: Any, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The tensor z that the loss takes, from a model's output.

    Args:
        output: What the model returned.
        output_fn: Maps ``output`` to z; ``None``: a tensor as it is, else its ``logits``
            attribute or key.

    Raises:
        TypeError: The output is no tensor and has no ``logits``, or ``output_fn`` returned no
            tensor.
    """
    if output_fn is not None:
        z = output_fn(output)
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"output_fn returned {type(z).__name__}, not a tensor.")
        return z
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else None
    if logits is None:
        logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"The model returned {type(output).__name__}, which is not a tensor and has no "
        "'logits'. Pass output_fn=... mapping the model's output to the tensor the loss takes, "
        "e.g. output_fn=lambda out: out[0] or output_fn=lambda out: out['prediction']."
    )


def forward(
    model: nn.Module, inputs: ModelInputs, output_fn: OutputFn | None = None
) -> torch.Tensor:
    """The output z = f(x; θ) of the module itself, with differentiable attention kernels."""
    args, kwargs = call_arguments(inputs)
    with differentiable_attention():
        output = model(*args, **kwargs)
    return prediction(output, output_fn)
