"""hessian_lab: curvature of neural-network losses and the ADLER adaptive learning rate.

Operators for the exact Hessian H, the paper's PSD approximation Q (the generalized
Gauss–Newton matrix) and the paper's GN baseline (the empirical Fisher), all matrix-free;
Lanczos, spectral densities, trace estimators and CG on any of them; and ADLER, SGD whose
step size minimizes the local quadratic model under Q (Balboni & Bacciu).
"""

from hessian_lab.core import params_to_vector, select_parameters, vector_to_params
from hessian_lab.linalg import (
    cg,
    compare_operators,
    eigsh,
    hutchinson_diagonal,
    hutchinson_squared_frobenius_norm,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    spectral_density,
)
from hessian_lab.operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
)
from hessian_lab.optim import ADLER, step_size

__version__ = "0.1.0"

__all__ = [
    "ADLER",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "cg",
    "compare_operators",
    "eigsh",
    "hutchinson_diagonal",
    "hutchinson_squared_frobenius_norm",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "params_to_vector",
    "select_parameters",
    "spectral_density",
    "step_size",
    "vector_to_params",
]
