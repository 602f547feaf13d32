"""analyses/spectra_along_training.py and analyses/cg_with_q.py: tiny end-to-end runs.

Each script runs once (module fixtures) in a configuration of a few seconds of work; the tests then
check that every promised file exists and that its numbers are sane and consistent with what the
mathematics guarantees.
"""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"
TINY_MODEL = ["--width", "2", "--threads", "1"]


def run_script(name: str, out: Path, *flags: str) -> tuple[str, str]:
    cmd = [sys.executable, str(ANALYSES / name), "--output-dir", str(out), *TINY_MODEL, *flags]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ANALYSES.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    # Output captured (not a terminal): progress as whole lines, no \r or escape codes.
    assert "\r" not in run.stderr and "\x1b" not in run.stderr, run.stderr[-500:]
    return run.stdout, run.stderr


def final_progress(stderr: str, desc: str) -> tuple[int, int]:
    """``(done, total)`` of the last progress line ``desc: done/total ...``."""
    lines = [line for line in stderr.splitlines() if line.startswith(desc + ":")]
    assert lines, stderr[-500:]
    done, total = re.match(rf"{re.escape(desc)}: (\d+)/(\d+) ", lines[-1]).groups()
    return int(done), int(total)


# ------------------------------------------------------------------------------------------------
# spectra_along_training.py


@pytest.fixture(scope="module")
def spectra_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sat") / "out"
    stdout = run_script(
        "spectra_along_training.py", out,
        "--steps", "8", "--checkpoints", "3", "--batch-size", "32", "--k", "3",
        "--slq-probes", "2", "--slq-steps", "10", "--probes", "4", "--curvature-examples", "24",
    )  # fmt: skip
    return out, stdout


def test_spectra_files_and_summary(spectra_run):
    out, (stdout, stderr) = spectra_run
    names = ["spectra.csv", "densities.csv", "training.csv", "densities.png",
             "top_eigenvalues.png", "overlaps.png", "rayleigh.png"]  # fmt: skip
    for name in names:
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in stdout, name  # the summary says where each file went
    assert "total time" in stdout
    # One bar over steps and checkpoints: full at the end, the checkpoints' work included (the
    # old bar counted checkpoints only, and its nested step bar's rate absorbed their pauses).
    done, total = final_progress(stderr, "ADLER steps + checkpoints")
    assert done == total > 8  # 8 steps plus 3 checkpoints weighted by their measured cost


def test_spectra_values_are_sane(spectra_run):
    out, _ = spectra_run
    table = pd.read_csv(out / "spectra.csv")
    assert sorted(table.step.unique()) == [0, 1, 8]  # snapshot_steps(8, 3)
    assert np.isfinite(table.train_loss).all()
    for step, part in table.groupby("step"):
        eig = part[part.metric == "eigenvalue"]
        assert set(eig.operator) == {"H", "Q", "GN"}
        assert len(eig) == 3 * 3
        assert np.isfinite(eig.value).all()
        # Q and GN are PSD: no eigenvalue below rounding, no negative SLQ mass.
        psd = eig[eig.operator != "H"].value
        assert (psd >= -1e-4 * eig.value.abs().max()).all()
        neg = part[(part.metric == "negative_mass") & (part.operator != "H")]
        assert (neg.value <= 1e-6).all()
        ov = part[part.metric == "eigenspace_overlap"]
        assert len(ov) == 6  # ordered pairs of 3 operators
        assert ((ov.value >= -1e-6) & (ov.value <= 1 + 1e-6)).all()
        rq = part[part.metric == "rayleigh_quotient"].set_index("operator").value
        assert np.isfinite(rq).all() and rq["Q"] > 0 and rq["GN"] > 0
        eta = part[part.metric == "step_size"].set_index("operator").value
        assert eta["Q"] == pytest.approx(1 / rq["Q"], rel=1e-6)
        assert eta["GN"] == pytest.approx(1 / rq["GN"], rel=1e-6)
        adler = part[part.operator == "ADLER"].set_index("metric").value
        if step == 0:
            assert adler.isna().all()  # no ADLER step taken yet
        else:
            assert (adler > 0).all() and np.isfinite(adler).all()
    dens = pd.read_csv(out / "densities.csv")
    assert {"step", "operator", "eigenvalue", "u", "density", "se"} <= set(dens.columns)
    assert np.isfinite(dens.density).all() and (dens.density >= 0).all()
    for _, part in dens.groupby(["step", "operator"]):
        # A smoothed probability density of u: integrates to ≈ 1 over the grid.
        assert np.trapezoid(part.density, part.u) == pytest.approx(1, abs=0.05)
    log = pd.read_csv(out / "training.csv")
    assert list(log.step) == list(range(1, 9))
    assert np.isfinite(log[["loss", "eta", "eta_hat", "grad_sq", "curvature"]]).all().all()


def test_snapshot_steps_are_geometric_and_include_ends():
    # The analyses' shared helpers live in the library (no sys.path tricks).
    from hessian_lab.experiments.loop import geometric_steps

    assert geometric_steps(400, 5) == [0, 6, 25, 100, 400]
    assert geometric_steps(8, 3) == [0, 1, 8]
    assert geometric_steps(3, 10) == [0, 1, 2, 3]  # never beyond the run, never repeated
    assert geometric_steps(5, 1) == [0]


# ------------------------------------------------------------------------------------------------
# cg_with_q.py


@pytest.fixture(scope="module")
def cg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cg") / "out"
    stdout = run_script(
        "cg_with_q.py", out,
        "--steps", "6", "--batch-size", "64", "--eval-every", "3", "--curvature-examples", "24",
        "--dampings", "1e-3", "1e-1", "--solve-iters", "15", "--cg-iters", "3",
    )  # fmt: skip
    return out, stdout


def test_cg_files_and_summary(cg_run):
    out, (stdout, stderr) = cg_run
    names = ["cg_iterations.csv", "cg_solves.csv", "cg_convergence.png", "training.csv",
             "hf_vs_adler.png"]  # fmt: skip
    for name in names:
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in stdout, name
    assert "total time" in stdout
    done, total = final_progress(stderr, "ADLER + CG study")
    assert done == total > 6
    assert final_progress(stderr, "Hessian-free") == (6, 6)


def test_cg_quadratic_model_never_increases_for_psd_curvature(cg_run):
    """CG minimizes φ over nested Krylov spaces: for Q + λI, GN + λI (λ > 0) φ_i is monotone."""
    out, _ = cg_run
    it = pd.read_csv(out / "cg_iterations.csv")
    assert set(it.point) == {"init", "mid (step 3)", "end (step 6)"}
    assert set(it.operator) == {"H", "Q", "GN"}
    assert np.isfinite(it[["residual", "relative_residual", "quadratic_model"]]).all().all()
    assert (it[it.iteration == 0].quadratic_model == 0).all()  # x_0 = 0
    assert (it[it.iteration == 0].relative_residual.sub(1).abs() < 1e-5).all()  # r_0 = −b = G
    for (_, _, op), part in it.groupby(["point", "damping", "operator"]):
        phi = part.sort_values("iteration").quadratic_model.to_numpy()
        # Also H while CG runs: the iterate before a negative-curvature direction is kept, and
        # every accepted step had positive curvature, so φ still decreased.
        scale = max(np.abs(phi).max(), 1e-12)
        assert (np.diff(phi) <= 1e-5 * scale).all(), (op, phi)
        if op != "H":  # with H, CG may stop at once (GᵀHG ≤ 0) and keep x = 0
            assert phi[-1] < 0


def test_cg_reports_negative_curvature_of_h(cg_run):
    out, (stdout, _) = cg_run
    solves = pd.read_csv(out / "cg_solves.csv")
    assert len(solves) == 3 * 2 * 3  # points × dampings × operators
    neg = solves[solves.negative_curvature]
    # Q and GN (+ λI, λ > 0) are positive definite: CG never meets negative curvature with them.
    assert set(neg.operator) <= {"H"}
    # The tiny tanh CNN's Hessian is indefinite at these points (checked on this seed): CG with
    # H + 1e-3 I meets a direction of negative curvature, and the report says so consistently.
    assert len(neg) >= 1
    assert (neg.stop_reason == "negative_curvature").all()
    assert (neg.curvature <= 0).all()
    assert solves[~solves.negative_curvature].curvature.isna().all()
    assert f"negative-curvature events: {len(neg)} of {len(solves)} solves" in stdout
    assert np.isfinite(solves[["relative_residual", "quadratic_model", "risk_change"]]).all().all()
    # undamped model m(x) = φ(x) − ½λ‖x‖² ≤ φ(x)
    assert (solves.undamped_model <= solves.quadratic_model + 1e-7).all()


def test_cg_training_comparison_is_sane(cg_run):
    out, _ = cg_run
    log = pd.read_csv(out / "training.csv")
    assert set(log.optimizer) == {"ADLER", "Hessian-free (Q)"}
    for _, part in log.groupby("optimizer"):
        ev = part.dropna(subset=["train_loss"])
        assert list(ev.step) == [0, 3, 6]
        for col in ("train_acc", "test_acc"):
            assert ((ev[col] >= 0) & (ev[col] <= 1)).all()
        assert np.isfinite(ev[["train_loss", "test_loss"]]).all().all()
        assert np.all(np.diff(part.time_s.to_numpy()) >= 0)  # cumulative optimizer time
    hf = log[(log.optimizer == "Hessian-free (Q)") & (log.step > 0)]
    assert (hf.damping > 0).all() and (hf.cg_iterations <= 3).all()
    # An accepted step lowered its minibatch loss, so ρ > 0 there.
    assert (hf[hf.accepted.astype(bool)].rho > 0).all()
    assert not math.isnan(hf.loss.iloc[-1])


@pytest.mark.parametrize("name", ["spectra_along_training.py", "cg_with_q.py"])
def test_help_and_bad_options(name):
    run = subprocess.run(
        [sys.executable, str(ANALYSES / name), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and "--output-dir" in run.stdout
    if name == "cg_with_q.py":
        bad = [sys.executable, str(ANALYSES / name), "--steps", "10", "--adler-steps", "5"]
        run = subprocess.run(bad, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "--adler-steps >= --steps" in run.stderr
