"""Layer 3: curvature operators H, Q (GGN) and GN (empirical Fisher) over a batch or a data set."""

from hessian_lab.operators.base import CurvatureOperator
from hessian_lab.operators.empirical_fisher import EmpiricalFisherOperator
from hessian_lab.operators.ggn import GGNOperator
from hessian_lab.operators.hessian import HessianOperator

__all__ = ["CurvatureOperator", "EmpiricalFisherOperator", "GGNOperator", "HessianOperator"]
