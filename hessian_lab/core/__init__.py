"""Layer 1: the model and loss as pure functions of a parameter dict, and the data they see."""

from hessian_lab.core.batches import Batch, BatchSource
from hessian_lab.core.functional_model import functional_model
from hessian_lab.core.linearization import Linearization
from hessian_lab.core.model_checks import check_model_mode
from hessian_lab.core.parameters import (
    params_to_matrix,
    params_to_vector,
    select_parameters,
    vector_to_params,
)
from hessian_lab.core.progress import PlainProgress, progress_bar

__all__ = [
    "Batch",
    "BatchSource",
    "check_model_mode",
    "functional_model",
    "Linearization",
    "params_to_matrix",
    "PlainProgress",
    "progress_bar",
    "params_to_vector",
    "select_parameters",
    "vector_to_params",
]
