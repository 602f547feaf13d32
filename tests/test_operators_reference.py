"""The dense references are themselves right: finite differences, symmetry, consistency.

A reference can be wrong too (DESIGN.md §7), so before the operators are compared with it, every
reference quantity is checked against central finite differences of the loss, the gradient or
the outputs, and against torch's own loss.
"""

import pytest
import torch
from dense_reference import (
    FD_TOL,
    all_cases,
    case_id,
    finite_difference_errors,
    get_case,
    make_loss,
    risk_weight,
)

# Symmetry of a matrix assembled from P separate backward passes (H) or written as Jᵀ Λ J (Q, GN):
# entries (i, j) and (j, i) differ only by rounding, ~1e-16 relative; 1e-13 allows the summation.
SYM_TOL = 1e-13


@pytest.mark.parametrize("case", all_cases(), ids=case_id)
def test_reference_matches_finite_differences(case):
    ref = get_case(*case).ref
    errors = finite_difference_errors(ref)
    bad = {k: v for k, v in errors.items() if not v <= FD_TOL}
    assert not bad, f"reference disagrees with finite differences: {bad}"


@pytest.mark.parametrize("case", all_cases(), ids=case_id)
def test_reference_is_symmetric_and_consistent(case):
    c = get_case(*case)
    ref = c.ref
    for name in ("hessian", "ggn", "fisher", "fisher_batch"):
        m = ref.matrix(name)
        assert float((m - m.T).norm() / m.norm()) <= SYM_TOL, name
    # The per-example losses add up to torch's own loss on the whole data.
    z = ref.forward(ref.theta, ref.x)
    torch_loss = make_loss(c.kind, c.reduction)(z, ref.y)
    assert torch.allclose(ref.loss, torch_loss, rtol=1e-14, atol=0)
    # w Σ g_n = G: the per-example gradients add up to the full-batch gradient.
    total = risk_weight(c.reduction, ref.x.shape[0]) * ref.per_example_grads.sum(0)
    assert float((total - ref.gradient).norm() / ref.gradient.norm()) <= 1e-13
    # Q and GN are PSD by construction.
    for name in ("ggn", "fisher"):
        eig = torch.linalg.eigvalsh(ref.matrix(name))
        assert eig[0] >= -1e-12 * eig[-1], name
