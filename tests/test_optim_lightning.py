"""ADLER inside PyTorch Lightning (issue 11, item 2d): automatic and manual optimization.

Automatic optimization calls ``optimizer.step(closure=...)``: the closure runs training_step,
zero_grad and backward and returns the loss. Manual optimization goes through
``LightningOptimizer.step(closure=None)``, which hands ADLER ``step(closure=<a closure that does
nothing and returns None>)`` after the user's ``manual_backward``. Both must give pattern a's
trajectory: the runs below are compared with ``ADLER.step(x, y)`` on a copy of the network.
"""

import copy
import math
import warnings

import pytest
import torch
from optim_helpers import flat_params, mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hessian_lab import ADLER
from hessian_lab.optim import ADLERRecord

pl = pytest.importorskip("pytorch_lightning")

N, BATCH = 32, 8  # 4 steps of one epoch


pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (N,), generator=g)


def _loader():
    return DataLoader(TensorDataset(*_data()), batch_size=BATCH, shuffle=False, num_workers=0)


class _Module(pl.LightningModule):
    def __init__(self, manual=False, scheduler=None):
        super().__init__()
        self.net = mlp()
        self.loss_fn = nn.CrossEntropyLoss()
        self.automatic_optimization = not manual
        self.scheduler = scheduler
        self.records: list[ADLERRecord] = []
        self.lrs: list[float] = []
        self.step_calls: list[dict] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:
            return self.loss_fn(self.net(x), y)
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.loss_fn(self.net(x), y)
        self.manual_backward(loss)
        opt.step()
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self.lrs.append(self.adler.param_groups[0]["lr"])

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.records.append(self.adler.last_record)

    def configure_optimizers(self):
        self.adler = ADLER(self.net, self.loss_fn)

        def spy(optimizer, args, kwargs):  # what Lightning passes to step
            self.step_calls.append(
                {"args": len(args), "kwargs": sorted(kwargs), "closure": kwargs.get("closure")}
            )

        self.adler.register_step_pre_hook(spy)
        if self.scheduler is None:
            return self.adler
        return {"optimizer": self.adler, "lr_scheduler": self.scheduler(self.adler)}


def _fit(module):
    trainer = pl.Trainer(
        max_epochs=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        precision="64-true",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        trainer.fit(module, train_dataloaders=_loader())
    return trainer


def _pattern_a(lrs=None):
    """The same trajectory written as pattern a: ADLER.step(x, y) on each batch."""
    net = mlp()
    opt = ADLER(net, nn.CrossEntropyLoss())
    records = []
    for k, (x, y) in enumerate(_loader()):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[k]
        records.append(opt.step(x, y))
    return net, records


def _check_against_pattern_a(module, lrs=None, rel=1e-10):
    net, ref = _pattern_a(lrs)
    assert len(module.records) == len(ref) == N // BATCH
    for rec, want in zip(module.records, ref, strict=True):
        assert isinstance(rec, ADLERRecord) and not bool(rec.skipped)
        for name in ("loss", "eta", "eta_hat", "applied_lr"):
            got = float(getattr(rec, name))
            assert math.isfinite(got)
            assert math.isclose(got, float(getattr(want, name)), rel_tol=rel), name
    theta, expected = flat_params(module.net), flat_params(net)
    assert float((theta - expected).abs().max()) <= rel * float(expected.abs().max())


def test_automatic_optimization():
    module = _Module()
    theta0 = flat_params(module.net)
    trainer = _fit(module)
    assert trainer.optimizers[0] is module.adler
    assert not torch.equal(flat_params(module.net), theta0)
    assert module.adler.num_steps == N // BATCH
    # Lightning called step(closure=...) once per batch, by keyword.
    assert len(module.step_calls) == N // BATCH
    assert all(c["kwargs"] == ["closure"] and callable(c["closure"]) for c in module.step_calls)
    _check_against_pattern_a(module)


def test_manual_optimization():
    module = _Module(manual=True)
    theta0 = flat_params(module.net)
    _fit(module)
    assert not torch.equal(flat_params(module.net), theta0)
    assert module.adler.num_steps == N // BATCH
    assert len(module.step_calls) == N // BATCH
    # LightningOptimizer.step(closure=None) still passes a (do-nothing) closure to ADLER.
    assert all("closure" in c["kwargs"] for c in module.step_calls)
    _check_against_pattern_a(module)


@pytest.mark.parametrize("manual", [False, True])
def test_epoch_scheduler_from_configure_optimizers(manual):
    def scheduler(opt):
        return torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)

    module = _Module(manual=manual, scheduler=scheduler)
    _fit(module)
    if not manual:  # Lightning steps an epoch-interval scheduler itself (manual: the user does)
        assert module.adler.param_groups[0]["lr"] == pytest.approx(0.5, rel=1e-12)
    assert module.lrs == [1.0] * (N // BATCH)
    _check_against_pattern_a(module)


def test_step_interval_scheduler_shapes_the_applied_rate():
    def scheduler(opt):
        return {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), "interval": "step"}

    module = _Module(scheduler=scheduler)
    _fit(module)
    lrs = [0.5**k for k in range(N // BATCH)]
    assert module.lrs == pytest.approx(lrs, rel=1e-12)
    for rec, lr in zip(module.records, lrs, strict=True):
        assert float(rec.applied_lr) == pytest.approx(lr * float(rec.eta_hat), rel=1e-12)
    _check_against_pattern_a(module, lrs)
    assert module.adler.param_groups[0]["lr"] == pytest.approx(0.5 ** (N // BATCH), rel=1e-12)


def test_float32_default_precision():
    """The recipe as a user writes it: float32 network, Lightning's default precision."""

    class Module32(_Module):
        def __init__(self):
            super().__init__()
            self.net = self.net.float()

    module = Module32()
    theta0 = flat_params(module.net)
    trainer = pl.Trainer(
        max_epochs=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    x, y = _data()
    loader = DataLoader(TensorDataset(x.float(), y), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        trainer.fit(module, train_dataloaders=loader)
    assert not torch.equal(flat_params(module.net), theta0)
    rec = module.adler.last_record
    assert not bool(rec.skipped)
    assert all(math.isfinite(float(getattr(rec, n))) for n in ("loss", "eta", "eta_hat"))
    assert rec.eta.dtype == torch.float32
    assert copy.deepcopy(module.adler.state_dict())["param_groups"][0]["lr"] == 1.0
