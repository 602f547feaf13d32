"""Top eigenvalues and spectral density of H and Q over a data set sharded across processes.

Each process holds its own shard of scikit-learn's digits (examples rank, rank + W, ...) and
builds the operators with ``process_group=torch.distributed.group.WORLD``: every product is the
whole data set's, all-reduced once, so ``eigsh`` and ``spectral_density`` return the same numbers
on every rank as one process holding all the data. Rank 0 prints them and writes a figure.

Run on CPUs (gloo) or GPUs (nccl, one GPU per process)::

    torchrun --nproc-per-node 2 analyses/distributed_spectrum.py
    torchrun --nproc-per-node 8 analyses/distributed_spectrum.py --backend nccl

The model is a small CNN trained for ``--sgd-steps`` full-batch gradient steps first, with the
global gradient of the sharded operator, so every rank holds the same θ.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hessian_lab import GGNOperator, HessianOperator, eigsh, spectral_density
from hessian_lab.experiments.datasets import load_dataset
from hessian_lab.experiments.models import build_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="gloo, nccl or auto (nccl with CUDA)")
    parser.add_argument("--examples", type=int, default=512, help="training examples in all")
    parser.add_argument("--k", type=int, default=5, help="top eigenvalues")
    parser.add_argument("--probes", type=int, default=4, help="SLQ probes")
    parser.add_argument("--steps", type=int, default=40, help="Lanczos steps per probe")
    parser.add_argument("--sgd-steps", type=int, default=50, help="full-batch GD steps first")
    parser.add_argument("--lr", type=float, default=0.02, help="their learning rate")
    parser.add_argument("--out", type=Path, default=Path("outputs/distributed_spectrum"))
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and args.backend in ("auto", "nccl")
    backend = ("nccl" if cuda else "gloo") if args.backend == "auto" else args.backend
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        data = load_dataset("digits", max_train=args.examples)
        # This rank's shard: examples rank, rank + W, rank + 2W, ...
        x = data.train_inputs[rank::world].to(device)
        y = data.train_targets[rank::world].to(device)
        torch.manual_seed(0)
        model = build_model("cnn", in_shape=tuple(x.shape[1:]), width=8, depth=1)
        model = model.to(device).eval()
        loss_fn = nn.CrossEntropyLoss()
        group = dist.group.WORLD
        for _ in range(args.sgd_steps):  # identical on every rank: the gradient is global
            G = GGNOperator(model, loss_fn, (x, y), process_group=group).gradient()
            with torch.no_grad():
                offset = 0
                for p in model.parameters():
                    p -= args.lr * G[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
        ops = {
            "H": HessianOperator(model, loss_fn, (x, y), process_group=group),
            "Q": GGNOperator(model, loss_fn, (x, y), process_group=group),
        }
        results = {}
        for name, op in ops.items():
            top = eigsh(op, k=args.k).eigenvalues.flip(0)
            density = spectral_density(op, num_probes=args.probes, num_steps=args.steps)
            results[name] = (top, density)
        if rank == 0:
            H = ops["H"]
            print(f"{world} processes ({backend}), N = {H.num_examples}, P = {H.shape[0]}")
            for name, (top, density) in results.items():
                mass, err = density.negative_mass()
                print(
                    f"{name}: top-{args.k} eigenvalues {top.cpu().numpy().round(4)}; "
                    f"negative mass {mass:.3f} ± {err:.3f}"
                )
            _figure(results, args.out)
    finally:
        dist.destroy_process_group()


def _figure(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (_, density) in results.items():
        lo = float(density.nodes.min())
        hi = float(density.nodes.max())
        grid = torch.linspace(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo), 400)
        ax.semilogy(grid, density.density(grid, sigma=0.02 * (hi - lo)) + 1e-8, label=name)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ, σ = 2% of the range)")
    ax.set_title("H and Q over a sharded data set")
    ax.legend()
    fig.tight_layout()
    path = out / "density.png"
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
