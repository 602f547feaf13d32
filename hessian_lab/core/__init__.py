"""Layer 1: the model and loss as pure functions of a parameter dict, and the data they see."""

from hessian_lab.core.attention import differentiable_attention
from hessian_lab.core.backward_for_jvp import backward_for_jvp
from hessian_lab.core.batches import Batch, BatchFn, BatchSource, batch_examples, is_batch
from hessian_lab.core.conv_double_backward import conv_double_backward
from hessian_lab.core.forward_jvp import forward_jvp
from hessian_lab.core.functional_model import functional_model
from hessian_lab.core.linearization import JVP_METHODS, Linearization, auto_jvp_method
from hessian_lab.core.model_call import (
    CallArguments,
    ModelInputs,
    OutputFn,
    call_arguments,
    forward,
    input_tensors,
    move_inputs,
    prediction,
    slice_examples,
)
from hessian_lab.core.model_checks import check_model_mode
from hessian_lab.core.parameters import (
    params_to_matrix,
    params_to_vector,
    select_parameters,
    vector_to_params,
)
from hessian_lab.core.progress import PlainProgress, progress_bar

__all__ = [
    "JVP_METHODS",
    "Batch",
    "BatchFn",
    "CallArguments",
    "BatchSource",
    "Linearization",
    "ModelInputs",
    "OutputFn",
    "PlainProgress",
    "auto_jvp_method",
    "batch_examples",
    "call_arguments",
    "check_model_mode",
    "conv_double_backward",
    "backward_for_jvp",
    "differentiable_attention",
    "forward",
    "forward_jvp",
    "functional_model",
    "input_tensors",
    "is_batch",
    "move_inputs",
    "params_to_matrix",
    "params_to_vector",
    "prediction",
    "progress_bar",
    "select_parameters",
    "slice_examples",
    "vector_to_params",
]
