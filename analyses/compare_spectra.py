"""Spectra of H, Q and GN for a small CNN on scikit-learn's digits, at initialization and after SGD.

For the exact Hessian H, the paper's PSD approximation Q (the generalized Gauss-Newton matrix) and
the paper's GN baseline (the per-example empirical Fisher), on a fixed subset of the training
data, at initialization and after a short plain-SGD run, this script computes with
:func:`hessian_lab.linalg.compare_operators`:

* the top-k eigenvalues of each operator (Lanczos, full reorthogonalization);
* their spectral densities by stochastic Lanczos quadrature, with error bands across probes;
* the comparison table: eigenspace overlaps, principal angles, relative Frobenius distances,
  traces, Rayleigh quotients along the gradient, the negative spectral mass.

It writes into ``--output-dir``:

* ``comparison.csv`` — the tidy table of ``compare_operators`` with a ``phase`` column;
* ``densities.csv`` — phase, operator, eigenvalue grid, its symlog coordinate ``u``, the density
  of ``u`` (per decade) and its standard error across probes;
* ``densities.png`` — the densities overlaid on a symmetric-log eigenvalue axis (95% bands),
  smoothed in the symlog coordinate so that every decade has the same resolution;
* ``top_eigenvalues.png`` — top-k eigenvalues per operator, init vs trained;
* ``overlaps.png`` — top-k eigenspace overlaps between operators.

Run: ``python analyses/compare_spectra.py`` (about 1-2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from hessian_lab.core import progress_bar  # noqa: E402
from hessian_lab.experiments.curvature_study import (  # noqa: E402
    OPERATOR_COLORS,
    OPERATOR_LABELS,
    density_table,
    make_operators,
)
from hessian_lab.experiments.datasets import load_digits  # noqa: E402
from hessian_lab.experiments.loop import ProgressCallback, run_loop  # noqa: E402
from hessian_lab.experiments.models import build_model  # noqa: E402
from hessian_lab.experiments.optimizers import SGDStepper  # noqa: E402
from hessian_lab.linalg import compare_operators  # noqa: E402

PALETTE = OPERATOR_COLORS


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Compare the spectra of H, Q (GGN) and GN (empirical Fisher) of a small CNN "
        "on scikit-learn's digits, at initialization and after a short SGD run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--output-dir", type=Path, default=Path("outputs/compare_spectra"), help="where to write"
    )
    p.add_argument("--seed", type=int, default=0, help="model initialization and probes")
    p.add_argument("--activation", default="tanh", choices=["relu", "tanh", "sigmoid"], help="CNN")
    p.add_argument("--width", type=int, default=8, help="CNN channels")
    p.add_argument("--depth", type=int, default=1, help="CNN two-convolution blocks")
    p.add_argument("--sgd-steps", type=int, default=600, help="plain SGD steps between phases")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    p.add_argument("--batch-size", type=int, default=64, help="SGD batch size")
    p.add_argument(
        "--curvature-examples", type=int, default=128, help="training examples in the operators"
    )
    p.add_argument("--k", type=int, default=10, help="top eigenvalues per operator")
    p.add_argument("--slq-probes", type=int, default=8, help="SLQ probes per operator")
    p.add_argument("--slq-steps", type=int, default=50, help="Lanczos steps per SLQ probe")
    p.add_argument("--probes", type=int, default=30, help="Hutchinson probes (distances, traces)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="precision")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p.parse_args()


def sgd(model: nn.Module, X: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> float:
    """Plain SGD (no momentum, no weight decay) as the paper's baseline; returns the final loss.

    Minibatches are drawn uniformly with replacement from a generator seeded with ``seed + 1``.
    """
    loss_fn = nn.CrossEntropyLoss()
    bar = progress_bar(total=args.sgd_steps, desc="SGD", unit="step", leave=False)
    run_loop(
        model,
        SGDStepper(model, loss_fn, args.lr),
        X,
        y,
        batch_size=args.batch_size,
        order=torch.Generator().manual_seed(args.seed + 1),
        max_steps=args.sgd_steps,
        replacement=True,
        callbacks=[ProgressCallback(bar)],
    )
    bar.close()
    with torch.no_grad():
        return loss_fn(model(X), y).item()


def plot_densities(dens: pd.DataFrame, c: float, sigma_u: float, path: Path) -> None:
    phases = list(dict.fromkeys(dens.phase))
    fig, axes = plt.subplots(1, len(phases), figsize=(6.2 * len(phases), 4.2), sharey=True)
    for ax, phase in zip(np.atleast_1d(axes), phases, strict=True):
        sub = dens[dens.phase == phase]
        for name, part in sub.groupby("operator", sort=False):
            x, y, se = part.eigenvalue, part.density, part.se
            ax.plot(x, y, color=PALETTE[name], label=OPERATOR_LABELS[name], lw=1.4)
            low = np.clip(y - 1.96 * se, 1e-12, None)
            ax.fill_between(x, low, y + 1.96 * se, color=PALETTE[name], alpha=0.2, lw=0)
        ax.set_xscale("symlog", linthresh=c)
        ax.set_yscale("log")
        peak = sub.density.max()
        ax.set_ylim(peak * 1e-4, peak * 3)
        ax.set_xlabel(f"eigenvalue λ (symlog axis, linear for |λ| < {c:.0e})")
        ax.set_title(f"spectral density, {phase}")
        ax.axvline(0, color="0.5", lw=0.6)
    first = np.atleast_1d(axes)[0]
    first.set_ylabel(f"density per decade (σ = {sigma_u} decades)\nSLQ, 95% band across probes")
    first.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_top_eigenvalues(table: pd.DataFrame, path: Path) -> None:
    eig = table[table.metric == "eigenvalue"].copy()
    eig["operator"] = eig.operator.map(OPERATOR_LABELS)
    eig["rank"] = eig["index"].astype(int) + 1
    g = sns.catplot(
        data=eig,
        x="rank",
        y="value",
        hue="operator",
        col="phase",
        kind="point",
        palette=[PALETTE[k] for k in OPERATOR_LABELS],
        hue_order=list(OPERATOR_LABELS.values()),
        height=3.8,
        aspect=1.2,
        markers="o",
        linestyles="-",
    )
    g.set(yscale="log")
    g.set_axis_labels("rank i (1 = largest)", "eigenvalue λ_i")
    g.set_titles("top eigenvalues, {col_name}")
    g.savefig(path, dpi=130)
    plt.close(g.figure)


def plot_overlaps(table: pd.DataFrame, path: Path) -> None:
    ov = table[table.metric == "eigenspace_overlap"]
    phases = list(dict.fromkeys(ov.phase))
    fig, axes = plt.subplots(1, len(phases), figsize=(4.4 * len(phases), 3.6))
    for ax, phase in zip(np.atleast_1d(axes), phases, strict=True):
        mat = ov[ov.phase == phase].pivot(index="operator", columns="other", values="value")
        order = [k for k in OPERATOR_LABELS if k in mat.index]
        mat = mat.loc[order, order]
        sns.heatmap(mat, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", ax=ax, cbar=False)
        ax.set_title(f"top-k eigenspace overlap, {phase}")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    data = load_digits(split_seed=0)
    X = data.train_inputs.to(device=device, dtype=dtype)
    y = data.train_targets.to(device)
    model = build_model(
        "cnn",
        activation=args.activation,
        in_shape=data.in_shape,
        width=args.width,
        depth=args.depth,
    ).to(device=device, dtype=dtype)
    model.eval()
    curvature_data = (X[: args.curvature_examples], y[: args.curvature_examples])
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"CNN ({args.activation}, width {args.width}, depth {args.depth}): P = {num_params:,}; "
        f"curvature on N = {args.curvature_examples} digits, {args.dtype}"
    )

    tables, all_details, losses = [], {}, {}
    for phase in progress_bar(["init", "trained"], desc="phases", unit="phase"):
        if phase == "trained":
            model.train()
            final = sgd(model, X, y, args)
            model.eval()
            print(f"SGD: {args.sgd_steps} steps at lr {args.lr}, training loss {final:.4f}")
        ops = make_operators(model, curvature_data)
        table, details = compare_operators(
            ops,
            k=args.k,
            direction="gradient",
            num_probes=args.probes,
            seed=args.seed,
            slq_probes=args.slq_probes,
            slq_steps=args.slq_steps,
            return_details=True,
        )
        table.insert(0, "phase", phase)
        tables.append(table)
        all_details[phase] = details
        losses[phase] = ops["H"].loss().item()

    # One axis for both phases so that the panels are comparable: linear below c = 1e-3 of the
    # largest |λ| (rounded down to a power of ten), smoothing σ_u = 0.05 decades above.
    lam_max = max(
        sd.nodes.abs().max().item() for d in all_details.values() for sd in d["density"].values()
    )
    c = 10 ** math.floor(math.log10(1e-3 * lam_max))
    sigma_u = 0.05
    dens = pd.concat(
        [density_table(d, phase, c, sigma_u, 3 * lam_max) for phase, d in all_details.items()],
        ignore_index=True,
    )
    table = pd.concat(tables, ignore_index=True)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    dens.to_csv(out / "densities.csv", index=False)
    plot_densities(dens, c, sigma_u, out / "densities.png")
    plot_top_eigenvalues(table, out / "top_eigenvalues.png")
    plot_overlaps(table, out / "overlaps.png")

    # A short printed summary: the table in wide form.
    wide = table[table.metric == "eigenvalue"].pivot_table(
        index=["phase", "index"], columns="operator", values="value"
    )
    print("\ntop eigenvalues (rank 0 = largest):")
    print(wide.groupby(level="phase").head(3).to_string(float_format=lambda v: f"{v:.4g}"))
    scalars = table[table.metric.isin(["rayleigh_quotient", "negative_mass", "trace"])]
    print("\nRayleigh quotients along G, traces and negative spectral mass:")
    print(
        scalars.pivot_table(
            index=["phase", "metric"], columns="operator", values="value"
        ).to_string(float_format=lambda v: f"{v:.4g}")
    )
    for phase, loss in losses.items():
        print(f"{phase}: risk on the curvature subset {loss:.4f}")
    print(f"\nwrote {out / 'comparison.csv'}, {out / 'densities.csv'},")
    print(f"      {out / 'densities.png'}, {out / 'top_eigenvalues.png'}, {out / 'overlaps.png'}")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
