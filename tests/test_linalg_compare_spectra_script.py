"""Smoke test of analyses/compare_spectra.py: a tiny run writes its CSVs and figures."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "analyses" / "compare_spectra.py"


@pytest.mark.slow
def test_compare_spectra_writes_csv_and_figures(tmp_path):
    out = tmp_path / "spectra"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--output-dir", str(out),
        "--sgd-steps", "5",
        "--k", "2",
        "--slq-probes", "2",
        "--slq-steps", "8",
        "--probes", "4",
        "--curvature-examples", "16",
        "--width", "2",
        "--threads", "1",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"wrote {out / 'comparison.csv'}" in run.stdout
    for name in ["comparison.csv", "densities.csv", "densities.png", "top_eigenvalues.png"]:
        assert (out / name).stat().st_size > 0, name
    table = pd.read_csv(out / "comparison.csv")
    assert set(table.phase) == {"init", "trained"}
    assert set(table.operator) == {"H", "Q", "GN"}
    dens = pd.read_csv(out / "densities.csv")
    assert {"phase", "operator", "eigenvalue", "u", "density", "se"} <= set(dens.columns)
