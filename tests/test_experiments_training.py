"""End-to-end training on a small slice of digits, for each optimizer."""

import csv
import json

import pytest

from hessian_lab.experiments.cli import main
from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.run_log import read_jsonl
from hessian_lab.experiments.training import train

OPTIMIZERS = [
    pytest.param(dict(optimizer="adler"), id="adler"),
    pytest.param(dict(optimizer="gn"), id="gn"),
    pytest.param(dict(optimizer="sgd", lr=0.1), id="sgd"),
]


def tiny(tmp_path, **changes):
    values = dict(
        model="cnn",
        width=4,
        depth=1,
        max_train=96,
        max_test=40,
        batch_size=32,
        epochs=1,
        seed=3,
        out_dir=str(tmp_path / "run"),
    )
    values.update(changes)
    return TrainConfig(**values)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_end_to_end(tmp_path, opt):
    config = tiny(tmp_path, **opt)
    result = train(config, progress=False)
    run = tmp_path / "run"
    assert result["status"] == "finished" and result["steps"] == 3
    assert json.loads((run / "result.json").read_text()) == result
    saved = TrainConfig.load(run / "config.json")
    assert saved.optimizer == opt["optimizer"] and saved.max_train == 96

    steps = read_jsonl(run / "steps.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert s["loss"] > 0 and s["eta"] > 0 and s["eta_hat"] > 0
    if opt["optimizer"] == "sgd":
        assert all(s["eta_hat"] == pytest.approx(0.1) for s in steps)
    else:
        assert {"grad_sq", "curvature", "skipped"} <= set(steps[0])
        assert steps[0]["eta_hat"] == pytest.approx(steps[0]["eta"])  # η̂_0 = η_0

    epochs = read_jsonl(run / "epochs.jsonl")
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert epochs[0]["eta_hat"] is None
    for e in epochs:
        assert 0 <= e["train_acc"] <= 1 and 0 <= e["test_acc"] <= 1
    assert epochs[1]["test_acc"] == result["test_acc"]

    # the CSV files hold the same numbers as the JSONL files
    with open(run / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[1]["train_loss"]) == epochs[1]["train_loss"]
    with open(run / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["eta_hat"]) for r in rows] == [s["eta_hat"] for s in steps]


def test_deterministic_and_seed_dependent(tmp_path):
    a = train(tiny(tmp_path / "a", optimizer="sgd", lr=0.1, epochs=2), progress=False)
    b = train(tiny(tmp_path / "b", optimizer="sgd", lr=0.1, epochs=2), progress=False)
    c = train(tiny(tmp_path / "c", optimizer="sgd", lr=0.1, epochs=2, seed=4), progress=False)
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    assert all(a[k] == b[k] for k in keys)
    assert read_jsonl(tmp_path / "a/run/steps.jsonl") == read_jsonl(tmp_path / "b/run/steps.jsonl")
    assert a["train_loss"] != c["train_loss"]


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    config = tiny(tmp_path, optimizer="sgd", lr=0.1)
    first = train(config, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, progress=False)
    assert train(config, resume=True, progress=False) == first  # finished: returned as is
    assert train(config, overwrite=True, progress=False)["test_acc"] == first["test_acc"]
    with pytest.raises(ValueError, match="differs from the saved one.*lr"):
        train(tiny(tmp_path, optimizer="sgd", lr=0.2), resume=True, progress=False)


def test_other_models_and_synthetic(tmp_path):
    for i, (model, options) in enumerate(
        [("vit", {"patch_size": 4, "heads": 2}), ("mlp", {}), ("rescnn", {})]
    ):
        config = tiny(
            tmp_path / str(i),
            model=model,
            model_options=options,
            dataset="synthetic",
            synthetic_shape=(2, 8, 8),
            synthetic_classes=3,
            optimizer="sgd",
            lr=0.05,
        )
        result = train(config, progress=False)
        assert result["steps"] == 3


def test_cli_train_prints_log_location(tmp_path, capsys):
    out = tmp_path / "cli-run"
    code = main(
        [
            "train",
            "--optimizer",
            "sgd",
            "--lr",
            "0.1",
            "--width",
            "4",
            "--depth",
            "1",
            "--max-train",
            "64",
            "--max-test",
            "32",
            "--epochs",
            "1",
            "--out-dir",
            str(out),
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "finished" in text and str(out) in text
    assert (out / "result.json").exists()
    # --config reproduces a run's configuration
    code = main(["train", "--config", str(out / "config.json"), "--resume", "--no-progress"])
    assert code == 0


def test_package_exports():
    import hessian_lab.experiments as experiments

    for name in experiments.__all__:
        assert getattr(experiments, name) is not None
    with pytest.raises(AttributeError):
        experiments.no_such_name  # noqa: B018
