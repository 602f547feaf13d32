"""analyses/paper_comparison.py: a tiny end-to-end run, resume, presets, a fabricated CIFAR run."""

import importlib.util
import json
import math
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "analyses" / "paper_comparison.py"


@pytest.fixture(scope="module")
def pc():
    spec = importlib.util.spec_from_file_location("paper_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_comparison"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(pc, tmp_path_factory):
    out = tmp_path_factory.mktemp("pc") / "tiny"
    status = pc.main(["--preset", "tiny", "--output-dir", str(out)])
    return out, status


def test_tiny_outputs_exist_and_are_sane(tiny_run, capsys):
    out, status = tiny_run
    assert status == 0
    for name in (
        "table1.md",
        "table1.csv",
        "figure1.png",
        "figure2.png",
        "compute.md",
        "compute.csv",
        "curves.csv",
        "lr_curves.csv",
        "runs.csv",
        "results.csv",
        "summary.json",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Table 1: every model × activation × optimizer row, finite accuracies in [0, 1].
    table = pd.read_csv(out / "table1.csv")
    assert len(table) == 3
    assert sorted(table["optimizer"]) == ["adler", "gn", "sgd"]
    assert (table["n"] == 1).all()
    assert np.isfinite(table["mean"]).all()
    assert ((table["mean"] >= 0) & (table["mean"] <= 1)).all()
    sgd_lr = float(table.loc[table["optimizer"] == "sgd", "sgd_best_lrs"].iloc[0])
    assert sgd_lr in (0.01, 0.1)
    md = (out / "table1.md").read_text()
    assert "| CNN | tanh |" in md and "ADLER" in md

    # SGD in the table is the best of its grid.
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 and (runs["status"] == "finished").all()
    sgd_best = runs.loc[runs["optimizer"] == "sgd", "test_acc"].max()
    assert table.loc[table["optimizer"] == "sgd", "mean"].iloc[0] == pytest.approx(sgd_best)

    # Figure 1 data: epochs 0 and 1 for the three optimizers, sane values.
    curves = pd.read_csv(out / "curves.csv")
    assert set(curves["optimizer"]) == {"adler", "gn", "sgd"}
    assert set(curves["epoch"]) == {0, 1}
    assert curves["test_acc"].between(0, 1).all()
    assert np.isfinite(curves["train_loss"]).all() and (curves["train_loss"] > 0).all()

    # Figure 2 data: positive finite learning rates; SGD's is one of its grid values.
    lrs = pd.read_csv(out / "lr_curves.csv")
    assert set(lrs["optimizer"]) == {"adler", "gn", "sgd"}
    assert np.isfinite(lrs["lr"]).all() and (lrs["lr"] > 0).all()
    assert set(lrs.loc[lrs["optimizer"] == "sgd", "lr"]) <= {0.01, 0.1}

    # Compute: one ADLER run has the steps of one SGD run; the grid has two runs.
    summary = json.loads((out / "summary.json").read_text())
    compute = summary["compute"]
    assert compute["adler_steps_over_sgd_grid_steps"] == pytest.approx(0.5)
    assert all(math.isfinite(v) and v >= 0 for v in compute.values())
    assert summary["runs"] == 4 and summary["warnings"] == []
    assert set(summary["files"]) >= {"table1.md", "figure1.png", "figure2.png"}


def test_rerun_reuses_finished_runs(pc, tiny_run, capsys):
    out, _ = tiny_run
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}
    assert len(before) == 4
    assert pc.main(["--preset", "tiny", "--output-dir", str(out)]) == 0
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}
    assert after == before  # nothing retrained
    printed = capsys.readouterr().out
    assert "Table 1" in printed and str(out / "figure2.png") in printed


def test_other_settings_get_their_own_runs_and_never_mix(pc, tiny_run, tmp_path):
    # Run names hash the whole configuration: other settings in the same output folder are new
    # runs beside the old ones (formerly refused), and the tables use only the current grid's.
    out = tmp_path / "tiny"
    shutil.copytree(tiny_run[0], out)
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}
    assert pc.main(["--preset", "tiny", "--output-dir", str(out), "--epochs", "2"]) == 0
    assert len(list((out / "runs").iterdir())) == 8
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the 1-epoch runs untouched
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 and set(runs["epochs"]) == {2}
    assert set(pd.read_csv(out / "curves.csv")["epoch"]) == {0, 1, 2}


def test_a_folder_with_other_settings_is_refused(pc, tiny_run, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(tiny_run[0], out)
    saved = next((out / "runs").glob("*/config.json"))
    config = json.loads(saved.read_text())
    saved.write_text(json.dumps({**config, "max_test": 7}))  # what a name collision would hold
    with pytest.raises(SystemExit, match="other settings.*max_test"):
        pc.main(["--preset", "tiny", "--output-dir", str(out)])


@pytest.mark.slow
def test_comparison_through_submitit(pc, tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "sub"
    args = ["--preset", "tiny", "--output-dir", str(out), "--sgd-lrs", "0.1",
            "--executor", "submitit-local", "--workers", "2"]  # fmt: skip
    assert pc.main(args) == 0
    assert len(list((out / "submitit").glob("*_result.pkl"))) == 3  # ADLER, GN, SGD: 3 jobs
    table = pd.read_csv(out / "table1.csv")
    assert len(table) == 3 and table["mean"].between(0, 1).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["executor"] == "submitit-local"


def test_paper_presets_build_the_full_grid(pc, tmp_path):
    for preset, dataset in (("cifar10", "cifar10"), ("cifar100", "cifar100")):
        args = pc.parse_args(["--preset", preset, "--data-dir", str(tmp_path)])
        settings = pc.resolve_settings(args)
        configs = pc.expand_grid(pc.build_spec(settings))
        # 3 models × 3 activations × 2 sizes × 3 seeds × (ADLER, GN, 10 SGD lrs)
        assert len(configs) == 648
        assert {c.dataset for c in configs} == {dataset}
        lrs = sorted({c.lr for c in configs if c.optimizer == "sgd"})
        np.testing.assert_allclose(lrs, np.geomspace(1e-5, 3e-1, 10))
        vit = [c for c in configs if c.model == "vit"]
        assert all(c.model_options == {"patch_size": 4, "heads": 4} for c in vit)
        assert all(c.data_dir == str(tmp_path) for c in configs)
    with pytest.raises(SystemExit, match="--data-dir"):
        pc.resolve_settings(pc.parse_args(["--preset", "cifar100"]))


def test_quick_preset_is_the_documented_grid(pc):
    settings = pc.resolve_settings(pc.parse_args([]))
    assert settings["preset"] == "quick"
    assert settings["output_dir"] == "outputs/paper_comparison"
    configs = pc.expand_grid(pc.build_spec(settings))
    # The paper's protocol: ADLER, GN and SGD at each of the ten grid lrs, on every variation.
    np.testing.assert_allclose(settings["sgd_lrs"], np.geomspace(1e-5, 3e-1, 10))
    assert len(settings["seeds"]) >= 3  # issue 13: a spread, not one near-tie per cell
    n_variations = math.prod(
        len(settings[key]) for key in ("models", "activations", "arch", "seeds")
    )
    n_runs = n_variations * (len(pc.OPTIMIZERS) - 1 + len(settings["sgd_lrs"]))
    assert len(configs) == n_runs
    # docs/paper_comparison.md's presets table states the same number of runs.
    doc = (SCRIPT.parents[1] / "docs" / "paper_comparison.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `quick`"))
    assert f"| {n_runs} |" in row


def test_table1_marks_cells_with_failed_runs(pc):
    settings = {"seeds": [0, 1, 2], "arch": [(16, 1)], "dataset": "digits", "epochs": 10}
    settings["sgd_lrs"] = [0.1, 0.3]
    rows = [
        {"model": "vit", "activation": "tanh", "optimizer": opt, "mean": m, "std": 0.1, "n": n}
        for opt, m, n in (("adler", 0.76, 2), ("gn", 0.47, 3), ("sgd", 0.74, 3))
    ]
    table = pd.DataFrame(rows)
    table["text"] = [f"{m:.3f} ± 0.100" for m in table["mean"]]
    table["sgd_best_lrs"] = ["", "", "0.3 0.3 0.3"]
    md = pc.table1_markdown(table, settings)
    # A cell with a failed run is marked and never bold: the failure does not win the row.
    assert "| ViT | tanh | 0.760 ± 0.100 (n=2) | 0.470 ± 0.100 | **0.740 ± 0.100** |" in md
    assert "only k of the 3 runs of that cell finished" in md
    table["n"] = 3
    md = pc.table1_markdown(table, settings)
    assert "(n=" not in md and "| **0.760 ± 0.100** |" in md


def _write_cifar_batch(path, n, seed):
    rng = np.random.RandomState(seed)
    batch = {
        b"data": rng.randint(0, 256, size=(n, 3072), dtype=np.uint8),
        b"labels": rng.randint(0, 10, size=n).tolist(),
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def test_cifar10_preset_runs_on_fabricated_data(pc, tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _write_cifar_batch(folder / f"data_batch_{i}", 8, seed=i)
    _write_cifar_batch(folder / "test_batch", 8, seed=9)
    out = tmp_path / "out"
    status = pc.main(
        [
            "--preset", "cifar10", "--data-dir", str(tmp_path / "data"),
            "--output-dir", str(out), "--models", "vit", "--activations", "relu",
            "--seeds", "0", "--arch", "8x1", "--epochs", "1", "--sgd-lrs", "0.1",
            "--workers", "0", "--device", "cpu",
        ]
    )  # fmt: skip
    assert status == 0
    table = pd.read_csv(out / "table1.csv")
    assert len(table) == 3 and table["mean"].between(0, 1).all()
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs["dataset"]) == {"cifar10"} and len(runs) == 3
