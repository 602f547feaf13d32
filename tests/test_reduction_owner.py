"""One owner of the loss's reduction (issue 10, #6): every way of saying it gives one number.

A loss can carry its reduction three ways: an ``nn`` loss (``nn.CrossEntropyLoss(reduction=r)``,
``nn.MSELoss(reduction=r)``), a plain callable with ``reduction=r`` declared to the operator or
optimizer, and a callable object with a ``reduction`` attribute. The three must agree (1e-12,
float64) for every curvature (H, Q, GN per example, GN batch) and ADLER's η with every curvature,
for "mean" and "sum", on one batch and on two batches of unequal size; and all must equal the
dense reference (tests/reference_models.py). The regression of issue 10: a plain "sum" callable
declared ``reduction="sum"`` gave an empirical Fisher N_b times too large (the output-space
curvature re-derived the reduction without the declaration and fell back to "mean").
"""

import copy
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from operator_helpers import OPERATORS, make_operator, rel_err
from reference_models import (
    FlatModel,
    assert_reference_valid,
    build_reference,
    raises,
)
from torch import nn

from hessian_lab import ADLER, EmpiricalFisherOperator, GGNOperator
from hessian_lab.optim import StepSizeEstimator
from hessian_lab.optim.step_size import step_size

TOL = 1e-10  # against the reference
SAME = 1e-12  # between two forms of the same loss
N, D, C = 7, 4, 3
SPLIT = (3, 4)
CURVATURES = ("ggn", "ef", "ef_batch", "hessian")
KINDS = ("ce", "mse")
REDUCTIONS = ("mean", "sum")
FORMS = ("nn", "callable", "object")


def _functional(kind, reduction):
    if kind == "ce":
        return lambda z, t: F.cross_entropy(z, t, reduction=reduction)
    return lambda z, t: F.mse_loss(z, t, reduction=reduction)


class LossWithReduction:
    """A plain callable object (not an nn.Module) that carries its reduction as an attribute."""

    def __init__(self, kind, reduction):
        self.kind, self.reduction = kind, reduction

    def __call__(self, z, t):
        return _functional(self.kind, self.reduction)(z, t)


def loss_form(form, kind, reduction):
    """(loss_fn, the keyword arguments the library needs with it)."""
    if form == "nn":
        cls = nn.CrossEntropyLoss if kind == "ce" else nn.MSELoss
        return cls(reduction=reduction), {}
    if form == "callable":
        return _functional(kind, reduction), {"reduction": reduction}
    return LossWithReduction(kind, reduction), {}


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double().eval()


@functools.cache
def tensors(kind, n=N):
    gen = torch.Generator().manual_seed(1 if kind == "ce" else 2)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    if kind == "ce":
        return x, torch.randint(0, C, (n,), generator=gen)
    return x, torch.randn(n, C, generator=gen, dtype=torch.float64)


def batches(kind, layout, n=N):
    x, y = tensors(kind, n)
    if layout == "one":
        return [(x, y)]
    return list(zip(x.split(list(SPLIT)), y.split(list(SPLIT)), strict=True))


def data_of(kind, layout, n=N):
    b = batches(kind, layout, n)
    return b[0] if layout == "one" else b


@functools.cache
def reference(kind, reduction, layout, n=N):
    loss_fn, _ = loss_form("nn", kind, reduction)
    return build_reference(FlatModel(model()), loss_fn, batches(kind, layout, n), reduction)


GRID = list(itertools.product(KINDS, REDUCTIONS, ("one", "two_batches")))


def _id(c):
    return "-".join(c)


@pytest.mark.parametrize("kind, reduction, layout", GRID, ids=[_id(c) for c in GRID])
def test_reference_matches_finite_differences(kind, reduction, layout):
    assert_reference_valid(reference(kind, reduction, layout))


@pytest.mark.parametrize("kind, reduction, layout", GRID, ids=[_id(c) for c in GRID])
@pytest.mark.parametrize("op_name", OPERATORS)
def test_every_form_of_the_loss_gives_one_operator(op_name, kind, reduction, layout):
    ref = reference(kind, reduction, layout)
    dense, grads, losses = {}, {}, {}
    for form in FORMS:
        loss_fn, kwargs = loss_form(form, kind, reduction)
        op = make_operator(op_name, model(), loss_fn, data_of(kind, layout), **kwargs)
        assert op.reduction == reduction
        dense[form], grads[form], losses[form] = op.to_dense(), op.gradient(), op.loss()
        assert rel_err(dense[form], ref.matrix(op_name)) <= TOL, form
        assert rel_err(grads[form], ref.gradient) <= TOL, form
        assert rel_err(losses[form], ref.loss) <= TOL, form
    for a, b in itertools.combinations(FORMS, 2):
        assert rel_err(dense[a], dense[b]) <= SAME, (a, b)
        assert rel_err(grads[a], grads[b]) <= SAME, (a, b)
        assert rel_err(losses[a], losses[b]) <= SAME, (a, b)


EGRID = list(itertools.product(KINDS, REDUCTIONS))


@pytest.mark.parametrize("kind, reduction", EGRID, ids=[_id(c) for c in EGRID])
@pytest.mark.parametrize("curvature", CURVATURES)
def test_every_form_of_the_loss_gives_one_eta(curvature, kind, reduction):
    ref = reference(kind, reduction, "one")
    want = ref.eta(curvature)
    x, y = tensors(kind)
    etas = {}
    for form in FORMS:
        loss_fn, kwargs = loss_form(form, kind, reduction)
        m = model()
        rec = ADLER(m, loss_fn, curvature=curvature, **kwargs).step(x, y)
        est = StepSizeEstimator(model(), loss_fn, curvature, **kwargs)(x, y)
        fn = step_size(model(), loss_fn, x, y, curvature, **kwargs)
        for label, eta in (("adler", rec.eta), ("estimator", est.eta), ("step_size", fn.eta)):
            assert rel_err(eta, want) <= TOL, (form, label)
            etas[form, label] = eta
        assert rel_err(rec.loss, ref.loss) <= TOL, form
        theta1 = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
        assert rel_err(theta1 - ref.theta, -want * ref.gradient) <= TOL, form
    values = list(etas.values())
    for a in values[1:]:
        assert rel_err(a, values[0]) <= SAME


# ------------------------------------------------------------------------------------------------
# The regression: a declared "sum" is used for the per-example gradients.


@pytest.mark.parametrize("kind", KINDS)
def test_empirical_fisher_of_a_declared_sum_callable_is_not_batch_size_times_too_large(kind):
    n = 8
    ref = reference(kind, "sum", "one", n)
    x, y = tensors(kind, n)
    fn = _functional(kind, "sum")
    op = EmpiricalFisherOperator(model(), fn, (x, y), reduction="sum")
    got = op.to_dense()
    assert rel_err(got, ref.fisher) <= TOL
    # The reference: Σ_n g_n g_nᵀ with g_n the gradient of example n's own summed loss.
    by_hand = sum(torch.outer(g, g) for g in ref.per_example_grads)
    assert rel_err(ref.fisher, by_hand) <= 1e-14
    v = torch.ones(op.num_params, dtype=torch.float64)
    assert rel_err(op.quadratic_form(v), v @ ref.fisher @ v) <= TOL
    eta = StepSizeEstimator(model(), fn, "ef", reduction="sum")(x, y).eta
    assert rel_err(eta, ref.eta("ef")) <= TOL
    rec = ADLER(model(), fn, curvature="ef", reduction="sum").step(x, y)
    assert rel_err(rec.eta, ref.eta("ef")) <= TOL


# ------------------------------------------------------------------------------------------------
# A reduction that cannot be known.


def _plain(kind):
    """A plain callable with no reduction attribute and none declared."""
    return _functional(kind, "mean")


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("kind", KINDS)
def test_several_batches_need_a_declared_reduction(kind, op_name):
    with raises(ValueError, "reduction"):
        make_operator(op_name, model(), _plain(kind), data_of(kind, "two_batches"))


@pytest.mark.parametrize("kind", KINDS)
def test_per_example_gradients_need_a_declared_reduction(kind):
    x, y = tensors(kind)
    with raises(ValueError, "reduction"):
        EmpiricalFisherOperator(model(), _plain(kind), (x, y))
    with raises(ValueError, "reduction"):
        StepSizeEstimator(model(), _plain(kind), "ef")
    with raises(ValueError, "reduction"):
        ADLER(model(), _plain(kind), curvature="ef")


@pytest.mark.parametrize("op_name", ["hessian", "ggn", "fisher_batch"])
@pytest.mark.parametrize("kind", KINDS)
def test_one_batch_without_reduction_is_the_losss_own_scale(kind, op_name):
    """Where the reduction cannot matter (one batch, no per-example gradients): no error."""
    ref = reference(kind, "mean", "one")
    op = make_operator(op_name, model(), _plain(kind), data_of(kind, "one"))
    assert rel_err(op.to_dense(), ref.matrix(op_name)) <= TOL


@pytest.mark.parametrize("bad", ["none", "batchmean"])
def test_unknown_reduction_is_refused(bad):
    x, y = tensors("ce")
    with raises(ValueError, "reduction"):
        GGNOperator(model(), _plain("ce"), (x, y), reduction=bad)
    with raises(ValueError, "reduction"):
        StepSizeEstimator(model(), _plain("ce"), "ggn", reduction=bad)
    with raises(ValueError, "reduction"):
        ADLER(model(), _plain("ce"), reduction=bad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_adler_and_estimator_report_the_reduction(reduction):
    fn = _functional("ce", reduction)
    assert StepSizeEstimator(model(), fn, "ggn", reduction=reduction).reduction == reduction
    opt = ADLER(copy.deepcopy(model()), fn, reduction=reduction)
    x, y = tensors("ce")
    ref = reference("ce", reduction, "one")
    assert rel_err(opt.step(x, y).eta, ref.eta("ggn")) <= TOL
