"""ADLER's step sizes in practice: η_k and η̂_k with each curvature, on small digits networks.

For a tanh MLP and a tanh CNN (width 32, depth 2) on scikit-learn's digits (the first 1400
training images, standardized), trains ADLER (Algorithm 1: β = 0.99, ε = 1e-10, lr = 1) with
each curvature of :class:`hessian_lab.optim.ADLER` — ``"ggn"`` (the paper's Q), ``"ef"`` (GN
per example), ``"ef_batch"`` (GN on the batch) and ``"hessian"`` (H) — for five epochs of 22
batches of 64, through the library's own trainer (:func:`hessian_lab.experiments.training.train`,
the ``hessian-lab train`` command), and prints one markdown row per run:

* the training-set loss after the first and the last epoch and the final test accuracy;
* η_k (the per-batch minimizer of the quadratic model along −G): median, 10th and 90th
  percentile and maximum over the steps (NaN steps, where GᵀCG + ε GᵀG ≤ 0, are counted apart);
* η̂_k (the average ADLER applies: of log η for Q and H, of η for GN, the paper's footnote 10)
  at the first and at the last step.

The run folders (``steps.csv`` with every η_k, ``epochs.csv``) and ``step_sizes.csv`` (the rows)
go to ``--output-dir`` (default ``outputs/step_sizes_in_practice``). Numbers are bit-identical on
rerun on the same machine; another CPU's rounding moves them (docs/optimizer.md, "η in
practice", says how much).

Run: ``python analyses/step_sizes_in_practice.py`` (about half a minute on one core).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.training import train

CURVATURES = ("ggn", "ef", "ef_batch", "hessian")
MODELS = ("mlp", "cnn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/step_sizes_in_practice"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-train", type=int, default=1400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    return parser.parse_args(argv)


def summarize_run(run_dir: Path, model: str, curvature: str) -> dict[str, object]:
    """One table row from a finished run folder's ``steps.csv`` and ``epochs.csv``."""
    steps = pd.read_csv(run_dir / "steps.csv")
    epochs = pd.read_csv(run_dir / "epochs.csv").set_index("epoch")
    eta = steps["eta"].dropna()
    return {
        "model": model,
        "curvature": curvature,
        "train_loss_epoch_1": epochs.loc[1, "train_loss"],
        "train_loss_last": epochs["train_loss"].iloc[-1],
        "test_acc_last": epochs["test_acc"].iloc[-1],
        "eta_median": eta.median(),
        "eta_p10": eta.quantile(0.1),
        "eta_p90": eta.quantile(0.9),
        "eta_max": eta.max(),
        "eta_nan_steps": int(steps["eta"].isna().sum()),
        "skipped_steps": int(steps["skipped"].sum()),
        "eta_hat_first": steps["eta_hat"].iloc[0],
        "eta_hat_last": steps["eta_hat"].iloc[-1],
        "steps": len(steps),
    }


def markdown_row(row: dict[str, object]) -> str:
    """The row as docs/optimizer.md prints it (3 significant digits)."""

    def g(x: object) -> str:
        return f"{float(x):.3g}" if not math.isnan(float(x)) else "NaN"

    nan_note = f" ({row['eta_nan_steps']} NaN)" if row["eta_nan_steps"] else ""
    return (
        f"| {str(row['model']).upper()} | {row['curvature']} | "
        f"{float(row['train_loss_epoch_1']):.3f} / {float(row['train_loss_last']):.3f} | "
        f"{float(row['test_acc_last']):.3f} | {g(row['eta_median'])} [{g(row['eta_p10'])}, "
        f"{g(row['eta_p90'])}], {g(row['eta_max'])}{nan_note} | "
        f"{g(row['eta_hat_first'])} → {g(row['eta_hat_last'])} |"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for model in MODELS:
        for curvature in CURVATURES:
            run_dir = args.output_dir / f"{model}-{curvature}"
            config = TrainConfig(
                model=model,
                activation="tanh",
                width=32,
                depth=2,
                dataset="digits",
                max_train=args.max_train,
                optimizer="adler",
                curvature=curvature,
                beta=0.99,
                eps=1e-10,
                epochs=args.epochs,
                batch_size=args.batch_size,
                seed=args.seed,
                out_dir=str(run_dir),
                name=f"{model}-{curvature}",
            )
            start = time.perf_counter()
            train(config, overwrite=True, progress=False)
            rows.append(summarize_run(run_dir, model, curvature))
            print(
                f"run {len(rows)}/{len(MODELS) * len(CURVATURES)}: {model} {curvature} "
                f"({time.perf_counter() - start:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    table = pd.DataFrame(rows)
    table.to_csv(args.output_dir / "step_sizes.csv", index=False)
    print(
        "| model | curvature | train loss after 1 / "
        f"{args.epochs} epochs | test acc. after {args.epochs} | η_k median [p10, p90], max | "
        "η̂ first → last |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(markdown_row(row))
    print(f"\nwrote {args.output_dir / 'step_sizes.csv'} and the run folders beside it")


if __name__ == "__main__":
    main()
