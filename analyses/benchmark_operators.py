"""Benchmark curvature products against one gradient on the same batch (issue: operators).

For each model the unit is the time of one gradient (forward + backward of the loss) on the
batch; every other row is a ratio to it, all measured in one run:

* ``new op + 1 product``: build an operator on the batch and do one product (nothing cached);
* ``amortized product``: the fastest of ``--products`` products on one operator;
* ``matmat(16) / column``: a 16-column ``matmat`` divided by 16.

When ``curvlinops-for-pytorch`` is importable, the same rows are measured for its GGN, Hessian
and empirical-Fisher operators (``check_deterministic=False``, so its construction does not run
its own extra probes).

Every time is the minimum over repeats (after a warm-up), so load from other processes on a shared
machine inflates it least. Run: ``python analyses/benchmark_operators.py --threads 1`` (add
``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from hessian_lab import EmpiricalFisherOperator, GGNOperator, HessianOperator


def mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    model = nn.Sequential(
        nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )
    return model, (torch.randn(512, 784), torch.randint(0, 10, (512,)))


def cnn() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 14 * 14, 10),
    )
    return model, (torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)  # the least-disturbed run: other processes only ever add time


def ours(kind: str) -> Callable:
    cls = {"H": HessianOperator, "Q": GGNOperator, "GN": EmpiricalFisherOperator}[kind]
    return lambda model, loss, batch: cls(model, loss, batch)


def peer(kind: str) -> Callable | None:
    try:
        import curvlinops
    except ImportError:
        return None
    cls = {
        "H": curvlinops.HessianLinearOperator,
        "Q": curvlinops.GGNLinearOperator,
        "GN": curvlinops.EFLinearOperator,
    }[kind]
    return lambda model, loss, batch: cls(
        model, loss, [p for p in model.parameters()], [batch], check_deterministic=False
    )


def benchmark(name: str, model: nn.Module, batch, device: torch.device, args) -> list[dict]:
    model = model.to(device)
    batch = tuple(t.to(device) for t in batch)
    loss = nn.CrossEntropyLoss()
    params = [p for p in model.parameters()]
    P = sum(p.numel() for p in params)

    def gradient() -> None:
        torch.autograd.grad(loss(model(batch[0]), batch[1]), params)

    unit = best_time(gradient, device, args.repeats)
    v = torch.randn(P, device=device)
    V = torch.randn(P, 16, device=device)
    rows = [
        {"model": name, "P": P, "library": "-", "op": "gradient", "row": "unit (s)", "value": unit}
    ]
    for library, factory in (("hessian_lab", ours), ("curvlinops", peer)):
        for kind in ("H", "Q", "GN"):
            make = factory(kind)
            if make is None:
                continue
            first = best_time(lambda make=make: make(model, loss, batch) @ v, device, args.repeats)
            op = make(model, loss, batch)
            op @ v  # fills any cache
            amortized = best_time(lambda op=op: op @ v, device, args.products)
            per_col = best_time(lambda op=op: op @ V, device, max(3, args.repeats // 2)) / 16
            for row, value in (
                ("new op + 1 product", first),
                ("amortized product", amortized),
                ("matmat(16) / column", per_col),
            ):
                rows.append(
                    {
                        "model": name,
                        "P": P,
                        "library": library,
                        "op": kind,
                        "row": row,
                        "value": value / unit,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per row")
    parser.add_argument("--products", type=int, default=50, help="products on one operator")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    rows = []
    for name, build in (("MLP 784-256-256-10 tanh, N=512", mlp), ("CNN 3x32x32, N=128", cnn)):
        model, batch = build()
        rows += benchmark(name, model, batch, device, args)

    # One Markdown table per model: rows x (library, op), ratios to one gradient.
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        unit = mine[0]
        print(f"\n### {name} (P={unit['P']}); one gradient = {unit['value'] * 1e3:.2f} ms\n")
        cols = [(r["library"], r["op"]) for r in mine[1:] if r["row"] == "amortized product"]
        print("| ratio to one gradient | " + " | ".join(f"{lib} {op}" for lib, op in cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for row in ("new op + 1 product", "amortized product", "matmat(16) / column"):
            vals = {(r["library"], r["op"]): r["value"] for r in mine if r["row"] == row}
            print(f"| {row} | " + " | ".join(f"{vals[c]:.2f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
