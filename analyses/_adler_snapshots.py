"""A small CNN on digits and an ADLER run that hands the model to a callback at chosen steps.

Shared by ``spectra_along_training.py`` and ``cg_with_q.py``.

The scripts import it as ``from _adler_snapshots import ...`` (``python analyses/<script>.py`` puts
``analyses/`` on ``sys.path``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from hessian_lab import ADLER
from hessian_lab.experiments.datasets import ImageData, load_digits
from hessian_lab.experiments.evaluate import evaluate
from hessian_lab.experiments.models import build_model

__all__ = ["Setup", "adler_run", "make_setup", "snapshot_steps"]


@dataclass
class Setup:
    """Data (on the device, in the working dtype) and a freshly initialized model in eval mode."""

    data: ImageData
    X: torch.Tensor
    y: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    model: nn.Module

    @property
    def num_params(self) -> int:
        """P, the number of trainable parameters."""
        return sum(p.numel() for p in self.model.parameters())

    def evaluate(self) -> dict[str, float]:
        """Risk and accuracy on the whole training and test splits."""
        loss_fn = nn.CrossEntropyLoss()
        train_loss, train_acc = evaluate(self.model, loss_fn, self.X, self.y)
        test_loss, test_acc = evaluate(self.model, loss_fn, self.X_test, self.y_test)
        return {
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
        }


def make_setup(
    seed: int,
    activation: str,
    width: int,
    depth: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Setup:
    """Digits (1438 train / 359 test, split seed 0) and a ``cnn`` from ``build_model``.

    The model is drawn from ``torch.manual_seed(seed)`` and put in eval mode (it has no batch norm
    or dropout, so train and eval mode compute the same function; the operators require eval).
    """
    torch.manual_seed(seed)
    device = torch.device(device)
    data = load_digits(split_seed=0)
    model = build_model(
        "cnn", activation=activation, in_shape=data.in_shape, width=width, depth=depth
    ).to(device=device, dtype=dtype)
    model.eval()
    return Setup(
        data,
        data.train_inputs.to(device=device, dtype=dtype),
        data.train_targets.to(device),
        data.test_inputs.to(device=device, dtype=dtype),
        data.test_targets.to(device),
        model,
    )


def snapshot_steps(total: int, count: int) -> list[int]:
    """``count`` steps in ``[0, total]``, 0 and ``total`` included, spaced geometrically.

    Curvature changes fastest early in training, so the snapshots are denser there: after 0,
    ``count - 1`` steps from ``max(1, total/64)`` to ``total`` in geometric progression, rounded
    and made strictly increasing (400 steps, 5 checkpoints: 0, 6, 25, 100, 400).
    """
    if count < 2 or total < 1:
        return [0]
    raw = np.geomspace(max(1.0, total / 64), total, count - 1)
    steps = [0]
    for s in np.round(raw).astype(int):
        steps.append(max(int(s), steps[-1] + 1))
    return sorted({min(s, total) for s in steps})


def adler_run(
    setup: Setup,
    steps: int,
    batch_size: int,
    seed: int,
    at_steps: Iterable[int] = (),
    on_snapshot: Callable[[int, ADLER, dict[str, float]], None] | None = None,
    desc: str = "ADLER",
    eval_every: int | None = None,
) -> pd.DataFrame:
    r"""Train ``setup.model`` with ADLER (paper's defaults: Q, β = 0.99, ε = 1e-10).

    Minibatches are drawn without replacement, epoch by epoch, from a ``torch.Generator`` seeded
    with ``seed + 1``. At every step ``k`` in ``at_steps`` (``k`` updates done; 0 =
    initialization) ``on_snapshot(k, optimizer, last)`` is called, ``last`` being the record of
    the last step (empty at ``k = 0``): ``eta`` (:math:`\eta_k` of that batch) and ``eta_hat``
    (:math:`\hat\eta_k`), among others.

    Returns:
        One row per step: ``step`` (1-based), ``loss`` (batch loss before the update), ``eta``,
        ``eta_hat``, ``grad_sq``, ``curvature`` (:math:`G^\top Q G`), ``skipped``, ``time_s``
        (cumulative optimizer time, snapshots and evaluations excluded), and, every
        ``eval_every`` steps (and at step 0 and the end), the full-split ``train_loss``,
        ``train_acc``, ``test_loss``, ``test_acc``.
    """
    at = set(at_steps)
    opt = ADLER(setup.model, nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(setup.y)
    perm, pos = torch.randperm(n, generator=gen), 0
    rows: list[dict[str, float]] = []
    last: dict[str, float] = {}
    elapsed = 0.0
    if eval_every:
        rows.append({"step": 0, "time_s": 0.0, **setup.evaluate()})
    if 0 in at and on_snapshot is not None:
        on_snapshot(0, opt, last)
    bar = tqdm(range(1, steps + 1), desc=desc, unit="step", leave=False)
    for k in bar:
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size].to(setup.X.device)
        pos += batch_size
        t0 = time.perf_counter()
        rec = opt.step(setup.X[idx], setup.y[idx])
        elapsed += time.perf_counter() - t0
        last = {f: float(getattr(rec, f)) for f in rec._fields}
        row = {"step": k, **last, "time_s": elapsed}
        if eval_every and (k % eval_every == 0 or k == steps):
            row.update(setup.evaluate())
        rows.append(row)
        bar.set_postfix(loss=f"{last['loss']:.3f}", eta_hat=f"{last['eta_hat']:.3g}")
        if k in at and on_snapshot is not None:
            on_snapshot(k, opt, last)
    return pd.DataFrame(rows)
