"""Progress bars in logs: correct totals, whole lines, no carriage returns or escape codes."""

import io
import re
import time

import pytest

from hessian_lab.core import PlainProgress, progress_bar
from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.loop import LoopState, WorkBar
from hessian_lab.experiments.training import train


def assert_plain(text: str) -> None:
    assert "\r" not in text, repr(text[-300:])
    assert "\x1b" not in text, repr(text[-300:])


def test_bar_on_a_non_terminal_stream_writes_plain_lines():
    stream = io.StringIO()  # isatty() is False, like a log file or a CI log
    bar = progress_bar(range(7), desc="work", unit="item", file=stream)
    assert isinstance(bar, PlainProgress)
    assert list(bar) == list(range(7))
    text = stream.getvalue()
    assert_plain(text)
    assert text.endswith("\n") and text.strip().splitlines()[-1].startswith("work: 7/7 item")


def test_nested_bar_is_dropped_off_a_terminal():
    stream = io.StringIO()
    for _ in progress_bar(range(3), desc="inner", leave=False, file=stream):
        pass
    assert stream.getvalue() == ""


def test_training_progress_in_a_log(tmp_path, capsys):
    config = TrainConfig(
        width=4, depth=1, max_train=96, max_test=32, batch_size=32, epochs=2,
        optimizer="sgd", lr=0.1, out_dir=str(tmp_path / "run"),
    )  # fmt: skip
    train(config, progress=True)
    captured = capsys.readouterr()  # both streams are captured: not terminals
    assert_plain(captured.out + captured.err)
    epochs = [line for line in captured.out.splitlines() if " epoch " in line]
    assert len(epochs) == 3  # epoch 0 (initialization), 1, 2
    last = captured.err.strip().splitlines()[-1]
    assert re.match(rf"{config.validate().name}: 6/6 step \[", last), last  # 2 epochs x 3 steps


class _Bar:
    """Records what a WorkBar shows."""

    def __init__(self):
        self.total, self.n, self.shown = None, 0, []

    def update(self, n):
        self.n += n
        self.shown.append((self.n, self.total))


def test_work_bar_weighs_tasks_by_their_measured_cost():
    bar = _Bar()
    work = WorkBar(bar, steps=10, tasks=2, guess=100.0)
    assert bar.total == 10 + 2 * 100  # before anything is measured: the guess
    state = LoopState(model=None, optimizer=None, order=None)
    work.on_train_begin(state)
    for _ in range(5):
        state.elapsed += 0.01  # 10 ms per step
        work.on_step_end(state, {})
    with work.task():
        time.sleep(0.05)  # one task: about 5 steps' worth
    assert work.weight == pytest.approx(5, rel=0.5)
    assert bar.total == round(10 + 2 * work.weight)
    for _ in range(5):
        state.elapsed += 0.01
        work.on_step_end(state, {})
    with work.task():
        time.sleep(0.05)
    assert bar.n == bar.total  # everything done: the bar is full, not past or short of it
    assert all(n <= total for n, total in bar.shown)
