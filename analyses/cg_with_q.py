r"""Conjugate gradients with Q, GN and H, and Hessian-free training with Q against ADLER, on digits.

The paper's conclusion proposes plugging its PSD approximation Q (the generalized Gauss–Newton
matrix) into conjugate-gradient methods. This script does both halves of that on a small CNN on
scikit-learn's digits, through :func:`hessian_lab.cg`:

**1. Damped Newton systems along an ADLER run.** At initialization, halfway and at the end of an
ADLER run (Algorithm 1: Q, β = 0.99, ε = 1e-10), on a fixed subset of the training data with risk
h and gradient G, it solves for each curvature C ∈ {Q, GN, H} and each damping λ

.. math::  (C + \lambda I)\, x = -G, \qquad \text{i.e. it minimizes}\qquad
           \varphi(x) = \tfrac12 x^\top (C + \lambda I) x + G^\top x,

and records per CG iteration the relative residual :math:`\|r_i\| / \|G\|` and the model value
:math:`\varphi(x_i)`. For positive definite :math:`C + \lambda I` (Q, GN and λ > 0) CG minimizes
φ over growing Krylov spaces, so :math:`\varphi(x_i)` never increases; the residual norm may. The
exact Hessian is indefinite: when CG meets a direction with :math:`p^\top (H + \lambda I) p \le 0`
it stops there (Steihaug truncation) and the event, its iteration and its curvature are reported.
For every solve the actual change of the risk, :math:`h(\theta + x) - h(\theta)`, is measured too.

**2. Hessian-free training (Newton-CG with Q)** against ADLER, same model initialization, same
minibatches, same number of steps (``--adler-steps`` lets ADLER run longer, e.g. for as long in
wall time). Each Hessian-free step on a minibatch I (Martens 2010):

* CG on :math:`(Q_I + \lambda I)\, x = -G_I`, at most ``--cg-iters`` iterations, warm-started from
  ``--warm-start`` × the previous solution (Martens' 0.95), stopping rule ``"martens"``;
* reduction ratio :math:`\rho = (h_I(\theta + x) - h_I(\theta)) / m(x)` with the *undamped* model
  :math:`m(x) = G_I^\top x + \tfrac12 x^\top Q_I x = \varphi(x) - \tfrac12\lambda\|x\|^2`;
* Levenberg–Marquardt adjustment: :math:`\lambda \leftarrow \tfrac32\lambda` if ρ < 1/4,
  :math:`\lambda \leftarrow \tfrac23\lambda` if ρ > 3/4, kept in ``[--min-damping, 1e4]``
  (``--fixed-damping`` turns this off). The floor matters: on a 128-example minibatch ρ is
  usually good, so λ keeps shrinking, and with a floor of 1e-6 the nearly undamped Newton steps
  overfit their minibatch (the full training loss jumped from 0.006 to 0.18 and back, twice, in
  300 steps; docs/analyses.md). 1e-2, about 1% of Q's top eigenvalue here, keeps it stable;
* the step :math:`\theta \leftarrow \theta + x` is taken only if it lowers the minibatch loss
  (ρ > 0); otherwise it is rejected (and the warm start is reset).

A Hessian-free step costs one forward + backward, up to ``--cg-iters`` (+1 with a warm start)
Q-products (a JVP and a VJP each) and one forward for ρ; an ADLER step costs one forward + backward
and one JVP. The comparison is therefore shown against steps and against wall time (optimizer time
only; evaluations excluded).

It writes into ``--output-dir`` (default ``outputs/cg_with_q``):

* ``cg_iterations.csv`` — point, damping, operator, iteration, residual, relative residual, φ;
* ``cg_solves.csv`` — one row per solve: iterations, stop reason, negative curvature and its
  curvature, final relative residual, φ, undamped model, actual change of the risk;
* ``cg_convergence.png`` — residuals and model decrease −φ per iteration, rows: training points;
* ``training.csv`` — both runs, one row per step (loss, time, damping, ρ, CG iterations, and the
  full-split train/test loss and accuracy every ``--eval-every`` steps);
* ``hf_vs_adler.png`` — training loss and test accuracy against steps and wall time.

Run: ``python analyses/cg_with_q.py`` (about 2-2.5 minutes on 2 CPU cores); ``--help`` lists the
options.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from hessian_lab import GGNOperator, cg  # noqa: E402
from hessian_lab.core import progress_bar  # noqa: E402
from hessian_lab.experiments.curvature_study import (  # noqa: E402
    OPERATOR_COLORS,
    OPERATOR_LABELS,
    digits_cnn,
    make_operators,
)
from hessian_lab.experiments.loop import (  # noqa: E402
    AtSteps,
    LoopState,
    ProgressCallback,
    RecordSteps,
    WorkBar,
    run_loop,
)
from hessian_lab.experiments.training import RunSetup  # noqa: E402

PALETTE = OPERATOR_COLORS

#: One CG study point (3 operators x the dampings) in ADLER steps before it is measured (the
#: defaults on a 2-core CPU: about 140); the bar then uses the measured ratio.
CG_STUDY_STEPS_GUESS = 150.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help``)."""
    p = argparse.ArgumentParser(
        description="Damped Newton systems (C + lambda I) x = -G solved by CG with Q, GN and H at "
        "init / mid / end of an ADLER run on digits, and Hessian-free training (Newton-CG with "
        "Q, Levenberg-Marquardt damping) against ADLER.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--output-dir", type=Path, default=Path("outputs/cg_with_q"), help="where to write"
    )
    p.add_argument("--seed", type=int, default=0, help="model, data order")
    p.add_argument("--activation", default="tanh", choices=["relu", "tanh", "sigmoid"], help="CNN")
    p.add_argument("--width", type=int, default=8, help="CNN channels")
    p.add_argument("--depth", type=int, default=1, help="CNN two-convolution blocks")
    p.add_argument(
        "--steps",
        type=int,
        default=300,
        help="Hessian-free steps (and ADLER's, unless --adler-steps)",
    )
    p.add_argument(
        "--adler-steps",
        type=int,
        default=None,
        help="ADLER steps if not --steps (>= --steps; e.g. 4500 to match the HF run's wall time)",
    )
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size of both optimizers")
    p.add_argument("--eval-every", type=int, default=20, help="full-split evaluation period")
    p.add_argument(
        "--curvature-examples", type=int, default=256, help="training examples in the CG study"
    )
    p.add_argument(
        "--dampings",
        type=float,
        nargs="+",
        default=[1e-3, 1e-1],
        help="damping values lambda of the CG study",
    )
    p.add_argument("--solve-iters", type=int, default=60, help="CG iteration limit, CG study")
    p.add_argument("--solve-tol", type=float, default=1e-6, help="relative residual, CG study")
    p.add_argument("--cg-iters", type=int, default=10, help="CG iterations per Hessian-free step")
    p.add_argument("--damping", type=float, default=1.0, help="initial Hessian-free damping")
    p.add_argument("--fixed-damping", action="store_true", help="no Levenberg-Marquardt adjustment")
    p.add_argument("--min-damping", type=float, default=1e-2, help="floor of the adjusted damping")
    p.add_argument(
        "--warm-start", type=float, default=0.95, help="CG starts from this x previous solution"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="precision")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny products: 1)")
    args = p.parse_args(argv)
    if args.adler_steps is None:
        args.adler_steps = args.steps
    if args.steps < 2 or args.adler_steps < args.steps:
        p.error("need --steps >= 2 and --adler-steps >= --steps")
    return args


@torch.no_grad()
def loss_after_step(model: nn.Module, op: GGNOperator, x: torch.Tensor, data) -> float:
    """Mean cross-entropy on ``data`` at θ + x.

    Through ``torch.func.functional_call`` with new tensors: the parameters are not touched in
    place, so the operators' cached graphs at θ stay valid.
    """
    params = dict(model.named_parameters())
    moved = {name: params[name] + d for name, d in op.vector_to_params(x).items()}
    out = torch.func.functional_call(model, moved, (data[0],))
    return nn.functional.cross_entropy(out, data[1]).item()


def solve_study(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], point: str, args: argparse.Namespace
) -> tuple[list[dict], list[dict]]:
    r"""CG on :math:`(C + \lambda I) x = -G` for C ∈ {Q, GN, H} and every damping, at θ now."""
    ops = make_operators(model, data)
    G = ops["Q"].gradient()
    risk = ops["Q"].loss().item()
    g_norm = torch.linalg.vector_norm(G).item()
    iters, solves = [], []
    for lam in args.dampings:
        for name in ("Q", "GN", "H"):
            x, info = cg(ops[name], -G, damping=lam, tol=args.solve_tol, maxiter=args.solve_iters)
            res = info.residual_norms.tolist()
            phi = info.quadratic_model.tolist()
            for i, (r, f) in enumerate(zip(res, phi, strict=True)):
                iters.append(
                    {
                        "point": point,
                        "damping": lam,
                        "operator": name,
                        "iteration": i,
                        "residual": r,
                        "relative_residual": r / g_norm,
                        "quadratic_model": f,
                    }
                )
            xsq = torch.dot(x, x).item()
            solves.append(
                {
                    "point": point,
                    "damping": lam,
                    "operator": name,
                    "risk": risk,
                    "grad_norm": g_norm,
                    "iterations": info.iterations,
                    "stop_reason": info.stop_reason,
                    "negative_curvature": info.negative_curvature,
                    "curvature": info.curvature,
                    "relative_residual": res[-1] / g_norm,
                    "quadratic_model": phi[-1],
                    "undamped_model": phi[-1] - 0.5 * lam * xsq,
                    "step_norm": math.sqrt(xsq),
                    "risk_change": loss_after_step(model, ops["Q"], x, data) - risk,
                }
            )
    return iters, solves


class HessianFreeStep:
    r"""One Newton-CG step with Q per minibatch (Martens-style damping, module docstring).

    A stepper of :func:`hessian_lab.experiments.loop.run_loop`: ``step(inputs, targets)`` returns
    the minibatch loss before the step, the damping λ used, ρ, whether the step was accepted, the
    CG iterations and the step's norm.
    """

    def __init__(self, model: nn.Module, args: argparse.Namespace) -> None:
        self.model, self.args = model, args
        self.loss_fn = nn.CrossEntropyLoss()
        self.lam, self.prev = args.damping, None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Solve, test, accept or reject, adjust the damping."""
        args, lam, batch = self.args, self.lam, (inputs, targets)
        Q = GGNOperator(self.model, self.loss_fn, batch)
        G = Q.gradient()
        loss0 = Q.loss().item()
        prev = self.prev
        x0 = args.warm_start * prev if (prev is not None and args.warm_start > 0) else None
        x, info = cg(Q, -G, damping=lam, x0=x0, maxiter=args.cg_iters, stopping="martens")
        model_change = info.quadratic_model[-1].item() - 0.5 * lam * torch.dot(x, x).item()
        loss1 = loss_after_step(self.model, Q, x, batch)
        rho = (loss1 - loss0) / model_change if model_change < 0 else -math.inf
        accepted = loss1 < loss0 and math.isfinite(loss1)
        if accepted:
            with torch.no_grad():
                params = dict(self.model.named_parameters())
                for name, d in Q.vector_to_params(x).items():
                    params[name].add_(d)
            self.prev = x
        else:
            self.prev = None
        if not args.fixed_damping:
            if rho < 0.25:
                self.lam = min(lam * 1.5, 1e4)
            elif rho > 0.75:
                self.lam = max(lam * 2 / 3, args.min_damping)
        values = {
            "loss": loss0,
            "damping": lam,
            "rho": rho,
            "accepted": float(accepted),
            "cg_iterations": float(info.iterations),
            "step_norm": torch.linalg.vector_norm(x).item() if accepted else 0.0,
        }
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}


def hessian_free_run(setup: RunSetup, args: argparse.Namespace) -> pd.DataFrame:
    r"""Newton-CG with Q from ``setup.model``'s current parameters; one row per step.

    Same minibatch sequence as the ADLER run with the same seed (a generator seeded with
    ``seed + 1``, epochs without replacement, an epoch's incomplete last batch skipped), through
    the same loop.
    """
    record = RecordSteps(setup.evaluate, args.eval_every).expect(args.steps)
    bar = progress_bar(total=args.steps, desc="Hessian-free", unit="step")
    run_loop(
        setup.model,
        HessianFreeStep(setup.model, args),
        setup.train_x,
        setup.train_y,
        batch_size=args.batch_size,
        order=torch.Generator().manual_seed(args.seed + 1),
        max_steps=args.steps,
        drop_last=True,
        callbacks=[record, ProgressCallback(bar)],
    )
    bar.close()
    log = pd.DataFrame(record.rows)
    log["accepted"] = log["accepted"].astype("boolean")
    log["cg_iterations"] = log["cg_iterations"].astype("Int64")
    return log


def plot_convergence(iters: pd.DataFrame, solves: pd.DataFrame, path: Path) -> None:
    """Rows: training points; left: ‖r_i‖/‖G‖; right: −φ(x_i); colour: operator; style: damping."""
    points = list(dict.fromkeys(iters.point))
    df = iters.assign(
        damping=iters.damping.map(lambda v: f"λ = {v:g}"), decrease=-iters.quadratic_model
    )
    fig, axes = plt.subplots(len(points), 2, figsize=(11, 3.3 * len(points)), squeeze=False)
    for row, point in zip(axes, points, strict=True):
        sub = df[df.point == point]
        for ax, col, ylabel in (
            (row[0], "relative_residual", "‖r_i‖ / ‖G‖"),
            (row[1], "decrease", "model decrease −φ(x_i)"),
        ):
            sns.lineplot(
                data=sub[sub[col] > 0],
                x="iteration",
                y=col,
                hue="operator",
                style="damping",
                palette=PALETTE,
                hue_order=list(OPERATOR_LABELS),
                ax=ax,
                legend=ax is axes[0][0],
            )
            ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{point}: {ylabel}")
        # Mark where CG met negative curvature with H.
        neg = solves[(solves.point == point) & solves.negative_curvature.astype(bool)]
        for _, s in neg.iterrows():
            same = (sub.operator == s.operator) & (sub.damping == f"λ = {s.damping:g}")
            last = sub[same].iloc[-1]
            row[0].plot(last.iteration, last.relative_residual, "kx", ms=9, mew=2)
            if last.decrease > 0:
                row[1].plot(last.iteration, last.decrease, "kx", ms=9, mew=2)
    axes[0][0].text(
        0.98, 0.96, "× : negative curvature, CG stopped", transform=axes[0][0].transAxes,
        ha="right", va="top", fontsize=8,
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(log: pd.DataFrame, path: Path) -> None:
    """Training loss (log) and test accuracy against steps and against optimizer wall time."""
    ev = log.dropna(subset=["train_loss"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for col, x, xlabel in ((0, "step", "step"), (1, "time_s", "optimizer wall time (s)")):
        rows = ((0, "train_loss", "training loss (full split)"), (1, "test_acc", "test accuracy"))
        for r, y, ylabel in rows:
            ax = axes[r][col]
            sns.lineplot(data=ev, x=x, y=y, hue="optimizer", marker="o", ms=4, ax=ax)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if y == "train_loss":
                ax.set_yscale("log")
    axes[0][0].set_title("Hessian-free (Newton-CG with Q) vs ADLER, per step")
    axes[0][1].set_title("... per second of optimizer time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run the CG study along ADLER, the Hessian-free run, write CSVs and figures, summarize."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = digits_cnn(args)
    init_state = {k: v.clone() for k, v in setup.model.state_dict().items()}
    data = (setup.train_x[: args.curvature_examples], setup.train_y[: args.curvature_examples])
    points = {0: "init", args.steps // 2: f"mid (step {args.steps // 2})"}
    points[args.steps] = f"end (step {args.steps})"
    print(
        f"CNN ({args.activation}, width {args.width}, depth {args.depth}): P = "
        f"{setup.num_params:,}; CG study on N = {args.curvature_examples} training digits at "
        f"steps {list(points)}, dampings {args.dampings}; ADLER {args.adler_steps} and "
        f"Hessian-free {args.steps} steps of batch {args.batch_size}; {args.dtype}"
    )

    iters, solves = [], []
    # Phase 1: ADLER with the CG study at three points, one bar over both kinds of work (each
    # study point weighted by its measured cost in ADLER steps). Phase 2: its own bar.
    bar = progress_bar(total=args.adler_steps, desc="ADLER + CG study", unit="step")
    work = WorkBar(bar, args.adler_steps, len(points), CG_STUDY_STEPS_GUESS)

    def on_snapshot(state: LoopState) -> None:
        with work.task():
            it, so = solve_study(setup.model, data, points[state.step], args)
        iters.extend(it)
        solves.extend(so)

    record = RecordSteps(setup.evaluate, args.eval_every).expect(args.adler_steps)
    run_loop(
        setup.model,
        setup.optimizer,
        setup.train_x,
        setup.train_y,
        batch_size=args.batch_size,
        order=torch.Generator().manual_seed(args.seed + 1),
        max_steps=args.adler_steps,
        drop_last=True,
        callbacks=[record, AtSteps(points, on_snapshot), work],
    )
    bar.close()
    adler = pd.DataFrame(record.rows)
    setup.model.load_state_dict(init_state)
    hf = hessian_free_run(setup, args)
    log = pd.concat(
        [adler.assign(optimizer="ADLER"), hf.assign(optimizer="Hessian-free (Q)")],
        ignore_index=True,
    )
    iters_df, solves_df = pd.DataFrame(iters), pd.DataFrame(solves)

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "cg_iterations.csv": lambda p: iters_df.to_csv(p, index=False),
        "cg_solves.csv": lambda p: solves_df.to_csv(p, index=False),
        "cg_convergence.png": lambda p: plot_convergence(iters_df, solves_df, p),
        "training.csv": lambda p: log.to_csv(p, index=False),
        "hf_vs_adler.png": lambda p: plot_training(log, p),
    }
    for name, write in files.items():
        write(out / name)

    cols = ["point", "damping", "operator", "iterations", "stop_reason", "curvature",
            "relative_residual", "undamped_model", "risk_change"]  # fmt: skip
    print("\nCG solves of (C + λI) x = −G (undamped_model: Gᵀx + ½xᵀCx; risk_change: actual):")
    print(solves_df[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    neg = solves_df[solves_df.negative_curvature.astype(bool)]
    print(
        f"\nnegative-curvature events: {len(neg)} of {len(solves_df)} solves "
        f"({', '.join(f'{o}: {int(c)}' for o, c in neg.groupby('operator').size().items()) or '-'})"
    )
    summary = []
    for name, part in log.groupby("optimizer", sort=False):
        final = part.dropna(subset=["train_loss"]).iloc[-1]
        summary.append(
            {
                "optimizer": name,
                "steps": int(final.step),
                "time_s": final.time_s,
                "ms_per_step": 1e3 * final.time_s / max(final.step, 1),
                "train_loss": final.train_loss,
                "train_acc": final.train_acc,
                "test_acc": final.test_acc,
            }
        )
    print("\nafter training (full splits):")
    print(pd.DataFrame(summary).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    acc = hf.dropna(subset=["rho"])
    print(
        f"Hessian-free: {int(acc.accepted.sum())}/{len(acc)} steps accepted, damping "
        f"{acc.damping.iloc[0]:.3g} -> {acc.damping.iloc[-1]:.3g}, mean CG iterations "
        f"{acc.cg_iterations.mean():.1f}"
    )
    print("\nwrote:")
    for name in files:
        print(f"  {out / name}")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
