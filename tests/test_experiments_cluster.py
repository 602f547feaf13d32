"""Sweeps through submitit (its local executor runs the SLURM code path as processes),
TensorBoard logging, and the lock that keeps two processes out of one run folder."""

import csv
import sys
from pathlib import Path

import pytest

from hessian_lab.experiments.cli import main
from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.run_folder import RunFolder, RunInUseError
from hessian_lab.experiments.sweep import load_sweep, run_sweep
from hessian_lab.experiments.training import train

TESTS = Path(__file__).resolve().parent

SWEEP = """
name = "cluster"
out_dir = "{out}"
workers = 2
executor = "submitit-local"
[base]
model = "user_factories:small_mlp"
dataset = "user_factories:blobs"
dataset_options = {{ n_train = 64, n_test = 16 }}
batch_size = 32
epochs = 1
[grid]
model_options = [{{ hidden = 3 }}, {{ hidden = 4 }}]
optimizer = ["sgd"]
[sgd]
lrs = [0.1]
"""


def tiny(tmp_path, **changes):
    values = dict(
        width=4, depth=1, max_train=64, max_test=32, batch_size=32, epochs=2,
        optimizer="sgd", lr=0.1, out_dir=str(tmp_path / "run"),
    )  # fmt: skip
    values.update(changes)
    return TrainConfig(**values)


@pytest.mark.slow
def test_sweep_through_submitit_local_executor(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    # The jobs are separate Python processes: they find the user's factories via PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    sweep = tmp_path / "cluster.toml"
    sweep.write_text(SWEEP.format(out=tmp_path / "out"))
    spec = load_sweep(sweep)
    rows = run_sweep(spec)
    assert [r["status"] for r in rows] == ["finished", "finished"], rows
    jobs = sorted((tmp_path / "out" / "submitit").glob("*_result.pkl"))
    assert len(jobs) == 2  # one submitit job per run
    with open(tmp_path / "out" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == [r["name"] for r in rows]
    assert all(0 <= float(r["test_acc"]) <= 1 for r in table)

    # Rerunning submits nothing: finished runs are reused.
    results = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").rglob("result.json")}
    assert main(["sweep", str(sweep)]) == 0
    assert "executor submitit-local" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "submitit").glob("*_result.pkl"))) == 2
    assert {p: p.stat().st_mtime_ns for p in results} == results


def test_failed_job_is_a_failed_run_with_its_log():
    from hessian_lab.experiments.cluster import _outcome

    class DeadJob:
        job_id = "4242"

        class paths:  # noqa: N801 - mimics submitit's JobPaths
            stderr = Path("/tmp/submitit/4242_0_log.err")

        def result(self):
            raise RuntimeError("Job 4242 (task: 0) with path ... has not produced any output")

    outcome = _outcome(DeadJob())
    assert outcome["status"] == "failed"
    assert "job 4242 did not complete" in outcome["error"] and "4242_0_log.err" in outcome["error"]
    assert "rerun the sweep" in outcome["error"]


def test_slurm_needs_a_time_limit(tmp_path):
    pytest.importorskip("submitit")
    from hessian_lab.experiments.cluster import run_with_submitit

    with pytest.raises(ValueError, match="timeout_min"):
        run_with_submitit(
            "slurm", tmp_path, {}, [], lambda i, o: None, lambda c, t: {}, workers=1, job_name="x"
        )


def test_missing_submitit_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    monkeypatch.syspath_prepend(str(TESTS))
    sweep = tmp_path / "s.toml"
    sweep.write_text(SWEEP.format(out=tmp_path / "out"))
    assert main(["sweep", str(sweep), "--executor", "slurm", "--slurm", "timeout_min=10"]) == 2
    err = capsys.readouterr().err
    assert "needs the submitit package" in err and "pip install 'hessian-lab[cluster]'" in err


def test_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(tiny(tmp_path, tensorboard=True), progress=False)
    logs = tmp_path / "run" / "tensorboard"
    assert list(logs.glob("events.out.tfevents.*")), "no event file"
    events = EventAccumulator(str(logs))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"step/loss", "step/eta_hat", "epoch/test_acc", "epoch/train_loss"} <= set(tags)
    assert [e.step for e in events.Scalars("step/loss")] == [1, 2, 3, 4]
    test_acc = [e.value for e in events.Scalars("epoch/test_acc")]
    assert len(test_acc) == 3 and test_acc[-1] == pytest.approx(result["test_acc"], abs=1e-6)


def test_tensorboard_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"hessian-lab\[tensorboard\]"):
        train(tiny(tmp_path, tensorboard=True), progress=False)


def test_two_processes_never_train_in_one_folder(tmp_path):
    config = tiny(tmp_path)
    with RunFolder(config.out_dir).lock():  # as if another process were training there
        with pytest.raises(RunInUseError, match="in use by another process"):
            train(config, progress=False)
    assert train(config, progress=False)["steps"] == 4  # free again
