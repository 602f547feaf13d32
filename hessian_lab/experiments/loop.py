"""The minibatch loop with callbacks, shared by ``train`` and the analyses.

:func:`run_loop` draws minibatches without replacement, one permutation of the training set per
epoch from a ``torch.Generator`` (checkpointable), takes one optimizer step per minibatch and
calls the callbacks around it. An *optimizer* here is anything with ``step(inputs, targets) ->
dict`` of 0-dim tensors (the stepper interface of :mod:`hessian_lab.experiments.optimizers`;
the analyses plug in their own, e.g. a Hessian-free step). The loop stops after ``epochs``
epochs or ``max_steps`` steps, or when a callback sets ``state.stop``.

Time is measured around the optimizer steps only (``state.elapsed``): callbacks (logging,
evaluation, spectral analyses at checkpoints) do not count as training time.

Callbacks shipped here: :class:`AtSteps` (call a function at chosen step counts, e.g.
:func:`geometric_steps`), :class:`RecordSteps` (keep every step record with the time, and
evaluations every k steps, for a table), :class:`ProgressCallback` (advance a progress bar).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

__all__ = [
    "AtSteps",
    "Callback",
    "LoopState",
    "ProgressCallback",
    "RecordSteps",
    "Stepper",
    "WorkBar",
    "geometric_steps",
    "run_loop",
    "step_record",
    "steps_in",
]


class Stepper(Protocol):
    """What the loop needs of an optimizer: one step on a minibatch, returning 0-dim tensors."""

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Update the model on one minibatch; return e.g. ``{"loss": ..., "eta_hat": ...}``."""
        ...


@dataclass
class LoopState:
    """What the callbacks see.

    Attributes:
        model: The model being trained.
        optimizer: The stepper.
        order: The data-order generator (its state belongs in a checkpoint).
        epoch: The current epoch (1-based; 0 before the first step).
        step: Optimizer steps done.
        elapsed: Seconds spent in optimizer steps so far.
        stop: Set to ``True`` in a callback to end the loop after the current step.
        last: The record of the last step (empty before the first).
    """

    model: nn.Module
    optimizer: Any
    order: torch.Generator
    epoch: int = 0
    step: int = 0
    elapsed: float = 0.0
    stop: bool = False
    last: dict[str, float | int] = field(default_factory=dict)


class Callback:
    """Base class: override the hooks you need (each receives the :class:`LoopState`)."""

    def on_train_begin(self, state: LoopState) -> None:
        """Before the first step (also when resuming)."""

    def on_epoch_begin(self, state: LoopState) -> None:
        """At the start of every epoch (``state.epoch`` already advanced)."""

    def on_step_end(self, state: LoopState, record: dict[str, float | int]) -> None:
        """After every step; ``record`` holds its numbers (``state.step`` counts it)."""

    def on_epoch_end(self, state: LoopState) -> None:
        """After the last step of every complete epoch."""

    def on_train_end(self, state: LoopState) -> None:
        """After the last step (not after an exception)."""


def step_record(out: dict[str, torch.Tensor]) -> dict[str, float | int]:
    """An optimizer step's tensors as Python numbers, with one host synchronization."""
    values = torch.stack([v.detach().reshape(()).to(torch.float64).cpu() for v in out.values()])
    record: dict[str, float | int] = dict(zip(out, values.tolist(), strict=True))
    if "skipped" in record:
        record["skipped"] = int(record["skipped"])
    return record


def run_loop(
    model: nn.Module,
    optimizer: Stepper,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int,
    order: torch.Generator,
    epochs: int | None = None,
    max_steps: int | None = None,
    drop_last: bool = False,
    replacement: bool = False,
    callbacks: Sequence[Callback] = (),
    start_epoch: int = 1,
    start_step: int = 0,
    elapsed: float = 0.0,
) -> LoopState:
    """Train ``model`` with ``optimizer`` on minibatches of ``(inputs, targets)``.

    Args:
        model: The model (handed to the callbacks).
        optimizer: A :class:`Stepper`.
        inputs: All training inputs, on the model's device.
        targets: All training targets.
        batch_size: Minibatch size.
        order: Generator of the per-epoch permutations (CPU).
        epochs: Last epoch to run (None: until ``max_steps``).
        max_steps: Stop after this many steps in total (None: after ``epochs``).
        drop_last: Skip an epoch's last, incomplete minibatch.
        replacement: Draw every minibatch uniformly with replacement (``torch.randint``)
            instead of epochs of permutations; needs ``max_steps``, and epoch hooks never run.
        callbacks: Called in order at each hook.
        start_epoch: First epoch to run (resuming: the one after the checkpoint).
        start_step: Steps already done (resuming).
        elapsed: Training seconds already spent (resuming).

    Returns:
        The final :class:`LoopState`.

    Raises:
        ValueError: Neither ``epochs`` nor ``max_steps`` given, or a batch size that drops
            every example.
    """
    if epochs is None and max_steps is None:
        raise ValueError("run_loop needs epochs or max_steps (or both)")
    if replacement and max_steps is None:
        raise ValueError("run_loop with replacement=True needs max_steps (there are no epochs)")
    n = len(targets)
    if batch_size < 1 or (drop_last and batch_size > n):
        raise ValueError(
            f"batch_size {batch_size} with {n} training examples"
            + (" and drop_last leaves no minibatch" if drop_last else "")
        )
    state = LoopState(model, optimizer, order, start_epoch - 1, start_step, elapsed)
    for cb in callbacks:
        cb.on_train_begin(state)
    if replacement:
        assert max_steps is not None
        while not state.stop and state.step < max_steps:
            idx = torch.randint(0, n, (batch_size,), generator=order).to(inputs.device)
            _step(state, optimizer, inputs[idx], targets[idx], callbacks)
        for cb in callbacks:
            cb.on_train_end(state)
        return state
    epoch = start_epoch
    while not state.stop and (epochs is None or epoch <= epochs):
        if max_steps is not None and state.step >= max_steps:
            break
        state.epoch = epoch
        for cb in callbacks:
            cb.on_epoch_begin(state)
        perm = torch.randperm(n, generator=order).to(inputs.device)
        end = n - n % batch_size if drop_last else n
        complete = True
        for start in range(0, end, batch_size):
            if state.stop or (max_steps is not None and state.step >= max_steps):
                complete = False
                break
            idx = perm[start : start + batch_size]
            _step(state, optimizer, inputs[idx], targets[idx], callbacks)
        if complete:
            for cb in callbacks:
                cb.on_epoch_end(state)
        epoch += 1
    for cb in callbacks:
        cb.on_train_end(state)
    return state


def _step(
    state: LoopState,
    optimizer: Stepper,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    callbacks: Sequence[Callback],
) -> None:
    t0 = time.perf_counter()
    record = step_record(optimizer.step(inputs, targets))
    state.elapsed += time.perf_counter() - t0
    state.step += 1
    state.last = record
    for cb in callbacks:
        cb.on_step_end(state, record)


def steps_in(
    n: int, batch_size: int, epochs: int, drop_last: bool = False, max_steps: int | None = None
) -> int:
    """Number of steps :func:`run_loop` takes (for progress bars)."""
    per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    total = per_epoch * epochs
    return total if max_steps is None else min(total, max_steps)


def geometric_steps(total: int, count: int) -> list[int]:
    """``count`` steps in ``[0, total]``, 0 and ``total`` included, spaced geometrically.

    Curvature changes fastest early in training, so snapshots are denser there: after 0,
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


class AtSteps(Callback):
    """Call ``fn(state)`` when ``state.step`` reaches each of ``steps`` (0: before training).

    The time ``fn`` takes is not training time.
    """

    def __init__(self, steps: Iterable[int], fn: Callable[[LoopState], None]) -> None:
        self.steps, self.fn = set(steps), fn

    def on_train_begin(self, state: LoopState) -> None:
        """Call at step 0 (when starting from scratch)."""
        if state.step in self.steps and state.step == 0:
            self.fn(state)

    def on_step_end(self, state: LoopState, record: dict[str, float | int]) -> None:
        """Call at the chosen steps."""
        if state.step in self.steps:
            self.fn(state)


class RecordSteps(Callback):
    """Keep one row per step (its record and the cumulative ``time_s``) for a table.

    Args:
        evaluate: Optional ``() -> {metric: value}`` (e.g. full-split loss and accuracy), called
            at step 0, every ``eval_every`` steps and at the last step; its values join that
            step's row (step 0 gets a row of its own).
        eval_every: Period of the evaluations (None: never).
    """

    def __init__(
        self,
        evaluate: Callable[[], dict[str, float]] | None = None,
        eval_every: int | None = None,
    ) -> None:
        self.evaluate, self.eval_every = evaluate, eval_every
        self.rows: list[dict[str, Any]] = []
        self._max_steps: int | None = None

    def expect(self, max_steps: int) -> RecordSteps:
        """Tell the recorder the last step, so that it evaluates there too."""
        self._max_steps = max_steps
        return self

    def on_train_begin(self, state: LoopState) -> None:
        """Evaluate at initialization."""
        if self.evaluate is not None and self.eval_every:
            self.rows.append({"step": state.step, "time_s": state.elapsed, **self.evaluate()})

    def on_step_end(self, state: LoopState, record: dict[str, float | int]) -> None:
        """Append the step's row (with an evaluation when due)."""
        row = {"step": state.step, **record, "time_s": state.elapsed}
        due = self.eval_every and (
            state.step % self.eval_every == 0 or state.step == self._max_steps
        )
        if self.evaluate is not None and due:
            row.update(self.evaluate())
        self.rows.append(row)


class ProgressCallback(Callback):
    """Advance a progress bar (:func:`hessian_lab.core.progress_bar`) by ``weight`` per step.

    Args:
        bar: The bar (``update`` and ``set_postfix_str``).
        weight: Units per step (a bar that also counts other work weighs steps accordingly).
        postfix: Show the step's loss and η̂ next to the bar.
    """

    def __init__(self, bar: Any, weight: int = 1, postfix: bool = True) -> None:
        self.bar, self.weight, self.postfix = bar, weight, postfix

    def on_step_end(self, state: LoopState, record: dict[str, float | int]) -> None:
        """One step done."""
        self.bar.update(self.weight)
        if self.postfix and "loss" in record:
            text = f"loss={record['loss']:.4f}"
            if "eta_hat" in record:
                text += f", eta_hat={record['eta_hat']:.3g}"
            self.bar.set_postfix_str(text)


class WorkBar(Callback):
    """A progress bar over training steps *and* other work done between them.

    The bar counts in units of one training step. Each of ``tasks`` other jobs (e.g. the
    spectral analysis at a checkpoint) counts as ``weight`` units: ``guess`` until both kinds
    have been timed, then the measured ratio (mean seconds per task) / (mean seconds per
    step), so the total and the remaining time follow the real work on any machine. Time the
    tasks with :meth:`task`; the steps are timed by the loop (``state.elapsed``).

    Args:
        bar: A progress bar (:func:`hessian_lab.core.progress_bar`) with a settable ``total``.
        steps: Training steps to come.
        tasks: Other jobs to come.
        guess: Steps' worth of one job before it has been measured.
    """

    def __init__(self, bar: Any, steps: int, tasks: int, guess: float) -> None:
        self.bar, self.steps, self.tasks, self.weight = bar, steps, tasks, guess
        self.steps_done = self.tasks_done = 0
        self.step_seconds = self.task_seconds = 0.0
        self._begin: float | None = None
        self._show()

    def on_train_begin(self, state: LoopState) -> None:
        """Remember where the step clock starts."""
        self._begin = state.elapsed

    def on_step_end(self, state: LoopState, record: dict[str, float | int]) -> None:
        """One step done."""
        self.steps_done += 1
        self.step_seconds = state.elapsed - (self._begin or 0.0)
        self._show()

    @contextlib.contextmanager
    def task(self) -> Iterator[None]:
        """Time one job (``with work.task(): ...``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.task_seconds += time.perf_counter() - t0
            self.tasks_done += 1
            self._show()

    def _show(self) -> None:
        if self.tasks_done and self.steps_done and self.step_seconds > 0:
            per_step = self.step_seconds / self.steps_done
            self.weight = (self.task_seconds / self.tasks_done) / per_step
        total = round(self.steps + self.tasks * self.weight)
        done = round(self.steps_done + self.tasks_done * self.weight)
        self.bar.total, self.bar.n = total, min(done, total)
        self.bar.update(0)  # redraw (tqdm) or print when due (plain lines)
