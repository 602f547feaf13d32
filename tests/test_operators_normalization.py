"""Combining batches: weighted / ignored cross-entropy targets, and callables of unknown reduction.

Regression tests: batches used to be weighted by N_b / N even where PyTorch's "mean" divides by
the summed class weights of the non-ignored targets, and a summing callable without a
``reduction`` attribute was silently treated as a mean.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_lab import EmpiricalFisherOperator, GGNOperator, HessianOperator

TOL = 1e-10


def _setup(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(11, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=gen)
    y[[1, 6, 7]] = -100  # ignored targets, unevenly spread over the batches below
    return model, x, y


def _dense_hessian(model, loss_fn, x, y):
    """Full-data Hessian by double backward, column by column (independent of the operators)."""
    params = list(model.parameters())
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    cols = []
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], params, retain_graph=True)
        cols.append(torch.cat([r.reshape(-1) for r in row]))
    return torch.stack(cols)


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)),
    ],
    ids=["ignore_index", "class_weight+ignore_index"],
)
def test_batches_combine_like_the_whole_data_mean(loss_fn):
    model, x, y = _setup()
    batches = [(x[:2], y[:2]), (x[2:8], y[2:8]), (x[8:], y[8:])]
    ref = _dense_hessian(model, loss_fn, x, y)
    H = HessianOperator(model, loss_fn, batches).to_dense()
    assert (H - ref).norm() <= TOL * ref.norm()
    # Q over batches equals Q over the single concatenated batch.
    Q_batches = GGNOperator(model, loss_fn, batches).to_dense()
    Q_whole = GGNOperator(model, loss_fn, (x, y)).to_dense()
    assert (Q_batches - Q_whole).norm() <= TOL * Q_whole.norm()
    g = HessianOperator(model, loss_fn, batches).gradient()
    g_ref = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    g_ref = torch.cat([t.reshape(-1) for t in g_ref])
    assert (g - g_ref).norm() <= TOL * g_ref.norm()


def test_callable_without_reduction_must_declare_it_when_it_matters():
    model, x, y = _setup()
    y = y.clamp(min=0)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]

    def summed(z, t):
        return F.cross_entropy(z, t, reduction="sum")

    with pytest.raises(ValueError, match="reduction='mean' or reduction='sum'"):
        GGNOperator(model, summed, batches)
    with pytest.raises(ValueError, match="reduction='mean' or reduction='sum'"):
        EmpiricalFisherOperator(model, summed, (x, y))  # per-example gradients need it
    # One batch of H or Q: the reduction does not change the matrix, so no need to declare.
    GGNOperator(model, summed, (x, y))

    declared = GGNOperator(model, summed, batches, reduction="sum").to_dense()
    builtin = GGNOperator(model, nn.CrossEntropyLoss(reduction="sum"), batches).to_dense()
    assert (declared - builtin).norm() <= TOL * builtin.norm()
    with pytest.raises(ValueError, match="contradicts"):
        GGNOperator(model, nn.CrossEntropyLoss(), batches, reduction="sum")


def test_data_of_another_dtype_is_named():
    model, x, y = _setup()
    with pytest.raises(
        ValueError, match=r"inputs are torch.float32 .* parameters are torch.float64"
    ):
        GGNOperator(model, nn.CrossEntropyLoss(), (x.float(), y.clamp(min=0))).matvec(
            torch.zeros(31, dtype=torch.float64)
        )


def test_step_size_masks_ignored_targets_on_any_batch():
    """The curvature form is picked on the first batch; a later batch with ignored targets must
    still give η = GᵀG / GᵀQG of its own batch (the closed form masks them)."""
    from hessian_lab.optim.step_size import StepSizeEstimator

    model, x, y = _setup()
    loss_fn = nn.CrossEntropyLoss()
    estimator = StepSizeEstimator(model, loss_fn, curvature="ggn", eps=0.0)
    clean = y.clamp(min=0)
    estimator(x[:5], clean[:5])  # first batch: no ignored target
    step = estimator(x[5:], y[5:])  # holds two ignored targets
    Q = GGNOperator(model, loss_fn, (x[5:], y[5:])).to_dense()
    G = HessianOperator(model, loss_fn, (x[5:], y[5:])).gradient()
    want = (G @ G) / (G @ Q @ G)
    assert abs(float(step.eta) - float(want)) <= TOL * float(want)


class _CountingLoader:
    """An iterable of batches that counts how often it is read (a stand-in for a DataLoader)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.mark.parametrize("cache, passes_after_two_products", [(None, 3), (True, 1)])
def test_a_loader_is_read_once_at_construction(cache, passes_after_two_products):
    model, x, y = _setup()
    loader = _CountingLoader([(x[:5], y[:5]), (x[5:], y[5:])])
    op = GGNOperator(model, nn.CrossEntropyLoss(), loader, cache=cache)
    assert loader.passes == 1  # counting N and the "mean" denominator share one pass
    v = torch.ones(op.num_params, dtype=torch.float64)
    op.matvec(v)
    op.matvec(v)
    assert loader.passes == passes_after_two_products  # streamed: one pass per product
