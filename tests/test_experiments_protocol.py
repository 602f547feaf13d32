"""The experiment protocol, written once: grid, best lr, what is averaged, when a run is reused."""

import json
import math

import numpy as np
import pytest

from hessian_lab.experiments import protocol
from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.summarize import collect_runs, paper_table
from hessian_lab.experiments.sweep import PAPER_SGD_LRS, expand_grid, load_sweep, run_sweep
from hessian_lab.optim import SGD_LEARNING_RATES


def fake_run(root, test_acc, train_loss=1.0, **changes):
    """A finished run folder with the given configuration and final metrics (no training)."""
    config = TrainConfig(**changes).validate()
    folder = root / config.name
    folder.mkdir(parents=True)
    config.out_dir = str(folder)
    config.save(folder / "config.json")
    record = {"epoch": config.epochs, "step": 10, "train_loss": train_loss, "train_acc": 0.5,
              "test_loss": 1.0, "test_acc": test_acc, "eta_hat": 0.1, "time_s": 1.0}  # fmt: skip
    (folder / "epochs.jsonl").write_text(json.dumps(record) + "\n")
    result = {"name": config.name, "status": "finished", "test_acc": test_acc, "steps": 10}
    (folder / "result.json").write_text(json.dumps(result))
    return folder


def test_one_grid():
    assert PAPER_SGD_LRS is SGD_LEARNING_RATES is protocol.SGD_LEARNING_RATES
    np.testing.assert_allclose(PAPER_SGD_LRS, np.geomspace(1e-5, 3e-1, 10), rtol=0)


def test_best_grid_lr_per_configuration(tmp_path):
    for seed, accs in ((0, (0.3, 0.8, math.nan)), (1, (0.6, 0.2, 0.4))):
        for lr, acc in zip((0.01, 0.1, 0.3), accs, strict=True):
            fake_run(tmp_path, acc, optimizer="sgd", lr=lr, seed=seed, train_loss=acc)
    for lr in (0.01, 0.1):  # all diverged: kept (first), so that the table shows it
        fake_run(tmp_path, math.nan, optimizer="sgd", lr=lr, seed=2)
    runs = collect_runs([tmp_path])
    best = protocol.best_sgd_runs(runs, "test_acc").sort_values("seed")
    assert list(best["lr"]) == [0.1, 0.01, 0.01]  # NaN never wins
    lowest = protocol.best_sgd_runs(runs, "train_loss").sort_values("seed")
    assert list(lowest["lr"]) == [0.01, 0.1, 0.01]  # a loss: lowest is best
    table = paper_table(runs[runs["seed"] < 2])
    assert table["n"].tolist() == [2]
    assert table["mean"].iloc[0] == pytest.approx((0.8 + 0.6) / 2)


def test_summary_never_averages_runs_of_different_settings(tmp_path):
    for seed in (0, 1):
        fake_run(tmp_path, 0.5 + 0.1 * seed, seed=seed, epochs=3)
        fake_run(tmp_path, 0.9, seed=seed, epochs=5)
    fake_run(tmp_path, 0.2, seed=0, epochs=5, max_train=100)
    table = paper_table(collect_runs([tmp_path]))
    assert set(table.attrs["split"]) == {"epochs", "max_train"}
    assert sorted(table["n"]) == [1, 2, 2]
    means = {(r.epochs, r.max_train if r.max_train == r.max_train else None): r["mean"]
             for _, r in table.iterrows()}  # fmt: skip
    assert means[(3, None)] == pytest.approx(0.55) and means[(5, None)] == pytest.approx(0.9)
    assert means[(5, 100)] == pytest.approx(0.2)


def test_sizes_are_averaged_only_when_asked(tmp_path):
    for width, acc in ((8, 0.4), (16, 0.6)):
        fake_run(tmp_path, acc, width=width)
    runs = collect_runs([tmp_path])
    assert len(paper_table(runs)) == 2  # default: over the seed only
    pooled = paper_table(runs, over=("width", "depth", "seed"))
    assert len(pooled) == 1 and pooled["mean"].iloc[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not a setting that changes results"):
        paper_table(runs, over=("name",))


def test_variation_is_everything_but_the_optimizer():
    columns = protocol.variation_columns(TrainConfig().to_dict())
    assert {"model", "width", "seed", "epochs", "max_train", "batch_size"} <= set(columns)
    assert not set(columns) & {"optimizer", "lr", "beta", "adler_options", "name", "device"}


def test_when_a_run_may_be_reused(tmp_path):
    saved = TrainConfig(epochs=2).validate()
    saved.save(tmp_path / "config.json")
    same = TrainConfig(epochs=2, device="cpu", out_dir="elsewhere", log_every=3).validate()
    assert protocol.config_differences(saved, same) == []
    protocol.check_reusable(tmp_path, same)
    with pytest.raises(ValueError, match="other settings.*epochs: saved 2, given 3"):
        protocol.check_reusable(tmp_path, TrainConfig(epochs=3).validate())


def write(path, text):
    path.write_text(text)
    return path


def test_sweep_refuses_a_folder_of_other_settings_before_running(tmp_path):
    spec = load_sweep(
        write(
            tmp_path / "s.toml",
            f'out_dir = "{tmp_path / "out"}"\n[base]\nepochs = 1\nmax_train = 32\n'
            '[grid]\noptimizer = ["sgd"]\n[sgd]\nlrs = [0.1]\n',
        )
    )
    (config,) = expand_grid(spec)
    other = TrainConfig.from_dict({**config.to_dict(), "epochs": 4})
    folder = tmp_path / "out" / "runs" / config.name
    folder.mkdir(parents=True)
    other.save(folder / "config.json")
    with pytest.raises(ValueError, match="other settings.*epochs"):
        run_sweep(spec, workers=0)
    assert not (folder / "steps.jsonl").exists()  # nothing ran


def test_sweep_keys_go_only_where_they_apply(tmp_path):
    spec = load_sweep(
        write(
            tmp_path / "s.toml",
            '[base]\nepochs = 1\n[grid]\noptimizer = ["adler", "sgd"]\nbeta = [0.9, 0.99]\n'
            "[sgd]\nlrs = [0.1]\n",
        )
    )
    configs = expand_grid(spec)
    adler = [c for c in configs if c.optimizer == "adler"]
    sgd = [c for c in configs if c.optimizer == "sgd"]
    assert sorted(c.beta for c in adler) == [0.9, 0.99]
    assert len(sgd) == 1 and sgd[0].beta == 0.99  # beta is ADLER's: one SGD run, not two
    with pytest.raises(ValueError, match="beta applies to none of the runs"):
        load_sweep(write(tmp_path / "b.toml", '[base]\nbeta = 0.9\n[grid]\noptimizer = ["sgd"]\n'))


def test_sweep_lr_is_not_shared_between_sgd_and_adler(tmp_path):
    text = '[base]\nlr = 0.1\n[grid]\noptimizer = ["adler", "sgd"]\n'
    with pytest.raises(ValueError, match="multiplier of η̂ for adler/gn"):
        load_sweep(write(tmp_path / "a.toml", text))
    paired = (
        '[grid]\nopt = [{ optimizer = "adler", lr = 0.5 }, { optimizer = "sgd" }]\n'
        "[sgd]\nlrs = [0.1]\n"
    )
    configs = expand_grid(load_sweep(write(tmp_path / "b.toml", paired)))
    assert sorted((c.optimizer, c.lr) for c in configs) == [("adler", 0.5), ("sgd", 0.1)]


def test_sweep_names_include_varied_fields_and_hash(tmp_path):
    spec = load_sweep(
        write(tmp_path / "s.toml", '[grid]\nepochs = [1, 2]\noptimizer = ["adler"]\n')
    )
    names = [c.name for c in expand_grid(spec)]
    assert [n.rsplit("-", 1)[0] for n in names] == [
        "cnn-relu-w32-d2-digits-adler-s0-epochs1",
        "cnn-relu-w32-d2-digits-adler-s0-epochs2",
    ]
