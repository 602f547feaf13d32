"""Sweeps: grid expansion, parallel workers, a failing run, resume, the results table, summary."""

import csv
import textwrap

import pytest

from hessian_lab.experiments.cli import main
from hessian_lab.experiments.summarize import collect_runs, paper_table
from hessian_lab.experiments.sweep import PAPER_SGD_LRS, expand_grid, load_sweep, run_sweep


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_paper_grid_expansion(tmp_path):
    spec = load_sweep(
        write(
            tmp_path / "paper.toml",
            """
            [base]
            dataset = "digits"
            [grid]
            model = ["cnn", "rescnn", "vit"]
            activation = ["relu", "sigmoid", "tanh"]
            arch = [{ width = 8, depth = 1 }, { width = 16, depth = 2 }]
            seed = [0, 1]
            optimizer = ["adler", "gn", "sgd"]
            patch_size = [2]
            """,
        )
    )
    assert spec.name == "paper" and spec.out_dir.endswith("paper")
    configs = expand_grid(spec)
    assert len(PAPER_SGD_LRS) == 10
    assert PAPER_SGD_LRS[0] == pytest.approx(1e-5) and PAPER_SGD_LRS[-1] == pytest.approx(0.3)
    assert len(configs) == 3 * 3 * 2 * 2 * (1 + 1 + 10)
    sgd = [c for c in configs if c.optimizer == "sgd"]
    assert sorted({c.lr for c in sgd}) == pytest.approx(sorted(PAPER_SGD_LRS))
    vit = [c for c in configs if c.model == "vit"]
    assert all(c.model_options == {"patch_size": 2} for c in vit)
    assert all(c.model_options == {} for c in configs if c.model != "vit")
    assert len({c.out_dir for c in configs}) == len(configs)


@pytest.mark.parametrize(
    "text, words",
    [
        ("[grid]\nmodel = ['resnet18']\n", ["unknown model", "rescnn"]),
        ("[grid]\noptimizer = ['adam']\n", ["unknown optimizer", "adler"]),
        ("[base]\nbatch_size = 0\n", ["batch_size must be a positive integer"]),
        ("[grid]\nmodel = 'cnn'\n", ["grid.model must be a non-empty list"]),
        ("[base]\nlearning_rate = 0.1\n", ["unknown sweep key", "learning_rate"]),
        ("[gird]\nmodel = ['cnn']\n", ["unknown top-level key", "gird"]),
        ("[grid\n", ["invalid TOML"]),
    ],
)
def test_bad_sweep_file(tmp_path, text, words):
    with pytest.raises(ValueError) as info:
        load_sweep(write(tmp_path / "bad.toml", text))
    for word in words:
        assert word in str(info.value)


def test_missing_sweep_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.toml"):
        load_sweep(tmp_path / "nothere.toml")


@pytest.mark.slow
def test_sweep_with_failing_run_resume_and_summary(tmp_path, capsys):
    # vit with patch_size 3 cannot split 8x8 digits into patches: that run fails in its worker.
    sweep = write(
        tmp_path / "small.toml",
        f"""
        name = "small"
        out_dir = "{tmp_path / "out"}"
        workers = 2
        [base]
        dataset = "digits"
        max_train = 64
        max_test = 32
        batch_size = 32
        epochs = 1
        width = 4
        depth = 1
        patch_size = 3
        [grid]
        model = ["cnn", "vit"]
        seed = [0, 1]
        optimizer = ["sgd"]
        [sgd]
        lrs = [0.01, 0.1]
        """,
    )
    spec = load_sweep(sweep)
    rows = run_sweep(spec)
    assert len(rows) == 8
    failed = [r for r in rows if r["status"] == "failed"]
    finished = [r for r in rows if r["status"] == "finished"]
    assert len(failed) == 4 and all(r["model"] == "vit" for r in failed)
    assert all("ValueError" in r["error"] and "patch_size=3" in r["error"] for r in failed)
    assert len(finished) == 4 and all(r["model"] == "cnn" for r in finished)
    for r in failed:
        assert "Traceback" in (tmp_path / "out" / "runs" / r["name"] / "error.txt").read_text()

    with open(tmp_path / "out" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == [r["name"] for r in rows]
    assert {r["status"] for r in table} == {"finished", "failed"}

    # Re-running skips the finished runs (their results are unchanged) and retries the failed.
    again = run_sweep(spec, workers=0)
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in rows]

    # An interrupted run (checkpoint, no result.json) is resumed, not restarted.
    victim = tmp_path / "out" / "runs" / finished[0]["name"]
    (victim / "result.json").unlink()
    again = run_sweep(spec, workers=0)
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in rows]
    assert len((victim / "steps.jsonl").read_text().splitlines()) == 2  # no step was redone

    # The CLI reports the failures and exits with 1.
    assert main(["sweep", str(sweep), "--workers", "0"]) == 1
    out = capsys.readouterr().out
    assert "4 of 8 runs failed" in out and "results.csv" in out

    runs = collect_runs([tmp_path / "out"])
    assert len(runs) == 8
    assert sorted(runs["status"].value_counts().items()) == [("failed", 4), ("finished", 4)]
    summary = paper_table(runs)
    assert len(summary) == 1  # digits / cnn / relu, optimizer sgd
    row = summary.iloc[0]
    assert row["optimizer"] == "sgd" and row["n"] == 2  # best lr of each of the two seeds
    best = runs[runs["status"] == "finished"].groupby("seed")["test_acc"].max().mean()
    assert row["mean"] == pytest.approx(best)

    argv = ["summarize", str(tmp_path / "out"), "--out", str(tmp_path / "all.csv")]
    assert main([*argv, "--max-rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "8 runs: 4 failed, 4 finished" in out or "8 runs: 4 finished, 4 failed" in out
    assert "... 5 more runs" in out and "sgd" in out and (tmp_path / "all.csv").exists()


def test_example_sweep_files_are_valid():
    from pathlib import Path

    import hessian_lab.experiments as experiments

    folder = Path(experiments.__file__).parent / "sweeps"
    assert len(expand_grid(load_sweep(folder / "digits_small.toml"))) == 40
    assert len(expand_grid(load_sweep(folder / "paper_cifar100.toml"))) == 648


def test_workers_spread_over_gpus(monkeypatch):
    import multiprocessing

    import torch

    from hessian_lab.experiments import sweep

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(sweep, "_WORKER_DEVICE", None)  # restored to None afterwards
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    devices = []
    for _ in range(3):
        sweep._init_worker(counter)
        devices.append(sweep._WORKER_DEVICE)
    assert devices == ["cuda:0", "cuda:1", "cuda:0"]
