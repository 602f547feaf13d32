"""User-defined models and data sets (``module:factory``), run names, --version, option checks."""

import inspect
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from hessian_lab.experiments.cli import build_parser, config_from_args, main
from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.training import train

# Tiny SGD runs on the user's blobs: 64 training examples, batch 32, one epoch (2 steps).
USER_RUN = [
    "--model", "user_factories:small_mlp", "--model-option", "hidden=5",
    "--dataset", "user_factories:blobs", "--dataset-option", "n_train=64",
    "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "32", "--epochs", "1",
    "--no-progress", "--threads", "1",
]  # fmt: skip


def test_cli_trains_a_user_defined_model_on_a_user_data_set(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *USER_RUN, "--out-dir", str(out)]) == 0
    assert "finished small_mlp-hidden5-blobs-sgd-lr0.1-s0-" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "user_factories:small_mlp"
    assert config["model_options"] == {"hidden": 5}
    assert config["dataset_options"] == {"n_train": 64}
    # A factory gets width/depth/activation only when set: here they stay unset.
    assert config["width"] is None and config["activation"] is None
    # The trained network is the user's: Linear(6 -> 5), Linear(5 -> 3 classes).
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert state["1.weight"].shape == (5, 6) and state["3.weight"].shape == (3, 5)
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and 0 <= result["test_acc"] <= 1


def test_adler_trains_a_user_model(tmp_path):
    config = TrainConfig(
        model="user_factories:small_mlp",
        activation="relu",  # set, so given to the factory
        dataset="user_factories:blobs",
        max_train=64,
        batch_size=32,
        epochs=1,
        out_dir=str(tmp_path / "run"),
    )
    result = train(config, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").open()]
    assert result["steps"] == 2 and all(s["eta_hat"] > 0 for s in steps)
    assert result["name"].startswith("small_mlp-relu-blobs-adler-s0-")


def test_factory_without_in_shape_and_num_classes(tmp_path):
    config = TrainConfig(
        model="user_factories:fixed_net",
        model_options={"hidden": 3},
        max_train=32,
        max_test=16,
        optimizer="sgd",
        lr=0.1,
        batch_size=32,
        epochs=1,
        out_dir=str(tmp_path / "run"),
    )
    assert train(config, progress=False)["steps"] == 1


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(model="no_such_module:f"), ["cannot import module 'no_such_module'", "PYTHONPATH"]),
        (dict(model="user_factories:nothing"), ["no attribute 'nothing'", "small_mlp"]),
        (dict(model="user_factories"), ["unknown model"]),
        (
            dict(model="user_factories:small_mlp", model_options={"hiddn": 4}),
            ["hiddn", "its parameters are: in_shape, num_classes, hidden, activation"],
        ),
        (dict(model="user_factories:small_mlp", width=16), ["width", "--model-option"]),
        (
            dict(model="user_factories:small_mlp", model_options={"num_classes": 3}),
            ["num_classes is given to the factory by the runner"],
        ),
        (dict(dataset="user_factories:blobs", dataset_options={"n": 3}), ["n_train", "n_test"]),
        (dict(dataset="digits", dataset_options={"n": 3}), ["dataset_options", "no options"]),
        (dict(model="cnn", model_options={"hidden": 3}), ["does not take option", "hidden"]),
    ],
)
def test_factory_errors_name_the_problem(changes, words):
    with pytest.raises(ValueError) as info:
        TrainConfig(**changes).validate()
    for word in words:
        assert word in str(info.value)


def test_factory_returning_the_wrong_thing(tmp_path):
    bad_model = TrainConfig(
        model="user_factories:not_a_model", optimizer="sgd", lr=0.1, out_dir=str(tmp_path / "a")
    )
    with pytest.raises(TypeError, match="must return a torch.nn.Module"):
        train(bad_model, progress=False)
    bad_data = TrainConfig(
        dataset="user_factories:bad_data", optimizer="sgd", lr=0.1, out_dir=str(tmp_path / "b")
    )
    with pytest.raises(TypeError, match="ImageData or a tuple"):
        train(bad_data, progress=False)


def test_factory_module_in_the_current_directory(tmp_path):
    """The console command finds a module next to where it runs (cwd is searched too)."""
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            def tiny(in_shape, num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
            """
        )
    )
    # -I: an isolated interpreter, without the current directory on sys.path (as the installed
    # `hessian-lab` script runs).
    code = "import sys; from hessian_lab.experiments.cli import main; sys.exit(main())"
    argv = ["train", "--model", "my_models:tiny", "--optimizer", "sgd", "--lr", "0.1",
            "--max-train", "32", "--max-test", "16", "--batch-size", "32", "--epochs", "1",
            "--no-progress", "--out-dir", "run"]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-I", "-c", code, *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "result.json").exists()


# ------------------------------------------------------------------------------------------------
# Run names: readable prefix + hash of every setting that changes results.


def _name(**changes):
    return TrainConfig(**changes).validate().name


def test_different_settings_never_share_a_name():
    base = _name()
    assert re.fullmatch(r"cnn-relu-w32-d2-digits-adler-s0-[0-9a-f]{8}", base)
    others = [
        _name(epochs=2),
        _name(max_train=100),
        _name(batch_size=32),
        _name(beta=0.9),
        _name(eps=1e-8),
        _name(split_seed=1),
        _name(adler_options={"trust_region": 1.0}),
        _name(seed=1),
    ]
    assert len({base, *others}) == 1 + len(others)
    # Bookkeeping does not change the name (a moved run or another device resumes the same run).
    assert _name(device="cpu", log_every=5, eval_batch_size=7, tensorboard=True) == base
    # 1 and 1.0, or an explicit default, are the same setting.
    assert _name(adler_options={"trust_region": 1}) == _name(adler_options={"trust_region": 1.0})
    assert _name(width=32, activation="relu") == base
    assert _name(adler_options={"max_lr": None}) == base


def test_rerun_with_other_epochs_is_a_new_run_not_a_refusal(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--width", "4", "--depth", "1", "--max-train", "64", "--max-test", "32",
            "--optimizer", "sgd", "--lr", "0.1", "--no-progress", "--threads", "1"]  # fmt: skip
    assert main([*argv, "--epochs", "1"]) == 0
    assert main([*argv, "--epochs", "2"]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.startswith("cnn-relu-w4-d1-digits-sgd-lr0.1-s0-") for r in runs)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert re.match(r"hessian-lab \d+\.\d+", out) and "torch" in out


# ------------------------------------------------------------------------------------------------
# Options are parsed, validated, and refused where they do not apply.


def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv])).validate()


@pytest.mark.parametrize(
    "option, words",
    [
        ("trust_region=abc", ["trust_region must be a number", "'abc'"]),
        ("trust_region=-1", ["trust_region must be a number > 0"]),
        ("max_lr=0", ["max_lr must be a number > 0"]),
        ("curvature_fraction=1.5", ["curvature_fraction must be a number <= 1"]),
        ("max_consecutive_skips=0", ["positive integer"]),
        ("max_consecutive_skips=2.5", ["positive integer"]),
        ("averaging=geometric", ["averaging must be one of log, arithmetic"]),
        ("jvp_method=magic", ["auto, forward, double_backward"]),
        ("allow_train_mode=maybe", ["true or false"]),
        ("trust_regin=1", ["unknown adler option 'trust_regin'", "trust_region"]),
        ("beta=0.9", ["use --beta"]),
        ("trust_region", ["--adler-option expects KEY=VALUE"]),
    ],
)
def test_every_adler_option_is_validated(option, words, capsys):
    code = main(["train", "--adler-option", option, "--no-progress", "--out-dir", "unused"])
    assert code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_adler_options_are_normalized():
    config = parse(
        "--adler-option", "trust_region=1", "--adler-option", "averaging=log",
        "--adler-option", "max_consecutive_skips=null", "--adler-option", "max_lr=null",
    )  # fmt: skip
    assert config.adler_options == {
        "trust_region": 1.0,
        "averaging": "log",
        "max_consecutive_skips": None,
    }
    assert isinstance(config.adler_options["trust_region"], float)


def test_adler_options_are_adlers_arguments():
    from hessian_lab.experiments.adler_options import ADLER_OPTIONS
    from hessian_lab.optim.adler import ADLER

    parameters = inspect.signature(ADLER).parameters
    assert set(ADLER_OPTIONS) <= set(parameters), set(ADLER_OPTIONS) - set(parameters)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--optimizer", "sgd", "--lr", "0.1", "--beta", "0.9"], ["--beta", "setting of ADLER"]),
        # Given on the command line, even at its default value: refused, not ignored.
        (["--optimizer", "sgd", "--lr", "0.1", "--eps", "1e-10"], ["--eps does not apply"]),
        (
            ["--optimizer", "sgd", "--lr", "0.1", "--adler-option", "max_lr=1"],
            ["--adler-option does"],
        ),
        (["--data-dir", "data"], ["--data-dir does not apply", "needs no files"]),
        (["--synthetic-classes", "3"], ["synthetic data set only"]),
        (["--dataset", "cifar10", "--data-dir", "d", "--split-seed", "1"], ["fixed train/test"]),
    ],
)
def test_options_that_do_not_apply_are_refused(argv, words, capsys):
    code = main(["train", *argv, "--no-progress", "--out-dir", "unused"])
    assert code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_adler_lr_is_a_multiplier_passed_through(tmp_path):
    # --lr is not ignored for ADLER: it is ADLER's own lr, a multiplier of its rate η̂_k.
    config = parse("--optimizer", "adler", "--lr", "0.5", "--out-dir", str(tmp_path / "run"))
    assert config.lr == 0.5 and "-adler-lr0.5-" in config.name
    assert parse("--optimizer", "gn", "--lr", "1").lr is None  # the default multiplier: same run
    assert parse("--optimizer", "gn", "--lr", "1").name == parse("--optimizer", "gn").name
    config.width, config.depth, config.max_train, config.epochs = 4, 1, 64, 1
    train(config, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").open()]
    assert steps and all(s["applied_lr"] == pytest.approx(0.5 * s["eta_hat"]) for s in steps)
    with pytest.raises(ValueError, match="positive learning rate"):
        TrainConfig(optimizer="adler", lr=-1.0).validate()


def test_saved_settings_that_do_not_apply_to_a_new_choice_are_dropped(tmp_path):
    TrainConfig(optimizer="sgd", lr=0.1, epochs=2).validate().save(tmp_path / "config.json")
    # SGD's lr is no multiplier of ADLER's rate: it is not carried over to the new optimizer.
    config = parse("--config", str(tmp_path / "config.json"), "--optimizer", "adler")
    assert config.optimizer == "adler" and config.lr is None and config.epochs == 2
    TrainConfig(model="vit", model_options={"patch_size": 2}).validate().save(tmp_path / "v.json")
    config = parse("--config", str(tmp_path / "v.json"), "--model", "cnn")
    assert config.model_options == {} and config.width == 32


def test_cli_options_are_the_config_fields():
    """Every TrainConfig field has an option, and every built-in model option too."""
    import dataclasses

    from hessian_lab.experiments.models import model_option_specs

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        assert flag in text, flag
    for name in model_option_specs():
        assert "--" + name.replace("_", "-") in text
    assert model_option_specs()["patch_size"].type is int
    assert model_option_specs()["last_layer_std"].type is float
