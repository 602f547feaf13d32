r"""Spectra of H, Q and GN along an ADLER run: a small CNN on scikit-learn's digits.

At initialization and at several checkpoints of one ADLER run (Algorithm 1 of the paper, with Q,
β = 0.99, ε = 1e-10), on a fixed subset of the training data, this script compares the exact
Hessian H, the paper's PSD approximation Q (the generalized Gauss–Newton matrix) and the paper's GN
baseline (the per-example empirical Fisher) with :func:`hessian_lab.linalg.compare_operators`:

* spectral densities by stochastic Lanczos quadrature and the top-k eigenvalues;
* top-k eigenspace overlaps :math:`\|V_A^\top V_B\|_F^2/k` and relative Frobenius distances;
* Rayleigh quotients along the gradient G of the curvature subset,
  :math:`G^\top C G / G^\top G` for C ∈ {H, Q, GN}, and the step sizes they imply,
  :math:`\eta_C = G^\top G / G^\top C G` (the minimizer of the quadratic model along −G), next to
  ADLER's own :math:`\eta_k` (its last minibatch) and the averaged rate :math:`\hat\eta_k` it
  actually applies.

The checkpoints are spaced geometrically in steps (curvature changes fastest early on).

It writes into ``--output-dir`` (default ``outputs/spectra_along_training``):

* ``spectra.csv`` — every number: the tidy table of ``compare_operators`` with ``step``,
  ``train_loss`` (risk on the curvature subset) columns, plus rows ``adler_eta`` /
  ``adler_eta_hat`` (operator ``ADLER``), and per operator ``step_size`` (:math:`\eta_C`),
  ``negative_mass_1pct`` and ``min_ritz_value``;
* ``densities.csv`` — step, operator, eigenvalue grid, symlog coordinate ``u``, density, s.e.;
* ``training.csv`` — the ADLER run, one row per step (loss, η_k, η̂_k, GᵀG, GᵀQG);
* ``densities.png`` — one panel per operator, one curve per checkpoint (symlog eigenvalue axis);
* ``top_eigenvalues.png`` — λ_1 and λ_k of each operator over training;
* ``overlaps.png`` — eigenspace overlaps and Frobenius distances between operators over training;
* ``rayleigh.png`` — the Rayleigh quotients along G and the step sizes, with ADLER's η_k and η̂_k.

Run: ``python analyses/spectra_along_training.py`` (about 1.5 minutes on 2 CPU cores);
``--help`` lists the options.
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

from hessian_lab import compare_operators  # noqa: E402
from hessian_lab.core import progress_bar  # noqa: E402
from hessian_lab.experiments.curvature_study import (  # noqa: E402
    OPERATOR_COLORS,
    OPERATOR_LABELS,
    density_table,
    digits_cnn,
    make_operators,
)
from hessian_lab.experiments.loop import (  # noqa: E402
    AtSteps,
    LoopState,
    RecordSteps,
    WorkBar,
    geometric_steps,
    run_loop,
)

PALETTE = OPERATOR_COLORS

PAIRS = [("H", "Q"), ("H", "GN"), ("Q", "GN")]

#: One checkpoint's spectral work in training steps, before it is measured (defaults, measured
#: on a 2-core CPU: a checkpoint took as long as about 1200 ADLER steps); the progress bar
#: replaces it by the measured ratio after the first checkpoint and steps.
CHECKPOINT_STEPS_GUESS = 1200.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help``)."""
    p = argparse.ArgumentParser(
        description="Spectra of H, Q (GGN) and GN (empirical Fisher) of a small CNN on digits at "
        "initialization and at checkpoints of an ADLER run: SLQ densities, top eigenvalues, "
        "eigenspace overlaps and Rayleigh quotients along the gradient, with ADLER's eta.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/spectra_along_training"),
        help="where to write the CSVs and figures",
    )
    p.add_argument("--seed", type=int, default=0, help="model, data order and probes")
    p.add_argument("--activation", default="tanh", choices=["relu", "tanh", "sigmoid"], help="CNN")
    p.add_argument("--width", type=int, default=8, help="CNN channels")
    p.add_argument("--depth", type=int, default=1, help="CNN two-convolution blocks")
    p.add_argument("--steps", type=int, default=400, help="ADLER steps in total")
    p.add_argument("--batch-size", type=int, default=64, help="ADLER batch size")
    p.add_argument(
        "--checkpoints", type=int, default=6, help="checkpoints incl. init and the end (geometric)"
    )
    p.add_argument(
        "--curvature-examples", type=int, default=128, help="training examples in the operators"
    )
    p.add_argument("--k", type=int, default=10, help="top eigenvalues per operator")
    p.add_argument("--slq-probes", type=int, default=8, help="SLQ probes per operator")
    p.add_argument("--slq-steps", type=int, default=50, help="Lanczos steps per SLQ probe")
    p.add_argument("--probes", type=int, default=20, help="Hutchinson probes (distances, traces)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="precision")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny products: 1)")
    return p.parse_args(argv)


def analyse_checkpoint(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    step: int,
    last: dict[str, float],
    args: argparse.Namespace,
) -> tuple[pd.DataFrame, dict]:
    r"""``compare_operators`` on H, Q, GN at the current parameters, with the step sizes added.

    Extra rows, per operator: ``negative_mass_1pct`` (SLQ weight below
    :math:`-0.01\,|\lambda|_{\max}`: large negative curvature only), ``min_ritz_value`` (the
    most negative SLQ node, ≈ λ_min), ``step_size`` :math:`\eta_C = G^\top G / G^\top C G` (NaN
    when :math:`G^\top C G \le 0`, which H allows); and ADLER's ``adler_eta`` (:math:`\eta_k` of
    its last minibatch) and ``adler_eta_hat`` (:math:`\hat\eta_k`), both NaN at step 0.
    """
    ops = make_operators(model, data)
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
    extra = []
    rq = table[table.metric == "rayleigh_quotient"].set_index("operator").value
    for name, value in rq.items():
        eta = 1.0 / value if value > 0 else math.nan
        extra.append({"metric": "step_size", "operator": name, "value": eta})
    for name, sd in details["density"].items():
        # The SLQ negative_mass counts a bulk of tiny eigenvalues of both signs (|λ| ~ 1e-3 λ_max
        # after training) as much as large negative curvature; these two separate the cases.
        lam_max = sd.spectral_norm_estimate
        mass, se = sd.negative_mass(threshold=0.01 * lam_max)
        extra.append(
            {"metric": "negative_mass_1pct", "operator": name, "value": mass, "standard_error": se}
        )
        extra.append({"metric": "min_ritz_value", "operator": name, "value": sd.nodes.min().item()})
    for key in ("eta", "eta_hat"):
        extra.append(
            {"metric": f"adler_{key}", "operator": "ADLER", "value": last.get(key, math.nan)}
        )
    table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    table.insert(0, "train_loss", ops["H"].loss().item())
    table.insert(0, "step", step)
    return table, details


def _step_axis(ax: plt.Axes, steps: list[int]) -> None:
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max(steps) * 1.3)
    ax.set_xlabel("ADLER step (symlog axis)")


def plot_densities(dens: pd.DataFrame, c: float, sigma_u: float, path: Path) -> None:
    """One panel per operator; curves coloured by checkpoint (early: light, late: dark)."""
    steps = sorted(dens.step.unique())
    colors = dict(zip(steps, sns.color_palette("viridis_r", len(steps)), strict=True))
    names = list(OPERATOR_LABELS)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.0), sharey=True)
    peak = dens.density.max()
    for ax, name in zip(axes, names, strict=True):
        for step in steps:
            part = dens[(dens.operator == name) & (dens.step == step)]
            ax.plot(part.eigenvalue, part.density, color=colors[step], lw=1.3, label=f"step {step}")
        ax.set_xscale("symlog", linthresh=c)
        ax.set_yscale("log")
        ax.set_ylim(peak * 1e-4, peak * 3)
        ax.axvline(0, color="0.5", lw=0.6)
        ax.set_title(f"SLQ density of {OPERATOR_LABELS[name]}")
        ax.set_xlabel(f"eigenvalue λ (symlog, linear for |λ| < {c:.0e})")
    axes[0].set_ylabel(f"density per decade (σ = {sigma_u} decades)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_top_eigenvalues(table: pd.DataFrame, k: int, path: Path) -> None:
    """λ_1 (solid) and λ_k (dashed) of each operator against the step."""
    eig = table[(table.metric == "eigenvalue") & table["index"].isin([0, k - 1])].copy()
    eig["rank"] = np.where(eig["index"] == 0, "λ_1", f"λ_{k}")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sns.lineplot(
        data=eig,
        x="step",
        y="value",
        hue="operator",
        style="rank",
        palette=PALETTE,
        hue_order=list(OPERATOR_LABELS),
        markers=True,
        ax=ax,
    )
    ax.set_yscale("log")
    _step_axis(ax, list(eig.step))
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"top eigenvalues along ADLER (λ_1 and λ_{k})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_overlaps(table: pd.DataFrame, k: int, path: Path) -> None:
    """Top-k eigenspace overlaps and relative Frobenius distances for each pair, over steps."""
    rows = []
    for a, b in PAIRS:
        for metric in ("eigenspace_overlap", "relative_frobenius_distance"):
            sel = table[(table.metric == metric) & (table.operator == a) & (table.other == b)]
            for _, r in sel.iterrows():
                rows.append({"step": r.step, "pair": f"{a} vs {b}", "metric": metric, "v": r.value})
    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    for ax, metric, ylabel in zip(
        axes,
        ("eigenspace_overlap", "relative_frobenius_distance"),
        (f"top-{k} eigenspace overlap ‖V_Aᵀ V_B‖²_F / k", "‖A − B‖_F / ‖A‖_F (Hutchinson)"),
        strict=True,
    ):
        sns.lineplot(data=df[df.metric == metric], x="step", y="v", hue="pair", marker="o", ax=ax)
        _step_axis(ax, list(df.step))
        ax.set_ylabel(ylabel)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("eigenspace agreement")
    axes[1].set_title("relative Frobenius distance from the first operator")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rayleigh(table: pd.DataFrame, path: Path) -> None:
    """Left: GᵀCG/GᵀG per operator. Right: η_C = GᵀG/GᵀCG with ADLER's η_k and η̂_k."""
    rq = table[table.metric == "rayleigh_quotient"]
    eta = table[table.metric.isin(["step_size", "adler_eta", "adler_eta_hat"])].copy()
    eta["label"] = np.select(
        [eta.metric == "adler_eta", eta.metric == "adler_eta_hat"],
        ["ADLER η_k (last batch)", "ADLER η̂_k (applied)"],
        default="η_" + eta.operator,
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    sns.lineplot(
        data=rq,
        x="step",
        y="value",
        hue="operator",
        palette=PALETTE,
        hue_order=list(OPERATOR_LABELS),
        marker="o",
        ax=axes[0],
    )
    if (rq.value > 0).all():
        axes[0].set_yscale("log")
    else:  # GᵀHG can be negative: keep the sign visible
        axes[0].set_yscale("symlog", linthresh=1e-2)
        axes[0].axhline(0, color="0.5", lw=0.6)
    axes[0].set_ylabel("GᵀCG / GᵀG (G: gradient on the curvature subset)")
    axes[0].set_title("Rayleigh quotients along the gradient")
    palette = {f"η_{k}": v for k, v in PALETTE.items()}
    palette |= {"ADLER η_k (last batch)": "0.55", "ADLER η̂_k (applied)": "black"}
    sns.lineplot(
        data=eta.dropna(subset=["value"]),
        x="step",
        y="value",
        hue="label",
        palette=palette,
        marker="o",
        ax=axes[1],
    )
    axes[1].set_yscale("log")
    axes[1].set_ylabel("step size η")
    axes[1].set_title("η_C = GᵀG / GᵀCG vs ADLER's rates")
    for ax in axes:
        _step_axis(ax, list(rq.step))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run the ADLER training, analyse the checkpoints, write CSVs and figures, print a summary."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = digits_cnn(args)
    curvature_data = (
        setup.train_x[: args.curvature_examples],
        setup.train_y[: args.curvature_examples],
    )
    at = geometric_steps(args.steps, args.checkpoints)
    print(
        f"CNN ({args.activation}, width {args.width}, depth {args.depth}): P = "
        f"{setup.num_params:,}; curvature on N = {args.curvature_examples} training digits, "
        f"{args.dtype}; ADLER {args.steps} steps of batch {args.batch_size}; checkpoints at {at}"
    )

    tables, details = [], {}
    # One bar over all the work: ADLER steps and the checkpoints' spectral analyses, each
    # checkpoint weighted by its measured cost in steps (so the total and the time left are
    # right on any machine; a bar over steps alone stalls at every checkpoint).
    bar = progress_bar(total=args.steps, desc="ADLER steps + checkpoints", unit="step")
    work = WorkBar(bar, args.steps, len(at), CHECKPOINT_STEPS_GUESS)

    def on_snapshot(state: LoopState) -> None:
        with work.task():
            table, det = analyse_checkpoint(
                setup.model, curvature_data, state.step, state.last, args
            )
        tables.append(table)
        details[state.step] = det

    record = RecordSteps()
    # Minibatches without replacement, epoch by epoch (an epoch's incomplete last batch is
    # skipped), from a generator seeded with seed + 1.
    run_loop(
        setup.model,
        setup.optimizer,
        setup.train_x,
        setup.train_y,
        batch_size=args.batch_size,
        order=torch.Generator().manual_seed(args.seed + 1),
        max_steps=args.steps,
        drop_last=True,
        callbacks=[record, AtSteps(at, on_snapshot), work],
    )
    bar.close()
    log = pd.DataFrame(record.rows)
    table = pd.concat(tables, ignore_index=True)

    # One symlog axis for all checkpoints (as in compare_spectra.py): linear below c = 1e-3 of the
    # largest |λ| (rounded down to a power of ten), smoothing σ_u = 0.05 decades above.
    lam_max = max(
        sd.nodes.abs().max().item() for d in details.values() for sd in d["density"].values()
    )
    c = 10 ** math.floor(math.log10(1e-3 * lam_max))
    sigma_u = 0.05
    dens = pd.concat(
        [density_table(d, s, c, sigma_u, 3 * lam_max) for s, d in details.items()],
        ignore_index=True,
    ).rename(columns={"phase": "step"})

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "spectra.csv": lambda p: table.to_csv(p, index=False),
        "densities.csv": lambda p: dens.to_csv(p, index=False),
        "training.csv": lambda p: log.to_csv(p, index=False),
        "densities.png": lambda p: plot_densities(dens, c, sigma_u, p),
        "top_eigenvalues.png": lambda p: plot_top_eigenvalues(table, args.k, p),
        "overlaps.png": lambda p: plot_overlaps(table, args.k, p),
        "rayleigh.png": lambda p: plot_rayleigh(table, p),
    }
    for name, write in files.items():
        write(out / name)

    shown = [
        "rayleigh_quotient",
        "step_size",
        "negative_mass",
        "negative_mass_1pct",
        "min_ritz_value",
    ]
    wide = table[table.metric.isin(shown)]
    wide = wide.pivot_table(index=["step", "metric"], columns="operator", values="value")
    print(
        "\nalong G (Rayleigh quotient, step size η_C = 1/RQ); SLQ weight below 0 and below "
        "-0.01 λ_max, most negative Ritz value:"
    )
    print(wide.to_string(float_format=lambda v: f"{v:.4g}"))
    adler = table[table.operator == "ADLER"].pivot_table(
        index="step", columns="metric", values="value"
    )
    print("\nADLER's rates at the checkpoints:")
    print(adler.to_string(float_format=lambda v: f"{v:.4g}"))
    ov = table[table.metric == "eigenspace_overlap"]
    ov = ov[[(a, b) in PAIRS for a, b in zip(ov.operator, ov.other, strict=True)]]
    print(f"\ntop-{args.k} eigenspace overlaps:")
    print(
        ov.assign(pair=ov.operator + "-" + ov.other)
        .pivot_table(index="step", columns="pair", values="value")
        .to_string(float_format=lambda v: f"{v:.3f}")
    )
    print("\nwrote:")
    for name in files:
        print(f"  {out / name}")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
