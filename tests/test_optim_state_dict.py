"""ADLER's state in torch.optim's layout (issue 11, item 3).

The running averages s_k, c_k, the step count k and the skip counter live in
``opt.state[first_param]`` ("step", "average_numerator", "average_denominator",
"consecutive_skips", "skip_reasons"); ``state_dict()`` has only "state" and "param_groups"; a fresh
ADLER loads it and continues bit for bit; generic optimizer code (iterating ``opt.state``,
``copy.deepcopy``, ``torch.save``/``torch.load(weights_only=True)``) works; the averages stay in
float32 for a bfloat16 model (torch's default load would cast them to the parameters' dtype).
"""

import copy
import io
import math

import pytest
import torch
from optim_helpers import mlp, mlp_batches
from torch import nn
from torch.optim import lr_scheduler as sched

from hessian_lab import ADLER

KEYS = {"step", "average_numerator", "average_denominator", "consecutive_skips", "skip_reasons"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _first(opt):
    return opt.param_groups[0]["params"][0]


def _as_float(v):
    return float(v) if not torch.is_tensor(v) else float(v.detach().cpu())


def test_state_lives_in_the_first_parameters_entry():
    beta = 0.9
    model = mlp()
    opt = ADLER(model, nn.CrossEntropyLoss(), beta=beta)
    records = [opt.step(x, y) for x, y in mlp_batches(3)]
    first = _first(opt)
    assert first is next(iter(model.parameters()))
    state = opt.state[first]
    assert KEYS <= set(state), set(state)
    assert _as_float(state["step"]) == 3 == opt.num_steps
    logs = [math.log(float(r.eta)) for r in records]
    s = sum(beta ** (2 - i) * v for i, v in enumerate(logs))
    c = sum(beta**i for i in range(3))
    assert _as_float(state["average_numerator"]) == pytest.approx(s, rel=1e-12)
    assert _as_float(state["average_denominator"]) == pytest.approx(c, rel=1e-12)
    assert _as_float(state["consecutive_skips"]) == 0
    assert _as_float(state["skip_reasons"]) == 0
    # Only the first parameter carries state (torch.optim's state is a defaultdict: look, don't
    # create).
    assert [p for p, st in opt.state.items() if len(st)] == [first]
    # The averages are what the optimizer reports.
    s_k, c_k = opt.averages
    assert _as_float(s_k) == _as_float(state["average_numerator"])
    assert _as_float(c_k) == _as_float(state["average_denominator"])


def test_skip_counter_lives_in_the_state_and_survives_a_checkpoint():
    model = mlp()
    opt = ADLER(model, nn.CrossEntropyLoss(), max_consecutive_skips=2)
    (x, y), (x2, y2) = mlp_batches(2)
    opt.step(x, y)
    bad = x2.clone()
    bad[0, 0] = float("nan")
    assert bool(opt.step(bad, y2).skipped)
    state = opt.state[_first(opt)]
    assert _as_float(state["consecutive_skips"]) == 1
    assert int(_as_float(state["skip_reasons"])) & 1  # "the loss was not finite"
    assert _as_float(state["step"]) == 2
    resumed = ADLER(copy.deepcopy(model), nn.CrossEntropyLoss())
    resumed.load_state_dict(opt.state_dict())
    with pytest.raises(RuntimeError, match="2 consecutive steps.*loss was not finite"):
        resumed.step(bad, y2)


def test_state_dict_has_torch_optims_keys_only():
    opt = ADLER(mlp(), nn.CrossEntropyLoss())
    opt.step(*mlp_batches(1)[0])
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert list(sd["state"]) == [0]  # indexed like any optimizer: the first parameter
    assert KEYS <= set(sd["state"][0])
    (group,) = sd["param_groups"]
    assert group["params"] == list(range(len(list(mlp().parameters()))))
    assert group["lr"] == 1.0


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"curvature": "ef", "max_lr": 0.05, "trust_region": 0.1, "lr": 0.7},
        {"curvature": "hessian", "curvature_fraction": 0.5},
        {"curvature": "ggn", "beta_schedule": "fn", "curvature_fraction": 0.25},
    ],
)
def test_round_trip_through_torch_save_is_bit_identical(options):
    options = dict(options)
    if options.get("beta_schedule") == "fn":
        options["beta_schedule"] = lambda k: min(0.99, 0.5 + 0.1 * k)
    loss_fn = nn.CrossEntropyLoss()
    batches = mlp_batches(6, dtype=torch.float32)
    model = mlp(torch.float32)
    opt = ADLER(model, loss_fn, **options)
    for x, y in batches[:3]:
        opt.step(x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    uninterrupted = [opt.step(x, y) for x, y in batches[3:]]

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed_model = mlp(torch.float32, seed=7)
    resumed_model.load_state_dict(ckpt["model"])
    resumed = ADLER(resumed_model, loss_fn, beta_schedule=options.get("beta_schedule"))
    resumed.load_state_dict(ckpt["opt"])
    assert resumed.num_steps == 3
    assert resumed.param_groups[0]["lr"] == options.get("lr", 1.0)
    assert resumed.param_groups[0]["curvature"] == options.get("curvature", "ggn")
    for (x, y), rec in zip(batches[3:], uninterrupted, strict=True):
        rec2 = resumed.step(x, y)
        for name in ("eta", "eta_hat", "applied_lr"):
            assert torch.equal(getattr(rec2, name), getattr(rec, name)), name
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for key in KEYS:
        a, b = opt.state[_first(opt)][key], resumed.state[_first(resumed)][key]
        assert _as_float(a) == _as_float(b), key


SCHEDULERS = {
    "StepLR": lambda opt: sched.StepLR(opt, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda opt: sched.CosineAnnealingLR(opt, T_max=6, eta_min=0.05),
    "OneCycleLR": lambda opt: sched.OneCycleLR(
        opt, max_lr=1.0, total_steps=8, cycle_momentum=False
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_round_trip_with_a_scheduler_is_bit_identical(name):
    make = SCHEDULERS[name]
    loss_fn = nn.CrossEntropyLoss()
    batches = mlp_batches(6, dtype=torch.float32)
    model = mlp(torch.float32)
    opt = ADLER(model, loss_fn)
    scheduler = make(opt)
    for x, y in batches[:3]:
        opt.step(x, y)
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()},
        buffer,
    )
    uninterrupted = []
    for x, y in batches[3:]:
        uninterrupted.append((opt.param_groups[0]["lr"], opt.step(x, y)))
        scheduler.step()

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed_model = mlp(torch.float32, seed=7)
    resumed_model.load_state_dict(ckpt["model"])
    resumed = ADLER(resumed_model, loss_fn)
    resumed_scheduler = make(resumed)  # the usual order: build both, then load both
    resumed.load_state_dict(ckpt["opt"])
    resumed_scheduler.load_state_dict(ckpt["sched"])
    for (x, y), (lr, rec) in zip(batches[3:], uninterrupted, strict=True):
        assert resumed.param_groups[0]["lr"] == lr
        rec2 = resumed.step(x, y)
        resumed_scheduler.step()
        for field in ("eta", "eta_hat", "applied_lr"):
            assert torch.equal(getattr(rec2, field), getattr(rec, field)), field
    assert len({lr for lr, _ in uninterrupted}) > 1  # the schedule did move lr
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_generic_optimizer_code_works():
    loss_fn = nn.CrossEntropyLoss()
    batches = mlp_batches(5)
    model = mlp()
    opt = ADLER(model, loss_fn)
    for x, y in batches[:2]:
        opt.step(x, y)
    # What generic code does: walk the state (e.g. to move it to a device, or to count memory).
    seen = set()
    for st in opt.state.values():
        for key, value in st.items():
            seen.add(key)
            if torch.is_tensor(value):
                st[key] = value.to("cpu")
    assert KEYS <= seen
    # An in-memory copy, loaded into a fresh optimizer, continues exactly.
    snapshot = copy.deepcopy(opt.state_dict())
    model_copy = copy.deepcopy(model)
    ref = [opt.step(x, y) for x, y in batches[2:]]
    fresh = ADLER(model_copy, loss_fn)
    fresh.load_state_dict(snapshot)
    for (x, y), rec in zip(batches[2:], ref, strict=True):
        assert torch.equal(fresh.step(x, y).eta_hat, rec.eta_hat)
    for p, q in zip(model.parameters(), model_copy.parameters(), strict=True):
        assert torch.equal(p, q)


def test_step_reads_the_state_entries_that_generic_code_replaced():
    """Moving state to a device replaces the tensors in ``opt.state``: the step must use those."""
    beta = 0.9
    loss_fn = nn.CrossEntropyLoss()
    (x1, y1), (x2, y2) = mlp_batches(2)
    model = mlp()
    opt = ADLER(model, loss_fn, beta=beta)
    opt.step(x1, y1)
    state = opt.state[_first(opt)]
    for key, value in list(state.items()):
        if torch.is_tensor(value):
            state[key] = value.clone()  # what ``.to(other_device)`` does
    s, c = _as_float(state["average_numerator"]), _as_float(state["average_denominator"])
    state["average_numerator"] = state["average_numerator"] + c * math.log(2.0)
    rec = opt.step(x2, y2)
    expected = math.exp(
        (beta * (s + c * math.log(2.0)) + math.log(float(rec.eta))) / (beta * c + 1)
    )
    assert float(rec.eta_hat) == pytest.approx(expected, rel=1e-12)
    assert _as_float(opt.state[_first(opt)]["step"]) == 2
    assert _as_float(opt.state[_first(opt)]["average_denominator"]) == pytest.approx(beta * c + 1)


def test_round_trip_before_the_first_step():
    """accelerate (the HF Trainer) loads the optimizer's own state_dict when it wraps it."""
    loss_fn = nn.CrossEntropyLoss()
    batches = mlp_batches(3)
    m1, m2 = mlp(), mlp()
    plain = ADLER(m1, loss_fn)
    reloaded = ADLER(m2, loss_fn, lr=0.5)
    reloaded.load_state_dict(copy.deepcopy(ADLER(mlp(), loss_fn).state_dict()))
    assert reloaded.param_groups[0]["lr"] == 1.0
    assert reloaded.num_steps == 0
    for x, y in batches:
        assert torch.equal(plain.step(x, y).eta_hat, reloaded.step(x, y).eta_hat)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bfloat16_model_keeps_float32_averages_through_a_checkpoint():
    loss_fn = nn.CrossEntropyLoss()
    batches = mlp_batches(5, dtype=torch.bfloat16)
    model = mlp(torch.bfloat16)
    opt = ADLER(model, loss_fn)
    for x, y in batches[:2]:
        assert not bool(opt.step(x, y).skipped)
    state = opt.state[_first(opt)]
    for key in ("average_numerator", "average_denominator"):
        assert state[key].dtype == torch.float32, key
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    saved = {k: state[k].clone() for k in ("average_numerator", "average_denominator")}
    ref = [opt.step(x, y) for x, y in batches[2:]]

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed_model = mlp(torch.bfloat16, seed=3)
    resumed_model.load_state_dict(ckpt["model"])
    resumed = ADLER(resumed_model, loss_fn)
    resumed.load_state_dict(ckpt["opt"])
    loaded = resumed.state[_first(resumed)]
    for key, value in saved.items():
        assert loaded[key].dtype == torch.float32, key
        assert torch.equal(loaded[key], value), key  # not rounded through bfloat16
    for (x, y), rec in zip(batches[2:], ref, strict=True):
        rec2 = resumed.step(x, y)
        assert torch.equal(rec2.eta_hat, rec.eta_hat)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
