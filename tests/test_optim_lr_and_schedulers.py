"""ADLER's ``lr`` (issue 11, item 1): a multiplier of the applied rate, driven by any lr_scheduler.

θ ← θ − lr·r_k·G with r_k = min(η̂_k, max_lr, Δ/‖G‖) (the caps only when set). η_k and the running
average never see ``lr``: ``lr = 1`` is Algorithm 1. The record reports η_k (``eta``), the uncapped
average η̂_k (``eta_hat``) and the applied rate lr·r_k (``applied_lr``).
"""

import math

import pytest
import torch
from optim_helpers import autograd_gradient, close, flat_params, mlp, mlp_batches
from torch import nn
from torch.optim import lr_scheduler as sched

from hessian_lab import ADLER
from hessian_lab.optim import ADLERRecord
from hessian_lab.optim.step_size import step_size

REL = 1e-12  # float64 throughout


pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_update(before, after, rate, grad):
    """θ_new − θ = −rate·G, entrywise, relative to the size of the step."""
    delta = after - before
    expected = -float(rate) * grad
    scale = float(expected.abs().max())
    assert scale > 0
    err = float((delta - expected).abs().max())
    assert err <= 1e-11 * scale, (err, scale)


# ---------------------------------------------------------------------------------------------
# lr itself


def test_lr_lives_in_the_param_group_with_default_one_and_the_record_has_its_fields():
    opt = ADLER(mlp(), nn.CrossEntropyLoss())
    assert opt.param_groups[0]["lr"] == 1.0
    assert opt.defaults["lr"] == 1.0
    assert ADLER(mlp(), nn.CrossEntropyLoss(), lr=0.25).param_groups[0]["lr"] == 0.25
    assert set(ADLERRecord._fields) == {
        "loss",
        "eta",
        "eta_hat",
        "applied_lr",
        "grad_sq",
        "curvature",
        "skipped",
    }
    rec = opt.step(*mlp_batches(1)[0])
    for name in ("loss", "eta", "eta_hat", "applied_lr", "grad_sq", "curvature", "skipped"):
        value = getattr(rec, name)
        assert isinstance(value, torch.Tensor) and value.dim() == 0, name
    # lr = 1 with no caps: Algorithm 1, the applied rate is η̂_0 = η_0.
    close(rec.applied_lr, rec.eta_hat)
    close(rec.eta_hat, rec.eta)


@pytest.mark.parametrize("lr", [0.3, 2.5])
def test_lr_scales_the_applied_rate_only_on_the_first_step(lr):
    loss_fn = nn.CrossEntropyLoss()
    x, y = mlp_batches(1)[0]
    paper, scaled = mlp(), mlp()
    grad = autograd_gradient(mlp(), loss_fn, x, y)
    theta = flat_params(scaled)
    rec1 = ADLER(paper, loss_fn).step(x, y)
    rec = ADLER(scaled, loss_fn, lr=lr).step(x, y)
    # Same θ: η_0 and η̂_0 are those of lr = 1, only the applied rate differs.
    close(rec.eta, rec1.eta)
    close(rec.eta_hat, rec1.eta_hat)
    close(rec.applied_lr, lr * float(rec1.eta_hat))
    _assert_update(theta, flat_params(scaled), lr * float(rec1.eta_hat), grad)


def test_average_along_a_trajectory_ignores_lr():
    """η̂_k is Algorithm 1's average of the η_i seen along the (lr-shaped) trajectory."""
    beta, lrs = 0.9, [0.3, 1.7, 0.05, 1.0, 0.6]
    loss_fn = nn.CrossEntropyLoss()
    model, ref = mlp(), mlp()
    opt = ADLER(model, loss_fn, beta=beta, lr=lrs[0])
    logs = []
    for k, (x, y) in enumerate(mlp_batches(len(lrs))):
        opt.param_groups[0]["lr"] = lrs[k]  # changed by hand between steps: takes effect
        eta = step_size(ref, loss_fn, x, y, "ggn").eta  # at the same θ_k
        grad = autograd_gradient(ref, loss_fn, x, y)
        theta = flat_params(model)
        rec = opt.step(x, y)
        assert not bool(rec.skipped)
        close(rec.eta, eta)
        logs.append(math.log(float(eta)))
        weights = [beta ** (k - i) for i in range(k + 1)]
        eta_hat = math.exp(sum(w * v for w, v in zip(weights, logs, strict=True)) / sum(weights))
        close(rec.eta_hat, eta_hat)
        close(rec.applied_lr, lrs[k] * eta_hat)
        _assert_update(theta, flat_params(model), lrs[k] * eta_hat, grad)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat_params(model), ref.parameters())


def test_caps_bound_the_applied_rate_and_eta_hat_stays_uncapped():
    loss_fn = nn.CrossEntropyLoss()
    x, y = mlp_batches(1)[0]
    grad = autograd_gradient(mlp(), loss_fn, x, y)
    free = ADLER(mlp(), loss_fn).step(x, y)
    lr = 0.5

    cap = 0.25 * float(free.eta)
    model = mlp()
    theta = flat_params(model)
    rec = ADLER(model, loss_fn, max_lr=cap, lr=lr).step(x, y)
    close(rec.eta_hat, free.eta_hat)  # the average, no cap
    close(rec.applied_lr, lr * cap)
    _assert_update(theta, flat_params(model), lr * cap, grad)

    radius = 1e-3
    model = mlp()
    theta = flat_params(model)
    rec = ADLER(model, loss_fn, trust_region=radius, lr=lr).step(x, y)
    close(rec.eta_hat, free.eta_hat)
    close(rec.applied_lr, lr * radius / float(grad.norm()), rel=1e-10)
    close((flat_params(model) - theta).norm(), lr * radius, rel=1e-10)

    # A cap that does not bind leaves the rate alone.
    rec = ADLER(mlp(), loss_fn, max_lr=10 * float(free.eta), lr=lr).step(x, y)
    close(rec.applied_lr, lr * float(free.eta_hat))


def test_lr_zero_freezes_theta_but_updates_the_average():
    beta = 0.9
    loss_fn = nn.CrossEntropyLoss()
    model = mlp()
    theta = flat_params(model)
    opt = ADLER(model, loss_fn, beta=beta, lr=0.0)
    (x1, y1), (x2, y2) = mlp_batches(2)
    eta2 = step_size(mlp(), loss_fn, x2, y2, "ggn").eta  # θ does not move: computed at θ_0
    rec1 = opt.step(x1, y1)
    assert not bool(rec1.skipped) and float(rec1.applied_lr) == 0.0
    assert torch.equal(flat_params(model), theta)
    rec2 = opt.step(x2, y2)
    assert torch.equal(flat_params(model), theta)
    assert not bool(rec2.skipped) and float(rec2.applied_lr) == 0.0
    close(rec2.eta, eta2)
    expected = math.exp((beta * math.log(float(rec1.eta)) + math.log(float(eta2))) / (beta + 1))
    close(rec2.eta_hat, expected)
    assert float(rec2.eta_hat) != float(rec1.eta_hat)
    assert opt.num_steps == 2


@pytest.mark.parametrize("lr", [-0.1, -1e-12])
def test_negative_lr_is_refused(lr):
    with pytest.raises(ValueError, match="lr"):
        ADLER(mlp(), nn.CrossEntropyLoss(), lr=lr)


# ---------------------------------------------------------------------------------------------
# every lr_scheduler


def _sequential(opt):
    return sched.SequentialLR(
        opt,
        schedulers=[
            sched.ConstantLR(opt, factor=0.5, total_iters=2),
            sched.ExponentialLR(opt, 0.8),
        ],
        milestones=[2],
    )


def _chained(opt):
    return sched.ChainedScheduler([sched.StepLR(opt, 2, 0.5), sched.ExponentialLR(opt, 0.9)])


SCHEDULERS = {
    "StepLR": lambda opt: sched.StepLR(opt, step_size=2, gamma=0.5),
    "MultiStepLR": lambda opt: sched.MultiStepLR(opt, milestones=[1, 3], gamma=0.3),
    "ExponentialLR": lambda opt: sched.ExponentialLR(opt, gamma=0.7),
    "LambdaLR": lambda opt: sched.LambdaLR(opt, lambda k: 1.0 / (1.0 + k)),
    "MultiplicativeLR": lambda opt: sched.MultiplicativeLR(opt, lambda k: 0.9),
    "CosineAnnealingLR": lambda opt: sched.CosineAnnealingLR(opt, T_max=4, eta_min=0.1),
    "CosineAnnealingWarmRestarts": lambda opt: sched.CosineAnnealingWarmRestarts(opt, T_0=3),
    "LinearLR": lambda opt: sched.LinearLR(opt, start_factor=0.25, total_iters=4),
    "ConstantLR": lambda opt: sched.ConstantLR(opt, factor=0.5, total_iters=2),
    "PolynomialLR": lambda opt: sched.PolynomialLR(opt, total_iters=8, power=2.0),
    "OneCycleLR": lambda opt: sched.OneCycleLR(
        opt, max_lr=1.0, total_steps=10, cycle_momentum=False
    ),
    "CyclicLR": lambda opt: sched.CyclicLR(
        opt, base_lr=0.1, max_lr=1.0, step_size_up=2, cycle_momentum=False
    ),
    "SequentialLR": _sequential,
    "ChainedScheduler": _chained,
}
STEPS = 6


def _reference_lrs(make, steps, metrics=None):
    """The lr sequence the same scheduler gives torch's SGD (lr = 1.0) before each step."""
    param = nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([param], lr=1.0)
    scheduler = make(sgd)
    lrs = []
    for k in range(steps):
        lrs.append(sgd.param_groups[0]["lr"])
        sgd.step()  # no gradient: a no-op that keeps the scheduler's call-order check quiet
        scheduler.step() if metrics is None else scheduler.step(metrics[k])
    return lrs


def _run_with_scheduler(make, metrics=None):
    loss_fn = nn.CrossEntropyLoss()
    model = mlp()
    opt = ADLER(model, loss_fn)
    scheduler = make(opt)
    lrs = []
    for k, (x, y) in enumerate(mlp_batches(STEPS)):
        lr = opt.param_groups[0]["lr"]
        lrs.append(lr)
        grad = autograd_gradient(model, loss_fn, x, y)
        theta = flat_params(model)
        rec = opt.step(x, y)
        assert not bool(rec.skipped)
        close(rec.applied_lr, lr * float(rec.eta_hat))
        _assert_update(theta, flat_params(model), rec.applied_lr, grad)
        scheduler.step() if metrics is None else scheduler.step(metrics[k])
    return lrs


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_shapes_the_applied_rate(name):
    make = SCHEDULERS[name]
    lrs = _run_with_scheduler(make)
    expected = _reference_lrs(make, STEPS)
    assert len(set(expected)) > 1, "the schedule must change lr within the test's steps"
    for got, want in zip(lrs, expected, strict=True):
        assert got == pytest.approx(want, rel=REL, abs=1e-15)


def test_reduce_lr_on_plateau_shapes_the_applied_rate():
    metrics = [1.0, 2.0, 3.0, 0.5, 4.0, 5.0]  # worse and worse, then one improvement
    make = lambda opt: sched.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0)  # noqa: E731
    lrs = _run_with_scheduler(make, metrics)
    expected = _reference_lrs(make, STEPS, metrics)
    assert expected[-1] < expected[0]
    for got, want in zip(lrs, expected, strict=True):
        assert got == pytest.approx(want, rel=REL)


def test_scheduler_does_not_touch_eta():
    """A schedule shapes lr·η̂ only: η_0 (same θ_0, same batch) is that of the paper's run."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = mlp_batches(1)[0]
    paper = ADLER(mlp(), loss_fn).step(x, y)
    opt = ADLER(mlp(), loss_fn)
    sched.LinearLR(opt, start_factor=0.1, total_iters=3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    rec = opt.step(x, y)
    close(rec.eta, paper.eta)
    close(rec.eta_hat, paper.eta_hat)
    close(rec.applied_lr, 0.1 * float(paper.eta_hat))
