"""What differentiable attention costs: math SDPA and no MHA fast path vs PyTorch's default.

Curvature needs forward-mode AD and double backward through attention, which PyTorch's fused
kernels (flash / memory-efficient SDPA, the nn.MultiheadAttention fast path) do not provide, so
hessian_lab runs attention through the math implementation inside its own computations
(``hessian_lab.core.differentiable_attention``). This script measures, interleaved in one run,
the time of the same work under both settings:

* ``sdpa fwd+bwd``: ``F.scaled_dot_product_attention`` forward + backward (causal);
* ``encoder fwd (eval)``: an eval-mode ``nn.TransformerEncoder`` forward under ``no_grad``, where
  the default takes the fused fast path;

and prints the ratio math ÷ default. Run on a GPU to see the cost there (flash attention is much
faster than math on a GPU; on a CPU the difference is small)::

    python analyses/benchmark_attention.py --threads 1
    python analyses/benchmark_attention.py --device cuda --seq 1024
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hessian_lab.core import differentiable_attention


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _interleaved(work: Callable[[], object], device: torch.device, repeats: int) -> tuple:
    """Median times of ``work`` with the default kernels and with the differentiable ones."""
    default, math = [], []
    for _ in range(2):  # warm-up of both paths
        work()
        with differentiable_attention():
            work()
    for _ in range(repeats):
        default.append(_timed(work, device))
        with differentiable_attention():
            math.append(_timed(work, device))
    return statistics.median(default), statistics.median(math)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: no spin-waits)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    head_dim = args.width // args.heads
    shape = (args.batch, args.heads, args.seq, head_dim)
    q, k, v = (
        torch.randn(shape, generator=gen, device=device, requires_grad=True) for _ in range(3)
    )

    def sdpa() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()

    layer = nn.TransformerEncoderLayer(args.width, args.heads, 4 * args.width, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    encoder = encoder.to(device).eval()
    x = torch.randn(args.batch, args.seq, args.width, generator=gen, device=device)

    def encoder_forward() -> None:
        with torch.no_grad():
            encoder(x)

    print(
        f"device={device} threads={args.threads} batch={args.batch} seq={args.seq} "
        f"width={args.width} heads={args.heads} (medians of {args.repeats}, interleaved)"
    )
    print(f"{'work':<22}{'default s':>12}{'math s':>12}{'math/default':>14}")
    for name, work in (("sdpa fwd+bwd", sdpa), ("encoder fwd (eval)", encoder_forward)):
        default, math = _interleaved(work, device, args.repeats)
        print(f"{name:<22}{default:>12.4f}{math:>12.4f}{math / default:>14.2f}")


if __name__ == "__main__":
    main()
