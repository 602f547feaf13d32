"""The loops people write (issue 11, item 2): ADLER after the user's own backward, and closures.

a. ``opt.step(inputs, targets)``: ADLER computes G itself (``.grad`` is ignored).
b. ``opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()``: G is the parameters' ``.grad``
   (whatever clipping, GradScaler unscaling, accumulation or DDP left there); ADLER adds only the
   curvature pass, on the batch of the model's latest grad-enabled forward, with the targets of
   ``step(targets=...)``, else of the latest call of an ``nn.Module`` loss, else the model call's
   ``labels`` keyword.
c. ``opt.step(closure)``: torch.optim's closure (zero_grad, forward, backward, return the loss);
   then as b. Returns the closure's loss; the record is ``opt.last_record``.

References: pattern a on a copy of the model, an independent autograd gradient, and the curvature
operators (``GGNOperator.quadratic_form``), which are tested on their own.
"""

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from optim_helpers import (
    assert_vectors_close,
    autograd_gradient,
    close,
    flat_grad,
    flat_params,
    ln_mlp,
    ln_mlp_batches,
    mlp,
    mlp_batches,
    spawn_ranks,
)
from torch import nn

from hessian_lab import ADLER, GGNOperator
from hessian_lab.optim import ADLERRecord
from hessian_lab.optim.step_size import step_size

REL = 1e-12
CURVATURES = ("ggn", "ef", "ef_batch", "hessian")


pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_update(before, after, rate, grad, rel=1e-11):
    assert_vectors_close(after - before, -float(rate) * grad, rel)


def _assert_records_match(rec, ref, rel=REL, loss=True):
    for name in ("eta", "eta_hat", "applied_lr", "grad_sq", "curvature"):
        close(getattr(rec, name), getattr(ref, name), rel)
    if loss:
        close(rec.loss, ref.loss, rel)
    assert not bool(rec.skipped) and not bool(ref.skipped)


def _user_backward(opt, model, loss_fn, x, y):
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss


# ---------------------------------------------------------------------------------------------
# a. opt.step(inputs, targets)


def test_pattern_a_computes_its_own_gradient_and_ignores_grad():
    loss_fn = nn.CrossEntropyLoss()
    model = mlp()
    opt = ADLER(model, loss_fn)
    (x, y), (x2, y2) = mlp_batches(2)
    _user_backward(opt, model, loss_fn, x2, y2)  # a stale gradient of another batch
    for p in model.parameters():
        p.grad.mul_(1e3)
    grad = autograd_gradient(model, loss_fn, x, y)
    eta = step_size(copy.deepcopy(model), loss_fn, x, y, "ggn").eta
    theta = flat_params(model)
    stale = [p.grad.clone() for p in model.parameters()]
    rec = opt.step(x, y)
    # .grad is neither read nor written by pattern a.
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), stale, strict=True))
    assert isinstance(rec, ADLERRecord)
    close(rec.eta, eta)
    close(rec.grad_sq, grad @ grad)
    _assert_update(theta, flat_params(model), rec.applied_lr, grad)
    assert opt.last_record is not None
    _assert_records_match(opt.last_record, rec, rel=0.0)


# ---------------------------------------------------------------------------------------------
# b. after the user's backward


@pytest.mark.parametrize("curvature", CURVATURES)
def test_pattern_b_equals_pattern_a(curvature):
    rel = REL if curvature == "ggn" else 1e-10
    loss_fn = nn.CrossEntropyLoss()
    model_a, model_b = mlp(), mlp()
    opt_a = ADLER(model_a, loss_fn, curvature=curvature)
    opt_b = ADLER(model_b, loss_fn, curvature=curvature)
    for x, y in mlp_batches(3):
        rec_a = opt_a.step(x, y)
        _user_backward(opt_b, model_b, loss_fn, x, y)
        rec_b = opt_b.step()
        assert isinstance(rec_b, ADLERRecord)
        # "ef_batch" makes no pass of its own after the user's backward: its loss is NaN.
        _assert_records_match(rec_b, rec_a, rel, loss=curvature != "ef_batch")
        if curvature == "ef_batch":
            assert torch.isnan(rec_b.loss)
        _assert_records_match(opt_b.last_record, rec_b, 0.0, loss=curvature != "ef_batch")
        assert_vectors_close(flat_params(model_b), flat_params(model_a), rel)
    assert opt_b.num_steps == 3


@pytest.mark.parametrize(
    "options",
    [
        {"curvature_fraction": 0.5},
        {"curvature": "ef", "curvature_fraction": 0.25, "max_lr": 0.5, "trust_region": 0.05},
        {"params": ["0.bias", "2.weight"]},
    ],
)
def test_pattern_b_equals_pattern_a_with_options(options):
    loss_fn = nn.CrossEntropyLoss()
    model_a, model_b = mlp(), mlp()
    opt_a = ADLER(model_a, loss_fn, **options)
    opt_b = ADLER(model_b, loss_fn, **options)
    frozen = model_b[0].weight.detach().clone()
    fraction = options.get("curvature_fraction")
    for x, y in mlp_batches(3):
        m = math.ceil(fraction * len(y)) if fraction else len(y)
        with torch.no_grad():  # not recorded: grad is off
            sub_loss = loss_fn(model_b(x[:m]), y[:m])
        rec_a = opt_a.step(x, y)
        _user_backward(opt_b, model_b, loss_fn, x, y)  # .grad of every parameter, frozen ones too
        rec_b = opt_b.step()
        close(rec_b.loss, sub_loss)
        # The record's loss after the user's backward is the curvature pass's: with a
        # curvature_fraction, that of the first ⌈f·N⌉ examples (docs); compared separately.
        _assert_records_match(rec_b, rec_a, 1e-10, loss="curvature_fraction" not in options)
        assert_vectors_close(flat_params(model_b), flat_params(model_a), 1e-10)
    if "params" in options:
        assert torch.equal(model_b[0].weight, frozen)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, a, b):
        return self.net(torch.cat([a, b], dim=1))


def test_pattern_b_replays_a_positional_tuple_call():
    loss_fn = nn.CrossEntropyLoss()
    x, y = mlp_batches(1)[0]
    a, b = x[:, :2], x[:, 2:]
    model_a, model_b = _TwoInputs(), _TwoInputs()
    rec_a = ADLER(model_a, loss_fn).step((a, b), y)
    opt_b = ADLER(model_b, loss_fn)
    opt_b.zero_grad()
    loss_fn(model_b(a, b), y).backward()
    _assert_records_match(opt_b.step(), rec_a)


def test_pattern_b_ignores_forwards_of_a_copy_of_the_model():
    """A teacher / EMA copy made with deepcopy carries ADLER's hook; its forwards do not count."""
    loss_fn = nn.CrossEntropyLoss()
    (x, y), (x_other, _) = mlp_batches(2)
    model_a, model_b = mlp(), mlp()
    rec_a = ADLER(model_a, loss_fn).step(x, y)
    opt_b = ADLER(model_b, loss_fn)
    teacher = copy.deepcopy(model_b)
    _user_backward(opt_b, model_b, loss_fn, x, y)
    teacher(x_other).sum()  # grad enabled, after the user's forward
    _assert_records_match(opt_b.step(), rec_a)


def test_pattern_b_with_ignore_index_takes_the_loss_modules_targets():
    """GGN under an ignore_index depends on the targets: they must be the loss call's."""
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    x, y = mlp_batches(1)[0]
    y = y.clone()
    y[::3] = -100
    model_a, model_b = mlp(), mlp()
    rec_a = ADLER(model_a, loss_fn).step(x, y)
    opt_b = ADLER(model_b, loss_fn)
    _user_backward(opt_b, model_b, loss_fn, x, y)
    _assert_records_match(opt_b.step(), rec_a)
    # ...which differs from the all-targets curvature, so the test can tell them apart.
    y_all = torch.where(y < 0, torch.zeros_like(y), y)
    other = step_size(
        mlp(), loss_fn, x, y_all, "ggn", direction=autograd_gradient(mlp(), loss_fn, x, y)
    )
    assert not math.isclose(float(other.curvature), float(rec_a.curvature), rel_tol=1e-6)


def test_pattern_b_explicit_targets_win_over_the_loss_modules():
    """With "ef" (target-dependent): step(targets=y2) uses y2, and the user's G (from y)."""
    eps = 1e-10
    loss_fn = nn.CrossEntropyLoss()
    (x, y), (_, y2) = mlp_batches(2)
    model = mlp()
    grad = autograd_gradient(mlp(), loss_fn, x, y)
    ref = step_size(mlp(), loss_fn, x, y2, "ef", direction=grad, eps=eps)
    opt = ADLER(model, loss_fn, curvature="ef", eps=eps)
    _user_backward(opt, model, loss_fn, x, y)
    theta = flat_params(model)
    rec = opt.step(targets=y2)
    close(rec.curvature, ref.curvature, 1e-10)
    close(rec.eta, (grad @ grad) / (ref.curvature + eps * (grad @ grad)), 1e-10)
    _assert_update(theta, flat_params(model), rec.applied_lr, grad)
    # y and y2 give different curvatures (else this test could not fail).
    own = step_size(mlp(), loss_fn, x, y, "ef", direction=grad, eps=eps)
    assert not math.isclose(float(own.curvature), float(ref.curvature), rel_tol=1e-6)


def test_pattern_b_explicit_curvature_batch():
    """step(inputs=x2, targets=y2) after a backward on (x, y): the user's G, Q of (x2, y2)."""
    eps = 1e-10
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    (x, y), (x2, y2) = mlp_batches(2)
    y2 = y2.clone()
    y2[::4] = -100  # the curvature depends on these targets
    model = mlp()
    grad = autograd_gradient(mlp(), loss_fn, x, y)
    q2 = GGNOperator(mlp(), loss_fn, (x2, y2)).quadratic_form(grad)
    gg = grad @ grad
    opt = ADLER(model, loss_fn, eps=eps)
    _user_backward(opt, model, loss_fn, x, y)
    theta = flat_params(model)
    rec = opt.step(inputs=x2, targets=y2)
    close(rec.grad_sq, gg)
    close(rec.curvature, q2, 1e-10)
    close(rec.eta, gg / (q2 + eps * gg), 1e-10)
    _assert_update(theta, flat_params(model), rec.applied_lr, grad)
    # The batch of the user's forward would give another curvature.
    q1 = GGNOperator(mlp(), loss_fn, (x, y)).quadratic_form(grad)
    assert not math.isclose(float(q1), float(q2), rel_tol=1e-6)


class _LabelsModel(nn.Module):
    """A Hugging Face-style call: ``model(x, labels=y)``; the loss is computed outside."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x, labels=None):
        return self.net(x)


def _labels_call(model, x, y, style):
    """``model(x=x, labels=y)`` (keywords only, as ``model(**batch)``) or ``model(x, labels=y)``."""
    return model(x=x, labels=y) if style == "keywords" else model(x, labels=y)


def _plain_cross_entropy(z, y):
    return F.cross_entropy(z, y)


@pytest.mark.parametrize("style", ["keywords", "mixed"])
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_pattern_b_takes_targets_from_the_labels_keyword(curvature, style):
    x, y = mlp_batches(1)[0]
    model_a, model_b = _LabelsModel(), _LabelsModel()
    rec_a = ADLER(model_a, _plain_cross_entropy, curvature=curvature, reduction="mean").step(x, y)
    opt_b = ADLER(model_b, _plain_cross_entropy, curvature=curvature, reduction="mean")
    opt_b.zero_grad()
    _plain_cross_entropy(_labels_call(model_b, x, y, style), y).backward()
    _assert_records_match(opt_b.step(), rec_a, 1e-10)
    assert_vectors_close(flat_params(model_b), flat_params(model_a), 1e-10)


def test_pattern_b_loss_module_targets_win_over_the_labels_keyword():
    loss_fn = nn.CrossEntropyLoss()
    (x, y), (_, y_other) = mlp_batches(2)
    model_a, model_b = _LabelsModel(), _LabelsModel()
    rec_a = ADLER(model_a, loss_fn, curvature="ef").step(x, y)
    opt_b = ADLER(model_b, loss_fn, curvature="ef")
    opt_b.zero_grad()
    loss_fn(model_b(x=x, labels=y_other), y).backward()
    _assert_records_match(opt_b.step(), rec_a, 1e-10)


def test_pattern_b_ignores_forwards_without_grad():
    """An evaluation forward under no_grad between backward and step is not the curvature batch."""
    loss_fn = nn.CrossEntropyLoss()
    (x, y), (x_eval, _) = mlp_batches(2)
    model_a, model_b = mlp(), mlp()
    rec_a = ADLER(model_a, loss_fn).step(x, y)
    opt_b = ADLER(model_b, loss_fn)
    _user_backward(opt_b, model_b, loss_fn, x, y)
    with torch.no_grad():
        model_b(x_eval)
    _assert_records_match(opt_b.step(), rec_a)


def test_pattern_b_step_none_is_pattern_b():
    """accelerate's AcceleratedOptimizer (the HF Trainer) calls ``optimizer.step(None)``."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = mlp_batches(1)[0]
    model_a, model_b = mlp(), mlp()
    rec_a = ADLER(model_a, loss_fn).step(x, y)
    opt_b = ADLER(model_b, loss_fn)
    _user_backward(opt_b, model_b, loss_fn, x, y)
    opt_b.step(None)
    _assert_records_match(opt_b.last_record, rec_a)
    assert_vectors_close(flat_params(model_b), flat_params(model_a))


def test_pattern_b_applies_the_clipped_gradient():
    eps = 0.0  # η = GᵀG / GᵀQG is then invariant to the clip's scale
    loss_fn = nn.CrossEntropyLoss()
    x, y = mlp_batches(1)[0]
    model_a, model_b = mlp(), mlp()
    rec_a = ADLER(model_a, loss_fn, eps=eps).step(x, y)
    opt_b = ADLER(model_b, loss_fn, eps=eps)
    _user_backward(opt_b, model_b, loss_fn, x, y)
    raw = flat_grad(model_b)
    max_norm = 0.1 * float(raw.norm())
    torch.nn.utils.clip_grad_norm_(model_b.parameters(), max_norm)
    clipped = flat_grad(model_b)
    norm = float(raw.norm())
    scale = max_norm / (norm + 1e-6)  # clip_grad_norm_'s coefficient (it adds 1e-6 to the norm)
    close(clipped.norm(), scale * norm, 1e-12)
    theta = flat_params(model_b)
    rec = opt_b.step()
    close(rec.eta, rec_a.eta, 1e-10)
    close(rec.grad_sq, clipped @ clipped)
    _assert_update(theta, flat_params(model_b), rec.applied_lr, clipped)
    # The update is the clipped one: about 10 times shorter than pattern a's.
    ratio = float((flat_params(model_b) - theta).norm() / (flat_params(model_a) - theta).norm())
    close(ratio, scale, 1e-10)


@pytest.mark.parametrize("explicit_unscale", [True, False])
def test_pattern_b_with_grad_scaler(explicit_unscale):
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler is not available")
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    except (RuntimeError, ValueError, TypeError) as exc:  # pragma: no cover
        pytest.skip(f"GradScaler('cpu') is not available: {exc}")
    loss_fn = nn.CrossEntropyLoss()
    batches = mlp_batches(3, dtype=torch.float32)
    model_a, model_b = mlp(torch.float32), mlp(torch.float32)
    opt_a, opt_b = ADLER(model_a, loss_fn), ADLER(model_b, loss_fn)
    for x, y in batches:
        rec_a = opt_a.step(x, y)
        opt_b.zero_grad()
        scaler.scale(loss_fn(model_b(x), y)).backward()
        if explicit_unscale:
            scaler.unscale_(opt_b)
        out = scaler.step(opt_b)
        scaler.update()
        rec = opt_b.last_record
        assert isinstance(rec, ADLERRecord)
        if out is not None:
            assert isinstance(out, ADLERRecord)
        assert not bool(rec.skipped)
        for name in ("eta", "eta_hat", "applied_lr", "grad_sq", "curvature"):
            close(getattr(rec, name), getattr(rec_a, name), 1e-5)
        assert_vectors_close(flat_params(model_b), flat_params(model_a), 1e-5)
    assert scaler.get_scale() == 2.0**4  # no overflow: every step was taken


def test_pattern_b_gradient_accumulation_uses_the_last_micro_batch_for_curvature():
    eps = 1e-10
    loss_fn = nn.CrossEntropyLoss()
    (x1, y1), (x2, y2) = mlp_batches(2, n=8)
    model = mlp()
    copy_ = mlp()
    g_acc = 0.5 * (
        autograd_gradient(copy_, loss_fn, x1, y1) + autograd_gradient(copy_, loss_fn, x2, y2)
    )
    q2 = GGNOperator(copy_, loss_fn, (x2, y2)).quadratic_form(g_acc)
    gg = g_acc @ g_acc
    opt = ADLER(model, loss_fn, eps=eps)
    opt.zero_grad()
    (loss_fn(model(x1), y1) / 2).backward()
    (loss_fn(model(x2), y2) / 2).backward()
    assert_vectors_close(flat_grad(model), g_acc)
    theta = flat_params(model)
    rec = opt.step()
    close(rec.grad_sq, gg)
    close(rec.curvature, q2, 1e-10)
    close(rec.eta, gg / (q2 + eps * gg), 1e-10)
    _assert_update(theta, flat_params(model), rec.applied_lr, g_acc)
    # Micro-batch 1's curvature differs: the test tells the two apart.
    q1 = GGNOperator(copy_, loss_fn, (x1, y1)).quadratic_form(g_acc)
    assert not math.isclose(float(q1), float(q2), rel_tol=1e-6)


def test_pattern_b_plain_function_loss_needs_targets():
    model = mlp()
    opt = ADLER(model, _plain_cross_entropy, reduction="mean")
    x, y = mlp_batches(1)[0]
    opt.zero_grad()
    _plain_cross_entropy(model(x), y).backward()
    theta = flat_params(model)
    with pytest.raises((ValueError, RuntimeError), match="targets"):
        opt.step()
    assert torch.equal(flat_params(model), theta)
    rec = opt.step(targets=y)  # the way out the message names
    assert not bool(rec.skipped)
    ref = step_size(mlp(), _plain_cross_entropy, x, y, "ggn", reduction="mean")
    close(rec.eta, ref.eta)


def test_pattern_b_before_any_backward_raises():
    model = mlp()
    opt = ADLER(model, nn.CrossEntropyLoss())
    opt.zero_grad()
    theta = flat_params(model)
    with pytest.raises((ValueError, RuntimeError), match="backward"):
        opt.step()
    # Also after a forward whose loss was never backpropagated.
    x, y = mlp_batches(1)[0]
    nn.CrossEntropyLoss()(model(x), y)
    with pytest.raises((ValueError, RuntimeError), match="backward"):
        opt.step()
    assert torch.equal(flat_params(model), theta)
    assert opt.num_steps == 0


# ---------------------------------------------------------------------------------------------
# c. closures


@pytest.mark.parametrize("as_keyword", [False, True])
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_closure_equals_pattern_a(as_keyword, curvature):
    rel = REL if curvature == "ggn" else 1e-10
    loss_fn = nn.CrossEntropyLoss()
    model_a, model_c = mlp(), mlp()
    opt_a = ADLER(model_a, loss_fn, curvature=curvature)
    opt_c = ADLER(model_c, loss_fn, curvature=curvature)
    for x, y in mlp_batches(3):
        calls = []

        def closure(x=x, y=y, calls=calls):
            calls.append(torch.is_grad_enabled())
            opt_c.zero_grad()
            loss = loss_fn(model_c(x), y)
            loss.backward()
            return loss

        rec_a = opt_a.step(x, y)
        with torch.no_grad():  # the closure still runs with grad enabled (torch.optim's rule)
            out = opt_c.step(closure=closure) if as_keyword else opt_c.step(closure)
        assert calls == [True]
        assert isinstance(out, torch.Tensor) and not isinstance(out, ADLERRecord)
        close(out, rec_a.loss)
        _assert_records_match(opt_c.last_record, rec_a, rel)
        assert_vectors_close(flat_params(model_c), flat_params(model_a), rel)


def test_closure_returning_none_after_the_users_backward():
    """Lightning's manual optimization: step(closure=<a do-nothing closure>) after backward."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = mlp_batches(1)[0]
    model_a, model_c = mlp(), mlp()
    rec_a = ADLER(model_a, loss_fn).step(x, y)
    opt_c = ADLER(model_c, loss_fn)
    _user_backward(opt_c, model_c, loss_fn, x, y)
    out = opt_c.step(closure=lambda: None)
    assert out is None
    _assert_records_match(opt_c.last_record, rec_a)
    assert_vectors_close(flat_params(model_c), flat_params(model_a))


def test_closure_with_a_plain_function_loss_and_targets():
    x, y = mlp_batches(1)[0]
    model_a, model_c = mlp(), mlp()
    rec_a = ADLER(model_a, _plain_cross_entropy, reduction="mean").step(x, y)
    opt_c = ADLER(model_c, _plain_cross_entropy, reduction="mean")

    def closure():
        opt_c.zero_grad()
        loss = _plain_cross_entropy(model_c(x), y)
        loss.backward()
        return loss

    opt_c.step(closure, targets=y)
    _assert_records_match(opt_c.last_record, rec_a)


# ---------------------------------------------------------------------------------------------
# b under DistributedDataParallel: 2 gloo processes, one spawn for every case


DDP_SIZES = (8, 8)  # equal shards: DDP's gradient mean is then the concatenated batch's mean
DDP_STEPS = 3
DDP_CASES = ("ggn", "ef", "ef_batch", "hessian")


def _ddp_worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sizes = []
    original = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    try:
        results = {}
        lo = sum(DDP_SIZES[:rank])
        for curvature in DDP_CASES:
            ddp = nn.parallel.DistributedDataParallel(ln_mlp())
            loss_fn = nn.CrossEntropyLoss()
            opt = ADLER(ddp, loss_fn, curvature=curvature)
            steps = []
            for x, y in ln_mlp_batches(sum(DDP_SIZES), DDP_STEPS):
                xs, ys = x[lo : lo + DDP_SIZES[rank]], y[lo : lo + DDP_SIZES[rank]]
                opt.zero_grad()
                loss_fn(ddp(xs), ys).backward()  # DDP all-reduces G here
                grad = torch.cat([p.grad.reshape(-1) for p in ddp.module.parameters()]).clone()
                theta = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
                sizes.clear()
                dist.all_reduce = counting_all_reduce
                try:
                    rec = opt.step()
                finally:
                    dist.all_reduce = original
                after = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
                steps.append(
                    {
                        "eta": rec.eta,
                        "applied_lr": rec.applied_lr,
                        "skipped": rec.skipped,
                        "grad": grad,
                        "theta": theta,
                        "after": after,
                        "reduced_sizes": list(sizes),
                    }
                )
            results[curvature] = steps
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results():
    return spawn_ranks(_ddp_worker, 2)


@pytest.mark.parametrize("curvature", DDP_CASES)
def test_ddp_pattern_b_equals_one_process_on_the_concatenated_batch(ddp_results, curvature):
    ranks = [r[curvature] for r in ddp_results]
    model = ln_mlp()
    opt = ADLER(model, nn.CrossEntropyLoss(), curvature=curvature)
    num_params = sum(p.numel() for p in model.parameters())
    for k, (x, y) in enumerate(ln_mlp_batches(sum(DDP_SIZES), DDP_STEPS)):
        g_full = autograd_gradient(model, nn.CrossEntropyLoss(), x, y)
        rec = opt.step(x, y)
        assert torch.equal(ranks[0][k]["eta"], ranks[1][k]["eta"])  # identical on every rank
        for step in (r[k] for r in ranks):
            assert not bool(step["skipped"])
            torch.testing.assert_close(step["eta"], rec.eta, rtol=1e-6, atol=0)
            # DDP's mean gradient = the concatenated batch's (equal shards)...
            torch.testing.assert_close(step["grad"], g_full, rtol=1e-6, atol=1e-9)
            # ...and it is applied as it is: no second reduction of G.
            _assert_update(step["theta"], step["after"], step["applied_lr"], step["grad"], 1e-10)
            # Only the scalars of the curvature term cross the wire during step(), never G.
            assert all(n < num_params for n in step["reduced_sizes"]), step["reduced_sizes"]
            torch.testing.assert_close(step["after"], flat_params(model), rtol=0, atol=1e-6)
    assert any(r[0]["reduced_sizes"] for r in ranks) or curvature == "ef_batch"
