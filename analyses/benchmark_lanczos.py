"""How much of Lanczos' time is spent outside the operator products?

Runs Lanczos with full reorthogonalization (the default) for ``--steps`` steps on the GGN operator
(the paper's Q) of an MLP with about 1e5 parameters, timing every product, and prints the fraction
of the wall time spent outside the products (orthogonalization, bookkeeping). The issue's target
is at most 10% at 100 steps and P ≈ 1e5. Also reports the same run without reorthogonalization
for scale. Ratios, not absolute times, are what carries over between machines (DESIGN.md §5).

Example:
    python analyses/benchmark_lanczos.py              # P = 101,770, N = 1024, 100 steps, float32
    python analyses/benchmark_lanczos.py --model cnn --batch 64   # P = 115,210
    python analyses/benchmark_lanczos.py --device cuda --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from hessian_lab.linalg import lanczos
from hessian_lab.operators import GGNOperator


class TimedOperator:
    """Forwards ``matmat`` to an operator and accumulates the wall time spent in it."""

    def __init__(self, op: object) -> None:
        self.op, self.shape, self.dtype, self.device = op, op.shape, op.dtype, op.device
        self.seconds, self.calls = 0.0, 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Timed product ``A V``."""
        self._sync()
        start = time.perf_counter()
        out = self.op.matmat(V)
        self._sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def run(op: object, steps: int, reorthogonalize: bool) -> tuple[float, float, int]:
    """Return (total seconds, seconds in products, number of products) of one Lanczos run."""
    timed = TimedOperator(op)
    if timed.device.type == "cuda":
        torch.cuda.synchronize(timed.device)
    start = time.perf_counter()
    lanczos(timed, steps, seed=0, reorthogonalize=reorthogonalize)
    if timed.device.type == "cuda":
        torch.cuda.synchronize(timed.device)
    return time.perf_counter() - start, timed.seconds, timed.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="Lanczos steps (default 100)")
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"], help="default mlp")
    parser.add_argument("--hidden", type=int, default=128, help="hidden units of 784-h-10 MLP")
    parser.add_argument("--batch", type=int, default=1024, help="examples N in the operator")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (the best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if args.model == "mlp":
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(784, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10)
        )
        in_shape, name = (784,), f"784-{args.hidden}-10 MLP"
    else:
        # The paper's kind of model: a CNN on 32x32 RGB images (hessian_lab.experiments.models).
        from hessian_lab.experiments.models import build_model

        model = build_model("cnn", in_shape=(3, 32, 32), width=48, depth=2)
        in_shape, name = (3, 32, 32), "width-48 depth-2 CNN on 3x32x32"
    model = model.to(device=device, dtype=dtype).eval()
    X = torch.randn(args.batch, *in_shape, device=device, dtype=dtype)
    y = torch.randint(0, 10, (args.batch,), device=device)
    op = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    print(
        f"GGN (Q) of a {name}: P = {op.shape[0]:,}, N = {args.batch}, "
        f"{args.dtype} on {device}; Lanczos {args.steps} steps"
    )

    op.matmat(torch.randn(op.shape[0], 1, device=device, dtype=dtype))  # warm caches
    for reorth in (True, False):
        best = min((run(op, args.steps, reorth) for _ in range(args.repeats)), key=lambda r: r[0])
        total, in_products, calls = best
        outside = total - in_products
        label = "full reorthogonalization" if reorth else "no reorthogonalization  "
        print(
            f"{label}: total {total:.3f} s, products {in_products:.3f} s ({calls} calls, "
            f"{1e3 * in_products / calls:.1f} ms each), outside products {outside:.3f} s "
            f"= {100 * outside / total:.1f}% of the time"
        )


if __name__ == "__main__":
    main()
