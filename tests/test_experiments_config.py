"""Bad configurations give clear errors, in the API and on the command line."""

import re

import pytest

from hessian_lab.experiments.cli import main
from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.training import train


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(model="resnet18"), ["unknown model", "cnn", "rescnn", "vit", "mlp"]),
        (dict(activation="gelu"), ["unknown activation", "relu", "sigmoid", "tanh"]),
        (dict(optimizer="adam"), ["unknown optimizer", "adler", "gn", "sgd"]),
        (dict(dataset="mnist"), ["unknown dataset", "digits", "cifar10"]),
        (dict(batch_size=0), ["batch_size", "positive"]),
        (dict(batch_size=-8), ["batch_size", "positive"]),
        (dict(epochs=0), ["epochs"]),
        (dict(optimizer="sgd"), ["learning rate", "--lr"]),
        (dict(optimizer="sgd", lr=-0.1), ["learning rate"]),
        (dict(dataset="cifar10"), ["data_dir", "--data-dir"]),
        (dict(beta=1.0), ["beta"]),
    ],
)
def test_invalid_config(changes, words):
    with pytest.raises(ValueError) as info:
        TrainConfig(**changes).validate()
    for word in words:
        assert word in str(info.value)


def test_unknown_key():
    with pytest.raises(ValueError, match="unknown configuration key.*lerning_rate"):
        TrainConfig.from_dict({"lerning_rate": 0.1})


def test_missing_data_directory(tmp_path):
    config = TrainConfig(
        dataset="cifar10", data_dir=str(tmp_path / "no-cifar"), out_dir=str(tmp_path / "run")
    )
    with pytest.raises(FileNotFoundError) as info:
        train(config, progress=False)
    assert "no-cifar" in str(info.value) and "cifar-10-batches-py" in str(info.value)


def test_round_trip(tmp_path):
    config = TrainConfig(
        model="vit", model_options={"patch_size": 2}, optimizer="sgd", lr=0.1
    ).validate()
    config.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == config
    # A readable prefix, then a hash of the whole configuration.
    prefix = r"vit-relu-w32-d2-patch_size2-digits-sgd-lr0\.1-s0"
    assert re.fullmatch(prefix + r"-[0-9a-f]{8}", config.name)
    assert config.out_dir.endswith(config.name)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--activation", "gelu"], ["invalid choice", "relu"]),
        (["train", "--optimizer", "adam"], ["invalid choice", "adler"]),
        (["train", "--batch-size", "abc"], ["invalid int"]),
    ],
)
def test_cli_rejects_choices(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--batch-size", "0"], ["batch_size must be a positive integer"]),
        (["--optimizer", "sgd"], ["needs a positive learning rate"]),
        (
            ["--dataset", "cifar100", "--data-dir", "/nonexistent/cifar"],
            ["/nonexistent/cifar", "cifar-100-python"],
        ),
        (["--dataset", "cifar100"], ["--data-dir"]),
        (["--model", "vit", "--patch-size", "3"], ["divisible by patch_size=3"]),
        # --model also takes a factory package.module:function, so a wrong name is no argparse
        # choice any more: the configuration's own check names the valid models.
        (["--model", "resnet18"], ["unknown model 'resnet18'", "rescnn", "module:function"]),
    ],
)
def test_cli_clear_errors(argv, words, capsys, tmp_path):
    code = main(["train", "--out-dir", str(tmp_path / "run"), "--no-progress", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("hessian-lab train: error:")
    for word in words:
        assert word in err


def test_cli_help_lists_every_option(capsys):
    for command in ("train", "sweep", "summarize"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "usage: hessian-lab " + command in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--model",
        "--activation",
        "--width",
        "--depth",
        "--optimizer",
        "--lr",
        "--epochs",
        "--batch-size",
        "--seed",
        "--device",
        "--resume",
        "--data-dir",
        "--download",
    ):
        assert option in out


def test_config_file_and_overrides(tmp_path):
    from hessian_lab.experiments.cli import build_parser, config_from_args

    base = TrainConfig(model="vit", model_options={"patch_size": 2}, epochs=2).validate()
    base.save(tmp_path / "config.json")

    def parse(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv])).validate()

    same = parse("--config", str(tmp_path / "config.json"), "--device", "cpu")
    assert same.results_key() == base.results_key() and same.out_dir == base.out_dir
    changed = parse("--config", str(tmp_path / "config.json"), "--heads", "2", "--seed", "5")
    assert changed.model_options == {"patch_size": 2, "heads": 2} and changed.seed == 5
    assert changed.name.startswith("vit-relu-w32-d2-heads2-patch_size2-digits-adler-s5-")
    assert changed.out_dir.endswith(changed.name)
    renamed = parse("--config", str(tmp_path / "config.json"), "--name", "mine")
    assert renamed.out_dir.endswith("mine")
    adler = parse("--adler-option", "trust_region=1.0", "--adler-option", "averaging=log")
    assert adler.adler_options == {"trust_region": 1.0, "averaging": "log"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse("--adler-option", "trust_region")
