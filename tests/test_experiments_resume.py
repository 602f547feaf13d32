"""A run killed with SIGKILL in the middle of an epoch resumes to exactly the same results."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hessian_lab.experiments.checkpoint import load_checkpoint
from hessian_lab.experiments.cli import main
from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.run_log import read_jsonl
from hessian_lab.experiments.training import train

# 320 examples / batch 32 = 10 steps per epoch, 3 epochs.
ARGS = [
    "--model",
    "cnn",
    "--width",
    "4",
    "--depth",
    "1",
    "--max-train",
    "320",
    "--max-test",
    "64",
    "--batch-size",
    "32",
    "--epochs",
    "3",
    "--seed",
    "7",
    "--no-progress",
    "--threads",
    "1",
]

# The killed process sleeps in every step so that the kill lands mid-epoch reliably.
SLOW_TRAIN = """
import sys, time
import hessian_lab.experiments.loop as loop
record = loop.step_record
def slow_record(*args, **kwargs):
    time.sleep(0.05)
    return record(*args, **kwargs)
loop.step_record = slow_record
from hessian_lab.experiments.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _strip_time(rows):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


# ADLER carries state (the running averages s_k, c_k) that must survive the kill; SGD has none.
OPT = ["--optimizer", "adler"]


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch(tmp_path, one_thread):
    opt = OPT
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, "train", *ARGS, *opt, "--out-dir", str(killed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    steps_file = killed / "steps.jsonl"
    deadline = time.monotonic() + 120
    try:
        # Kill once epoch 1 is checkpointed and epoch 2 is a few steps in (step 13 or later).
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not progress"
            if steps_file.exists() and len(steps_file.read_text().splitlines()) >= 13:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(killed / "checkpoint.pt")
    assert state["epoch"] == 1 and state["step"] == 10
    assert len(read_jsonl(steps_file)) > state["step"]  # killed mid-epoch, past the checkpoint
    assert not (killed / "result.json").exists()

    # Resume in this process (a fresh process is not needed: all state comes from disk).
    assert main(["train", *ARGS, *opt, "--out-dir", str(killed), "--resume"]) == 0

    # Reference: the same run, uninterrupted, with the same thread count.
    config = TrainConfig(
        model="cnn",
        width=4,
        depth=1,
        max_train=320,
        max_test=64,
        batch_size=32,
        epochs=3,
        seed=7,
        optimizer=opt[1],
        lr=float(opt[3]) if len(opt) > 2 else None,
        out_dir=str(tmp_path / "reference"),
    )
    reference = train(config, progress=False)

    result = json.loads((killed / "result.json").read_text())
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc", "steps"):
        assert result[key] == reference[key], key  # exactly equal, not approximately
    assert read_jsonl(steps_file) == read_jsonl(tmp_path / "reference" / "steps.jsonl")
    assert _strip_time(read_jsonl(killed / "epochs.jsonl")) == _strip_time(
        read_jsonl(tmp_path / "reference" / "epochs.jsonl")
    )
    assert (killed / "steps.csv").read_text() == (tmp_path / "reference" / "steps.csv").read_text()
