"""hessian_lab: curvature of neural-network losses and the ADLER adaptive learning rate.

Operators for the exact Hessian H, the paper's PSD approximation Q (the generalized
Gauss–Newton matrix) and the paper's GN baseline (the empirical Fisher), all matrix-free.
"""

from hessian_lab.core import params_to_vector, select_parameters, vector_to_params
from hessian_lab.operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
)

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "params_to_vector",
    "select_parameters",
    "vector_to_params",
]
