"""The paper's comparison: ADLER vs GN vs SGD grid search — Table 1, Figures 1 and 2, compute.

ADLER (Balboni & Bacciu, §3) compares, for every network variation (model family × activation ×
size × seed), (i) the best of a grid search over ten SGD learning rates
``numpy.geomspace(1e-5, 3e-1, 10)``, (ii) ADLER (β = 0.99, ε = 1e-10) and (iii) the GN variant
(β = 0.99). This script runs that study through the sweep runner
(:func:`hessian_lab.experiments.sweep.run_sweep`: parallel workers, resumable) over the model
families CNN, CNN with residual connections (``rescnn``) and ViT, the activations relu, sigmoid and
tanh, and several seeds, then writes into ``--output-dir``:

* ``table1.md`` / ``table1.csv`` — Table 1: final test accuracy, mean ± std over seeds (and sizes)
  per model × activation × optimizer; SGD is first reduced to its best grid learning rate for each
  variation (by final test accuracy), as in the paper. The CSV has ``mean``, ``std``, ``n``.
* ``figure1.png`` — Figure 1: test accuracy and training loss (log scale) over epochs of the relu
  networks (as in the paper), one column per model family, for the three optimizers, with 95%
  confidence bands over seeds (SGD: the best-lr run of each variation); ``figure1_all.png``: the
  same for every activation.
* ``figure2.png`` — Figure 2: the learning rate over training (log scale): η̂ for ADLER and GN
  (per step, binned), and for SGD the grid value that is best at each epoch (by test accuracy at
  that epoch), with 95% bands over seeds.
* ``compute.md`` / ``compute.csv`` — steps and training wall time of one ADLER run, one GN run,
  one SGD run and the whole SGD grid, per variation and in total: the paper's claim is that one
  ADLER run (about twice an SGD run) replaces the grid search (ten SGD runs).
* ``curves.csv`` — the per-epoch metrics behind Figure 1; ``lr_curves.csv`` — the learning rates
  behind Figure 2; ``runs.csv`` — one row per run (final metrics and configuration);
  ``summary.json`` — the settings, wall time and the file list.
* ``runs/<run name>/`` — the run folders (logs, checkpoints); ``results.csv`` — the sweep table.

Re-running the same command reuses finished runs and resumes interrupted ones; re-running with
different settings into the same folder is refused (use another ``--output-dir``).

Presets:

* ``quick`` — scikit-learn's 8×8 digits (no files needed), small models (width 16, depth 1;
  ViT patch 2), 3 seeds, 10 epochs of batch 32: 324 runs, under 10 minutes on 2 CPU cores.
* ``cifar10`` / ``cifar100`` — the paper's scale (two sizes per family, 3 seeds, 50 epochs,
  batch 128; epochs, batch size and sizes are not stated in the paper and are our guesses):
  648 runs, for a GPU; needs ``--data-dir`` with the unpacked CIFAR python files.
* ``tiny`` — one CNN, one activation, one seed, one epoch, two SGD learning rates on 256 digits:
  a smoke test (seconds).

Every preset setting can be overridden by a flag (``--models``, ``--epochs``, ``--seeds``, ...).

Run: ``python analyses/paper_comparison.py --preset quick``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from hessian_lab.core import progress_bar  # noqa: E402
from hessian_lab.experiments.adler_options import parse_option_value  # noqa: E402
from hessian_lab.experiments.config import TrainConfig  # noqa: E402
from hessian_lab.experiments.protocol import (  # noqa: E402
    SGD_LEARNING_RATES,
    best_sgd_runs,
    variation_columns,
)
from hessian_lab.experiments.run_log import read_jsonl  # noqa: E402
from hessian_lab.experiments.summarize import collect_runs, paper_table  # noqa: E402
from hessian_lab.experiments.sweep import EXECUTORS, SweepSpec, expand_grid, run_sweep  # noqa: E402

OPTIMIZERS: tuple[str, ...] = ("adler", "gn", "sgd")
OPTIMIZER_LABELS = {"adler": "ADLER", "gn": "GN", "sgd": "SGD (best grid lr)"}
PALETTE = {"ADLER": "#1f77b4", "GN": "#2ca02c", "SGD (best grid lr)": "#d62728"}
MODEL_LABELS = {"cnn": "CNN", "rescnn": "CNN+ResNet", "vit": "ViT", "mlp": "MLP"}

#: What Table 1 averages over, as the paper does: sizes and seeds ("variations"). Every other
#: setting is the same for all runs of a comparison (a different one would get its own rows).
AVERAGED_OVER: tuple[str, ...] = ("width", "depth", "seed")

#: Settings of each preset. ``arch`` pairs width with depth; ``vit`` holds the ViT's options.
#: A preset is data only: change a preset here (and its documentation), nothing else.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "dataset": "digits",
        "models": ["cnn"],
        "activations": ["tanh"],
        "seeds": [0],
        "arch": [(8, 1)],
        "epochs": 1,
        "batch_size": 64,
        "sgd_lrs": [0.01, 0.1],
        "max_train": 256,
        "max_test": 128,
        "vit": {"patch_size": 2, "heads": 2},
        "workers": 0,
    },
    # Chosen so that every model × activation row trains (the best SGD grid lr reaches >= 0.5
    # test accuracy on every row; probed with SGD only, never by which optimizer wins) and the
    # whole preset stays under 10 minutes on 2 CPU cores (measured: docs/paper_comparison.md).
    "quick": {
        "dataset": "digits",
        "models": ["cnn", "rescnn", "vit"],
        "activations": ["relu", "sigmoid", "tanh"],
        # 3 seeds: a spread, and one near-tie of two grid lrs no longer decides a whole cell.
        "seeds": [0, 1, 2],
        # Width 16, depth 1: what fits the budget; the steps, not the width, were missing.
        "arch": [(16, 1)],
        # 10 epochs of batch 32 = 450 steps (5 of batch 64 were 115): without batch norm the
        # sigmoid CNNs sit on a plateau at chance for ~300 steps, and the ViTs need the steps
        # too; at 115 steps those six rows stayed near 0.1 with every optimizer and lr.
        "epochs": 10,
        "batch_size": 32,
        "sgd_lrs": list(SGD_LEARNING_RATES),
        "max_train": None,  # all 1438 training digits; fewer would cut the steps per epoch
        "max_test": None,
        # Patch 2: 16 tokens of 2×2 pixels on an 8×8 digit (patch 4 leaves 4 tokens).
        "vit": {"patch_size": 2, "heads": 2},
        "workers": 2,
    },
    "cifar10": {
        "dataset": "cifar10",
        "models": ["cnn", "rescnn", "vit"],
        "activations": ["relu", "sigmoid", "tanh"],
        "seeds": [0, 1, 2],
        "arch": [(32, 2), (64, 3)],
        "epochs": 50,
        "batch_size": 128,
        "sgd_lrs": list(SGD_LEARNING_RATES),
        "max_train": None,
        "max_test": None,
        "vit": {"patch_size": 4, "heads": 4},
        "workers": 4,
    },
}
PRESETS["cifar100"] = {**PRESETS["cifar10"], "dataset": "cifar100"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; every preset value can be overridden."""
    p = argparse.ArgumentParser(
        description="Reproduce the ADLER paper's comparison (Table 1, Figures 1-2, compute): "
        "ADLER, GN and SGD over a 10-learning-rate grid, on CNN / ResCNN / ViT x relu / sigmoid "
        "/ tanh x seeds. Runs through the resumable sweep runner.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="quick",
        help="quick: digits, <= 10 min on 2 CPU cores; cifar10/cifar100: the paper's scale "
        "(GPU, --data-dir); tiny: smoke test",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where runs, tables and figures go (default: outputs/paper_comparison for quick, "
        "outputs/paper_comparison_<preset> otherwise)",
    )
    p.add_argument("--data-dir", help="folder of the unpacked CIFAR python files")
    p.add_argument("--models", nargs="+", choices=["cnn", "rescnn", "vit", "mlp"])
    p.add_argument("--activations", nargs="+", choices=["relu", "sigmoid", "tanh"])
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument(
        "--arch",
        nargs="+",
        metavar="WIDTHxDEPTH",
        help="model sizes, e.g. 16x1 32x2 (each is one variation per seed)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--sgd-lrs",
        nargs="+",
        type=float,
        help="SGD grid (default: the paper's numpy.geomspace(1e-5, 3e-1, 10))",
    )
    p.add_argument("--max-train", type=int, help="use the first N training examples")
    p.add_argument("--max-test", type=int, help="use the first N test examples")
    p.add_argument(
        "--workers",
        type=int,
        help="runs at once: worker processes (0: in this process), local jobs, or the SLURM "
        "array's parallelism",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="pool",
        help="pool: worker processes on this machine; slurm: one SLURM job per run through "
        "submitit (pip install 'hessian-lab[cluster]'; give --slurm timeout_min=...); "
        "submitit-local: the same submitit path as local processes",
    )
    p.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="submitit parameter, repeatable: timeout_min=240 slurm_partition=gpu "
        "gpus_per_node=1 cpus_per_task=8 mem_gb=32 ...",
    )
    return p.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The preset's settings with the command-line overrides applied."""
    settings = dict(PRESETS[args.preset])
    settings["preset"] = args.preset
    for key in ("models", "activations", "seeds", "epochs", "batch_size", "sgd_lrs"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = list(value) if isinstance(value, list) else value
    for key in ("max_train", "max_test", "workers"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if args.arch:
        try:
            settings["arch"] = [tuple(int(x) for x in a.lower().split("x")) for a in args.arch]
        except ValueError:
            raise SystemExit(
                f"--arch: expected WIDTHxDEPTH such as 16x1, got {args.arch}"
            ) from None
    settings["arch"] = [tuple(a) for a in settings["arch"]]
    settings["data_dir"] = args.data_dir
    settings["device"] = args.device
    settings["executor"] = args.executor
    settings["slurm"] = {}
    for item in args.slurm:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--slurm expects KEY=VALUE, got {item!r}")
        settings["slurm"][key] = parse_option_value(text)
    default_dir = "outputs/paper_comparison"
    if args.preset != "quick":
        default_dir += f"_{args.preset}"
    settings["output_dir"] = str(args.output_dir or default_dir)
    if settings["dataset"] in ("cifar10", "cifar100") and not settings["data_dir"]:
        raise SystemExit(
            f"preset {args.preset!r} trains on {settings['dataset']}: pass --data-dir pointing at "
            "the folder with the unpacked CIFAR python files (see docs/experiments.md)"
        )
    return settings


def _optimizer_point(name: str) -> str | dict[str, Any]:
    """One optimizer of the grid: its name, or its name with the options it runs with.

    ADLER and GN run as Algorithm 1 is written, without a limit on consecutive skipped steps: a
    run that diverges is a result (it finishes, and counts at its final accuracy), not a failure
    that would drop out of Table 1's means.
    """
    if name == "sgd":
        return name
    return {"optimizer": name, "adler_options": {"max_consecutive_skips": None}}


def build_spec(settings: dict[str, Any]) -> SweepSpec:
    """The sweep of the comparison: models × activations × sizes × seeds × optimizers."""
    base: dict[str, Any] = {
        "dataset": settings["dataset"],
        "epochs": settings["epochs"],
        "batch_size": settings["batch_size"],
        "max_train": settings["max_train"],
        "max_test": settings["max_test"],
        "device": settings["device"],
    }
    if "vit" in settings["models"]:
        base.update(settings["vit"])  # patch_size, heads: given to the ViT only
    if settings["data_dir"]:
        base["data_dir"] = settings["data_dir"]
    return SweepSpec(
        name=f"paper-comparison-{settings['preset']}",
        out_dir=settings["output_dir"],
        workers=settings["workers"],
        base=base,
        grid={
            "model": list(settings["models"]),
            "activation": list(settings["activations"]),
            "arch": [{"width": w, "depth": d} for w, d in settings["arch"]],
            "seed": list(settings["seeds"]),
            "optimizer": [_optimizer_point(name) for name in OPTIMIZERS],
        },
        sgd_lrs=tuple(float(lr) for lr in settings["sgd_lrs"]),
        executor=settings.get("executor", "pool"),
        slurm=dict(settings.get("slurm", {})),
    )


def run_grid(spec: SweepSpec) -> tuple[list[TrainConfig], list[dict[str, Any]], float]:
    """Run (or reuse) every run of the grid with a progress bar.

    Returns:
        The configurations, the sweep's result rows and the wall time in seconds.
    """
    configs = expand_grid(spec)
    bar = progress_bar(total=len(configs), desc="runs", unit="run", dynamic_ncols=True)
    failures: list[str] = []

    def report(config: TrainConfig, outcome: dict[str, Any]) -> None:
        bar.update(1)
        if outcome.get("status") != "finished":
            failures.append(f"{config.name}: {outcome.get('error')}")
            bar.write(f"FAILED {config.name}: {outcome.get('error')}")
        else:
            bar.set_postfix_str(f"{config.name} acc {float(outcome['test_acc']):.3f}")

    t0 = time.perf_counter()
    try:
        rows = run_sweep(spec, on_result=report)
    except ValueError as err:  # e.g. a run folder of other settings: nothing was run
        raise SystemExit(str(err)) from err
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    if failures:
        print(f"{len(failures)} of {len(configs)} runs failed (see error.txt in their folders)")
    return configs, rows, wall


def load_runs(configs: list[TrainConfig]) -> pd.DataFrame:
    """Final metrics and configuration of the grid's runs (only these, not stale folders)."""
    runs = collect_runs([c.out_dir for c in configs if Path(c.out_dir).exists()])
    for config in configs:  # steps and training time from result.json
        result_path = Path(config.out_dir) / "result.json"
        if result_path.exists():
            result = json.loads(result_path.read_text())
            mask = runs["name"] == config.name
            runs.loc[mask, "steps"] = result["steps"]
            runs.loc[mask, "train_time_s"] = result["train_time_s"]
    return runs


def make_table1(runs: pd.DataFrame, settings: dict[str, Any]) -> pd.DataFrame:
    """Table 1 in long form: one row per model × activation × optimizer, complete."""
    table = paper_table(runs, metric="test_acc", rows=("model", "activation"), over=AVERAGED_OVER)
    best = best_sgd_runs(runs, "test_acc")
    rows = []
    for model in settings["models"]:
        for activation in settings["activations"]:
            for opt in OPTIMIZERS:
                hit = table[
                    (table["model"] == model)
                    & (table["activation"] == activation)
                    & (table["optimizer"] == opt)
                ]
                row: dict[str, Any] = {
                    "model": model,
                    "activation": activation,
                    "optimizer": opt,
                    "mean": float(hit["mean"].iloc[0]) if len(hit) else math.nan,
                    "std": float(hit["std"].iloc[0]) if len(hit) else math.nan,
                    "n": int(hit["n"].iloc[0]) if len(hit) else 0,
                    "text": hit["text"].iloc[0] if len(hit) else "—",
                    "sgd_best_lrs": "",
                }
                if opt == "sgd":
                    sel = best[(best["model"] == model) & (best["activation"] == activation)]
                    row["sgd_best_lrs"] = " ".join(f"{lr:.3g}" for lr in sel["lr"].astype(float))
                rows.append(row)
    return pd.DataFrame(rows)


def table1_markdown(table: pd.DataFrame, settings: dict[str, Any]) -> str:
    """Table 1 as Markdown, laid out like the paper's (ADLER, GN, SGD columns)."""
    lines = [
        "| Model | Activation | ADLER | GN | SGD (best of grid) | SGD best lr per seed |",
        "|---|---|---|---|---|---|",
    ]
    n_var = len(settings["seeds"]) * len(settings["arch"])
    short = False
    for (model, activation), group in table.groupby(["model", "activation"], sort=False):
        text = dict(zip(group["optimizer"], group["text"], strict=True))
        for opt, n in zip(group["optimizer"], group["n"], strict=True):
            if 0 < n < n_var:  # a run failed (e.g. diverged): say so, do not hide it in the mean
                text[opt] += f" (n={n})"
                short = True
        means = dict(zip(group["optimizer"], group["mean"], strict=True))
        counts = dict(zip(group["optimizer"], group["n"], strict=True))
        # A cell with a failed run is not a candidate for the row's best (its mean hides it).
        finite = {k: v for k, v in means.items() if np.isfinite(v) and counts[k] >= n_var}
        top = round(max(finite.values()), 3) if finite else None
        # Bold every optimizer whose mean rounds to the row's best (ties are shown as ties).
        winners = {o for o, v in finite.items() if round(v, 3) == top}
        cells = [f"**{text[o]}**" if o in winners else text[o] for o in OPTIMIZERS]
        lrs = group.loc[group["optimizer"] == "sgd", "sgd_best_lrs"].iloc[0]
        label = MODEL_LABELS.get(model, model)
        lines.append(f"| {label} | {activation} | {' | '.join(cells)} | {lrs} |")
    lines.append("")
    lines.append(
        f"Final test accuracy on {settings['dataset']} after {settings['epochs']} epochs, "
        f"mean ± std over {n_var} variation(s) (seeds × sizes); SGD: the best of "
        f"{len(settings['sgd_lrs'])} learning rates per variation, chosen by final test "
        "accuracy. Bold: highest mean in the row (ties: all) among cells whose runs all finished."
        + (
            f" (n=k): only k of the {n_var} runs of that cell finished; the others failed "
            "(for ADLER and GN: diverged, see the warnings in summary.json) and are left out "
            "of its mean."
            if short
            else ""
        )
    )
    return "\n".join(lines) + "\n"


def epoch_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch metrics of ADLER, GN and the best-lr SGD run of each variation (Figure 1)."""
    chosen = pd.concat(
        [
            runs[(runs["optimizer"] != "sgd") & (runs["status"] == "finished")],
            best_sgd_runs(runs, "test_acc"),
        ]
    )
    frames = []
    variation = variation_columns(runs.columns)
    for _, run in chosen.iterrows():
        epochs = pd.DataFrame(read_jsonl(Path(run["run_dir"]) / "epochs.jsonl"))
        for key in (*variation, "optimizer", "lr", "name"):
            epochs[key] = run[key]
        frames.append(epochs)
    curves = pd.concat(frames, ignore_index=True)
    for col in ("train_loss", "train_acc", "test_loss", "test_acc"):
        curves[col] = curves[col].astype(float)
    curves["Optimizer"] = curves["optimizer"].map(OPTIMIZER_LABELS)
    return curves


def lr_curves(runs: pd.DataFrame, bins_per_epoch: int = 10) -> pd.DataFrame:
    """Learning rates over training (Figure 2).

    ADLER and GN: η̂ per logged step, averaged (geometrically) in ``bins_per_epoch`` bins per
    epoch so that long runs stay plottable. SGD: for every variation and epoch, the grid learning
    rate whose run has the best test accuracy at that epoch (the paper's Figure 2 convention; the
    run itself keeps its lr fixed).
    """
    done = runs[runs["status"] == "finished"]
    variation = variation_columns(runs.columns)
    frames = []
    for _, run in done[done["optimizer"] != "sgd"].iterrows():
        steps = pd.DataFrame(read_jsonl(Path(run["run_dir"]) / "steps.jsonl"))
        steps["eta_hat"] = steps["eta_hat"].astype(float)
        per_epoch = steps.groupby("epoch")["step"].transform(lambda s: s - s.min())
        size = steps.groupby("epoch")["step"].transform("count")
        steps["x"] = (
            steps["epoch"] - 1 + np.floor(per_epoch / size * bins_per_epoch) / (bins_per_epoch)
        )
        steps = steps[steps["eta_hat"] > 0]
        binned = steps.groupby("x")["eta_hat"].apply(lambda s: float(np.exp(np.log(s).mean())))
        frame = binned.reset_index().rename(columns={"eta_hat": "lr"})
        frame["x"] += 0.5 / bins_per_epoch  # bin centres, in epochs
        for key in (*variation, "optimizer"):
            frame[key] = run[key]
        frames.append(frame)
    sgd = done[done["optimizer"] == "sgd"]
    for _, group in sgd.groupby(variation, dropna=False):
        accs = []
        for _, run in group.iterrows():
            epochs = pd.DataFrame(read_jsonl(Path(run["run_dir"]) / "epochs.jsonl"))
            epochs = epochs[epochs["epoch"] > 0]
            accs.append(
                pd.DataFrame(
                    {
                        "epoch": epochs["epoch"],
                        "test_acc": epochs["test_acc"].astype(float),
                        "lr": float(run["lr"]),
                    }
                )
            )
        table = pd.concat(accs, ignore_index=True).dropna(subset=["test_acc"])
        best = table.loc[table.groupby("epoch")["test_acc"].idxmax()]
        # A step over each epoch: the chosen lr at its start and (just before) its end.
        start = best["epoch"].to_numpy(float) - 1.0
        frame = pd.DataFrame(
            {
                "x": np.concatenate([start + 0.001, start + 0.999]),
                "lr": np.concatenate([best["lr"].to_numpy(), best["lr"].to_numpy()]),
            }
        ).sort_values("x", kind="stable")
        first = group.iloc[0]
        for key in (*variation, "optimizer"):
            frame[key] = first[key]
        frames.append(frame)
    curves = pd.concat(frames, ignore_index=True)
    curves["Optimizer"] = curves["optimizer"].map(OPTIMIZER_LABELS)
    return curves


def compute_table(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Steps and training time per variation: ADLER, GN, one SGD run, the whole SGD grid."""
    done = runs[runs["status"] == "finished"].copy()
    done["steps"] = done["steps"].astype(float)
    done["train_time_s"] = done["train_time_s"].astype(float)
    rows = []
    variation = variation_columns(runs.columns)
    for key, group in done.groupby(variation, dropna=False):
        row = dict(zip(variation, key, strict=True))
        for opt in ("adler", "gn"):
            sel = group[group["optimizer"] == opt]
            row[f"{opt}_steps"] = sel["steps"].sum() if len(sel) else math.nan
            row[f"{opt}_time_s"] = sel["train_time_s"].sum() if len(sel) else math.nan
        sgd = group[group["optimizer"] == "sgd"]
        row["sgd_runs"] = len(sgd)
        row["sgd_run_time_s"] = sgd["train_time_s"].mean() if len(sgd) else math.nan
        row["sgd_grid_steps"] = sgd["steps"].sum()
        row["sgd_grid_time_s"] = sgd["train_time_s"].sum()
        rows.append(row)
    table = pd.DataFrame(rows)
    # Keep the variation columns that say something: the classic ones and any that vary.
    classic = ("dataset", "model", "activation", "width", "depth", "seed")
    constant = [c for c in variation if c not in classic and table[c].astype(str).nunique() <= 1]
    table = table.drop(columns=constant)
    totals = {
        "adler_steps": float(table["adler_steps"].sum()),
        "adler_time_s": float(table["adler_time_s"].sum()),
        "gn_time_s": float(table["gn_time_s"].sum()),
        "sgd_grid_steps": float(table["sgd_grid_steps"].sum()),
        "sgd_grid_time_s": float(table["sgd_grid_time_s"].sum()),
        "sgd_one_run_time_s": float(table["sgd_run_time_s"].sum()),
    }
    totals["adler_over_one_sgd_run"] = totals["adler_time_s"] / totals["sgd_one_run_time_s"]
    totals["adler_over_sgd_grid"] = totals["adler_time_s"] / totals["sgd_grid_time_s"]
    totals["adler_steps_over_sgd_grid_steps"] = totals["adler_steps"] / totals["sgd_grid_steps"]
    return table, totals


def compute_markdown(totals: dict[str, float], n_variations: int, n_lrs: int) -> str:
    """The compute comparison as a short Markdown table and sentence."""
    return (
        f"Training compute summed over the {n_variations} variations (training steps only; "
        "evaluation excluded; wall times of runs that shared the CPU with other runs):\n\n"
        "| | steps | training time (s) |\n|---|---|---|\n"
        f"| ADLER, one run per variation | {totals['adler_steps']:.0f} | "
        f"{totals['adler_time_s']:.1f} |\n"
        f"| GN, one run per variation | {totals['adler_steps']:.0f} | "
        f"{totals['gn_time_s']:.1f} |\n"
        f"| SGD, one run per variation (mean over the grid) | "
        f"{totals['sgd_grid_steps'] / n_lrs:.0f} | {totals['sgd_one_run_time_s']:.1f} |\n"
        f"| SGD, the whole {n_lrs}-lr grid | {totals['sgd_grid_steps']:.0f} | "
        f"{totals['sgd_grid_time_s']:.1f} |\n\n"
        f"One ADLER run costs {totals['adler_over_one_sgd_run']:.2f}× one SGD run "
        f"(the paper: about 2×) and {totals['adler_over_sgd_grid']:.2f}× the whole SGD grid "
        f"({totals['adler_steps_over_sgd_grid_steps']:.2f}× its steps).\n"
    )


def _legend_below_and_layout(fig: plt.Figure, ax: plt.Axes) -> None:
    """Move ``ax``'s legend below the panels, where it hides no curve, and lay the figure out.

    Constrained layout leaves room for the two-line title and the legend whatever the figure's
    height (``tight_layout`` let the title run into the first row of a tall figure).
    """
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    fig.set_layout_engine("constrained")
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)


def plot_figure1(
    curves: pd.DataFrame, path: Path, settings: dict[str, Any], activations: Sequence[str]
) -> None:
    """Test accuracy and training loss (log y) over epochs: one column per model family.

    With one activation (the paper's Figure 1 shows ReLU networks) the figure has two rows, test
    accuracy and training loss; with several, two rows per activation. Bands: 95% CI over seeds
    (and sizes).
    """
    models = [m for m in settings["models"] if m in set(curves["model"])]
    acts = [a for a in activations if a in set(curves["activation"])]
    n_rows = 2 * len(acts)
    fig, axes = plt.subplots(
        n_rows, len(models), figsize=(4.2 * len(models), 2.7 * n_rows), squeeze=False, sharex=True
    )
    order = [OPTIMIZER_LABELS[o] for o in OPTIMIZERS]
    for a, act in enumerate(acts):
        for j, model in enumerate(models):
            data = curves[(curves["model"] == model) & (curves["activation"] == act)]
            for k, (col, label) in enumerate(
                [("test_acc", "test accuracy"), ("train_loss", "training loss")]
            ):
                ax = axes[2 * a + k, j]
                sns.lineplot(
                    data=data,
                    x="epoch",
                    y=col,
                    hue="Optimizer",
                    hue_order=order,
                    palette=PALETTE,
                    errorbar=("ci", 95),
                    ax=ax,
                    legend=(a == 0 and k == 0 and j == 0),
                )
                if col == "train_loss":
                    ax.set_yscale("log")
                ax.set_ylabel(label if j == 0 else "")
                ax.set_title(f"{MODEL_LABELS.get(model, model)}, {act}", fontsize=10)
    n = len(settings["seeds"]) * len(settings["arch"])
    fig.suptitle(
        f"Figure 1 — {settings['dataset']}: mean and 95% CI over {n} seed(s) × size(s) per "
        "curve;\nSGD: the best grid lr of each variation (by final test accuracy)",
        fontsize=10,
    )
    _legend_below_and_layout(fig, axes[0, 0])
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_figure2(curves: pd.DataFrame, path: Path, settings: dict[str, Any]) -> None:
    """Learning rate over training (log y): η̂ of ADLER and GN, best grid lr of SGD."""
    models = [m for m in settings["models"] if m in set(curves["model"])]
    acts = [a for a in settings["activations"] if a in set(curves["activation"])]
    fig, axes = plt.subplots(
        len(models),
        len(acts),
        figsize=(4.2 * len(acts), 2.8 * len(models)),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    order = [OPTIMIZER_LABELS[o] for o in OPTIMIZERS]
    for i, model in enumerate(models):
        for j, act in enumerate(acts):
            ax = axes[i, j]
            data = curves[(curves["model"] == model) & (curves["activation"] == act)]
            sns.lineplot(
                data=data,
                x="x",
                y="lr",
                hue="Optimizer",
                hue_order=order,
                palette=PALETTE,
                errorbar=("ci", 95),
                ax=ax,
                legend=(i == 0 and j == 0),
            )
            ax.set_yscale("log")
            ax.set_title(f"{MODEL_LABELS.get(model, model)}, {act}")
            ax.set_xlabel("epoch")
            ax.set_ylabel("learning rate")
    fig.suptitle(
        "Figure 2 — learning rate over training: η̂ (ADLER, GN);\n"
        "SGD: the grid lr with the best test accuracy at each epoch (95% CI over seeds)",
        fontsize=10,
    )
    _legend_below_and_layout(fig, axes[0, 0])
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_sane(runs: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """Warnings about failed runs, missing table cells, accuracies outside [0, 1]."""
    warnings = []
    failed = runs[runs["status"] != "finished"]
    if len(failed):
        warnings.append(f"{len(failed)} run(s) did not finish: {', '.join(failed['name'])}")
    missing = table[table["n"] == 0]
    if len(missing):
        cells = ", ".join(f"{r.model}/{r.activation}/{r.optimizer}" for r in missing.itertuples())
        warnings.append(f"Table 1 cells without finished runs: {cells}")
    accs = runs["test_acc"].astype(float).dropna()
    if ((accs < 0) | (accs > 1)).any():
        warnings.append("accuracies outside [0, 1]")
    return warnings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and write every output; returns the exit status."""
    t_start = time.perf_counter()
    args = parse_args(argv)
    settings = resolve_settings(args)
    out = Path(settings["output_dir"])
    spec = build_spec(settings)
    try:
        configs = expand_grid(spec)
    except ValueError as err:
        raise SystemExit(f"invalid comparison settings: {err}") from err
    n_var = len(settings["models"]) * len(settings["activations"]) * len(settings["seeds"])
    n_var *= len(settings["arch"])
    print(
        f"paper comparison, preset {settings['preset']}: {n_var} variations × (ADLER, GN, SGD × "
        f"{len(settings['sgd_lrs'])} lrs) = {len(configs)} runs on {settings['dataset']}, "
        f"{settings['epochs']} epochs, {spec.workers} worker(s) -> {out}"
    )
    configs, _, sweep_wall = run_grid(spec)

    runs = load_runs(configs)
    runs.to_csv(out / "runs.csv", index=False)
    table = make_table1(runs, settings)
    table.to_csv(out / "table1.csv", index=False)
    markdown = table1_markdown(table, settings)
    (out / "table1.md").write_text(markdown)

    print("\nTable 1 — final test accuracy, mean ± std over variations:\n")
    print(markdown)

    curves = epoch_curves(runs)
    curves.drop(columns=["Optimizer"]).to_csv(out / "curves.csv", index=False)
    fig1_acts = [a for a in settings["activations"] if a == "relu"] or settings["activations"][:1]
    plot_figure1(curves, out / "figure1.png", settings, fig1_acts)
    plot_figure1(curves, out / "figure1_all.png", settings, settings["activations"])
    lrs = lr_curves(runs)
    lrs.drop(columns=["Optimizer"]).to_csv(out / "lr_curves.csv", index=False)
    plot_figure2(lrs, out / "figure2.png", settings)

    compute, totals = compute_table(runs)
    compute.to_csv(out / "compute.csv", index=False)
    compute_md = compute_markdown(totals, len(compute), len(settings["sgd_lrs"]))
    (out / "compute.md").write_text(compute_md)
    print(compute_md)

    warnings = check_sane(runs, table)
    for warning in warnings:
        print(f"WARNING: {warning}")
    wall = time.perf_counter() - t_start
    files = {
        "table1.md": "Table 1 (Markdown)",
        "table1.csv": "Table 1 (mean, std, n per model × activation × optimizer)",
        "figure1.png": f"Figure 1 ({', '.join(fig1_acts)} networks, as in the paper): test "
        "accuracy and training loss over epochs",
        "figure1_all.png": "Figure 1 for every activation",
        "figure2.png": "Figure 2: learning rates over training",
        "compute.md": "compute of ADLER vs the SGD grid",
        "compute.csv": "compute per variation",
        "curves.csv": "per-epoch metrics behind Figure 1",
        "lr_curves.csv": "learning rates behind Figure 2",
        "runs.csv": "one row per run: final metrics and configuration",
        "results.csv": "the sweep runner's table",
        "summary.json": "settings, wall time, compute totals, warnings",
        "runs/": f"{len(configs)} run folders (logs, checkpoints)",
    }
    summary = {
        "settings": {k: v for k, v in settings.items()},
        "runs": len(configs),
        "sweep_wall_s": round(sweep_wall, 1),
        "total_wall_s": round(wall, 1),
        "compute": totals,
        "warnings": warnings,
        "files": {name: str(out / name) for name in files},
        "command": " ".join(["python", "analyses/paper_comparison.py", *(argv or sys.argv[1:])]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\ndone in {wall:.0f} s (sweep {sweep_wall:.0f} s). Files:")
    for name, what in files.items():
        print(f"  {out / name}  —  {what}")
    return 1 if warnings else 0


if __name__ == "__main__":
    sys.exit(main())
