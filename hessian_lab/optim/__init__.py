"""Layer 5: step sizes from the local quadratic model, their averages, ADLER, the SGD baseline."""

from hessian_lab.optim import step_size
from hessian_lab.optim.adler import ADLER, ADLERRecord
from hessian_lab.optim.averaging import average_value, update_average
from hessian_lab.optim.grid_search import (
    SGD_LEARNING_RATES,
    GridSearchResult,
    best_run,
    grid_search,
    sgd_learning_rates,
)
from hessian_lab.optim.step_size import StepSize, StepSizeEstimator

__all__ = [
    "ADLER",
    "ADLERRecord",
    "GridSearchResult",
    "SGD_LEARNING_RATES",
    "StepSize",
    "StepSizeEstimator",
    "average_value",
    "best_run",
    "grid_search",
    "sgd_learning_rates",
    "step_size",
    "update_average",
]
