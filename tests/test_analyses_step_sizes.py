"""analyses/step_sizes_in_practice.py: a tiny end-to-end run, checked against its own run logs.

The script trains eight small ADLER runs through the library's trainer and summarizes their
``steps.csv``. The test recomputes η̂_k from the logged η_k by the paper's averages (footnote 10:
of log η for Q and H, of η for GN; an independent implementation of the recursion) and checks
the summary's rows against the logs.
"""

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"
BETA = 0.99
LOG_AVERAGE = {"ggn": True, "hessian": True, "ef": False, "ef_batch": False}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("step_sizes")
    cmd = [
        sys.executable,
        str(ANALYSES / "step_sizes_in_practice.py"),
        "--output-dir",
        str(out),
        "--epochs",
        "2",
        "--max-train",
        "192",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ANALYSES.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "run 8/8: cnn hessian" in run.stderr
    return out, run.stdout


def test_table_has_one_row_per_model_and_curvature(tiny_run):
    out, stdout = tiny_run
    table = pd.read_csv(out / "step_sizes.csv")
    assert list(zip(table.model, table.curvature, strict=True)) == [
        (m, c) for m in ("mlp", "cnn") for c in ("ggn", "ef", "ef_batch", "hessian")
    ]
    assert (table.steps == 2 * 3).all()  # 2 epochs of 192 / 64 batches
    printed = [line for line in stdout.splitlines() if line.startswith("| MLP") or "| CNN" in line]
    assert len(printed) == 8


def test_logged_eta_hat_is_the_papers_average_of_the_logged_eta(tiny_run):
    out, _ = tiny_run
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        log = LOG_AVERAGE[run_dir.name.split("-", 1)[1]]
        steps = pd.read_csv(run_dir / "steps.csv")
        s = c = 0.0
        for eta, eta_hat, skipped in zip(steps.eta, steps.eta_hat, steps.skipped, strict=True):
            if not skipped:
                s, c = BETA * s + (math.log(eta) if log else eta), BETA * c + 1.0
            expected = math.exp(s / c) if log else s / c
            assert eta_hat == pytest.approx(expected, rel=1e-5), run_dir.name


def test_summary_matches_the_logs(tiny_run):
    out, _ = tiny_run
    table = pd.read_csv(out / "step_sizes.csv")
    for row in table.itertuples():
        run_dir = out / f"{row.model}-{row.curvature}"
        steps = pd.read_csv(run_dir / "steps.csv")
        epochs = pd.read_csv(run_dir / "epochs.csv")
        eta = steps.eta.dropna()
        assert row.eta_p10 <= row.eta_median <= row.eta_p90 <= row.eta_max == eta.max()
        assert row.eta_hat_first == steps.eta_hat.iloc[0]
        assert row.eta_hat_last == pytest.approx(epochs.eta_hat.iloc[-1], rel=1e-6)
        assert row.train_loss_epoch_1 == epochs.set_index("epoch").train_loss[1]
        assert row.test_acc_last == epochs.test_acc.iloc[-1]
