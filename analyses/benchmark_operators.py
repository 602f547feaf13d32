"""Benchmark curvature products against one gradient on the same batch (issue: operators).

For each model the unit is the time of one gradient (forward + backward of the loss) on the
batch; every other row is a ratio to it, all measured in one run:

* ``new op + 1 product``: build an operator on the batch and do one product (nothing cached);
* ``first 20 (mean)`` / ``first 100 (mean)``: build a new operator and do 20 (100) products with
  different vectors, the mean cost per product with the construction included — what an
  ``eigsh`` of 20 steps or a longer Lanczos run pays;
* ``amortized product``: the fastest of ``--products`` products on one operator;
* ``matmat(16) / column``: a 16-column ``matmat`` divided by 16;
* ``process's first product``: in a fresh Python process, the first operator's construction and
  first product (one-time warm-ups included) over a gradient measured afterwards in that process.

``--memory`` measures instead the peak memory of building an operator, of its first and of its
second product (the second may trace the JVP), with the cache on and off, as a multiple of the
peak memory of one gradient step (forward + backward), on a ResNet-18-sized network (11M
parameters, 32×32 inputs, batch 32, BatchNorm in eval mode). Each figure comes from its own fresh
process: on CPU the growth of the peak resident set size (``ru_maxrss``) over the process's size
after building the model and the batch; on CUDA ``torch.cuda.max_memory_allocated``.

When ``curvlinops-for-pytorch`` is importable, the same rows are measured for its GGN, Hessian
and empirical-Fisher operators (``check_deterministic=False``, so its construction does not run
its own extra probes).

Every time is the minimum over repeats (after a warm-up), so load from other processes on a shared
machine inflates it least; on CPU the clock is the process's CPU time (run with ``--threads 1``).
``--matmat`` measures only the ``matmat(16) / column`` row (and the gradient), every operator of
both libraries in turn within each of ``--rounds`` rounds. ``--first`` measures only the first-20
and first-100 rows, each sequence of products paired with a sequence of as many gradients timed
just before it (a mean over a mean, where the main table divides a mean by a minimum).

Run: ``python analyses/benchmark_operators.py --threads 1`` (add
``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

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


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 convolutions and a shortcut (1×1 when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(batch_size: int = 32) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """ResNet-18 for 32×32 inputs (CIFAR layout: 3×3 stem, no max-pool), 10 classes, 11.2M."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    model = nn.Sequential(*layers).eval()  # BatchNorm with running statistics
    batch = (torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,)))
    return model, batch


MODELS = {"mlp": mlp, "cnn": cnn}


class Problem(NamedTuple):
    """A benchmark model and batch on the device, with what every table needs of them."""

    model: nn.Module
    batch: tuple[torch.Tensor, ...]
    loss: nn.Module
    params: list[torch.Tensor]
    P: int
    gradient: Callable[[], object]


def on_device(model: nn.Module, batch, device: torch.device) -> Problem:
    """The model and batch moved to the device, the loss, the parameters and one gradient."""
    model = model.to(device)
    batch = tuple(t.to(device) for t in batch)
    loss = nn.CrossEntropyLoss()
    params = list(model.parameters())

    def gradient() -> None:
        torch.autograd.grad(loss(model(batch[0]), batch[1]), params)

    return Problem(model, batch, loss, params, sum(p.numel() for p in params), gradient)


def clock(device: torch.device) -> float:
    """The benchmark's clock: the process's CPU time on CPU, wall time on CUDA.

    With one thread, CPU time counts our work only, which other jobs on a shared machine do not
    stretch; on CUDA the callers synchronize around wall time.
    """
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = clock(device)
        fn()
        sync(device)
        times.append(clock(device) - t0)
    return min(times)  # the least-disturbed run: other processes only ever add time


def mean_of_first(
    make: Callable, model: nn.Module, loss: nn.Module, batch, vs: torch.Tensor, k: int, device
) -> float:
    """Mean time per product of a new operator's first k products, construction included."""
    sync(device)
    t0 = clock(device)
    op = make(model, loss, batch)
    for i in range(k):
        op @ vs[i]
    sync(device)
    return (clock(device) - t0) / k


def first_product_in_a_fresh_process(model_name: str, library: str, kind: str, args) -> float:
    """Run this script in a new process for one (model, library, operator): its first product."""
    command = [sys.executable, __file__, "--first-product", model_name, library, kind]
    command += ["--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["ratio"]


def _first_product_child(model_name: str, library: str, kind: str, device: torch.device) -> None:
    torch.manual_seed(0)
    model, batch, loss, _, P, gradient = on_device(*MODELS[model_name](), device)
    make = (ours if library == "hessian_lab" else peer)(kind)
    v = torch.randn(P, device=device)
    sync(device)
    t0 = clock(device)
    make(model, loss, batch) @ v
    sync(device)
    first = clock(device) - t0
    unit = best_time(gradient, device, 5)  # after the first product: its warm-ups stay in it
    print(json.dumps({"ratio": first / unit}))


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _memory_child(what: str, cache: str, device: torch.device) -> None:
    """In a fresh process: the peak memory growth of one gradient step or of an operator."""
    torch.manual_seed(0)
    model, batch = resnet18()
    model = model.to(device)
    batch = tuple(t.to(device) for t in batch)
    loss = nn.CrossEntropyLoss()
    base = _peak_bytes(device)
    out: dict[str, float] = {}
    if what == "gradient":
        torch.autograd.grad(loss(model(batch[0]), batch[1]), list(model.parameters()))
        out["step"] = _peak_bytes(device) - base
    else:
        op = ours(what)(model, loss, batch, cache=cache == "on")
        out["build"] = _peak_bytes(device) - base
        v = torch.randn(op.shape[0], device=device)
        op @ v
        out["product 1"] = _peak_bytes(device) - base
        op @ v
        out["product 2"] = _peak_bytes(device) - base
    print(json.dumps(out))


def memory_table(args) -> None:
    """Print the ``--memory`` table (module docstring)."""

    def child(what: str, cache: str) -> dict[str, float]:
        command = [sys.executable, __file__, "--memory-child", what, cache]
        command += ["--threads", str(args.threads), "--device", args.device]
        result = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return json.loads(result.strip().splitlines()[-1])

    step = child("gradient", "-")["step"]
    model, _ = resnet18()
    P = sum(p.numel() for p in model.parameters())
    print(f"\n### Peak memory, ResNet-18 (P={P}), batch 32 of 3x32x32, device {args.device}")
    print(f"one gradient step: {step / 2**20:.0f} MiB above the model and the batch\n")
    print("| operator | cache | build | first product | second product |")
    print("|---|---|---:|---:|---:|")
    for kind in ("H", "Q", "GN"):
        for cache in ("on", "off"):
            m = child(kind, cache)
            cells = " | ".join(f"{m[k] / step:.2f}" for k in ("build", "product 1", "product 2"))
            print(f"| {kind} | {cache} | {cells} |")
    print("\n(multiples of one gradient step's peak memory)")


def ours(kind: str) -> Callable:
    cls = {"H": HessianOperator, "Q": GGNOperator, "GN": EmpiricalFisherOperator}[kind]
    return lambda model, loss, batch, **kwargs: cls(model, loss, batch, **kwargs)


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


def matmat_table(device: torch.device, args) -> None:
    """Print the ``--matmat`` tables: one gradient and ``matmat(16) / column``, interleaved.

    Every operator (ours and curvlinops', H, Q and GN) is built once per model and its cache
    filled; then each of ``--rounds`` rounds times one gradient and each operator's 16-column
    ``matmat`` in turn, so that load from other jobs falls on all of them alike. A cell is the
    fastest round's time per column over the fastest round's gradient.
    """
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for short, build in MODELS.items():
        torch.manual_seed(0)
        _matmat_rows(short, *build(), device, args)


def _matmat_rows(short: str, model: nn.Module, batch, device: torch.device, args) -> None:
    model, batch, loss, _, P, gradient = on_device(model, batch, device)
    v = torch.randn(P, device=device)
    V = torch.randn(P, 16, device=device)
    ops = {}
    for library, factory in (("hessian_lab", ours), ("curvlinops", peer)):
        for kind in ("H", "Q", "GN"):
            make = factory(kind)
            if make is not None:
                ops[(library, kind)] = make(model, loss, batch)
                ops[(library, kind)] @ v  # fills any cache

    units: list[float] = []
    per_col: dict[tuple[str, str], list[float]] = {key: [] for key in ops}
    for _ in range(args.rounds):
        units.append(best_time(gradient, device, args.repeats))
        for key, op in ops.items():
            per_col[key].append(best_time(lambda op=op: op @ V, device, 1) / 16)
    unit = min(units)
    print(f"\n### {short} (P={P}); one gradient = {unit * 1e3:.2f} ms, {args.rounds} rounds\n")
    print("| ratio to one gradient | " + " | ".join(f"{lib} {op}" for lib, op in ops) + " |")
    print("|---|" + "---:|" * len(ops))
    cells = " | ".join(f"{min(t) / unit:.2f}" for t in per_col.values())
    print(f"| matmat(16) / column | {cells} |")


def first_products_table(device: torch.device, args) -> None:
    """Print the ``--first`` tables: a new operator's first k products against k gradients.

    The ``first 20 (mean)`` / ``first 100 (mean)`` rows of the main table divide a mean (one
    sequence of products, noise included) by a minimum (the best of ``--repeats`` gradients), which
    reads 20-30% high on a shared machine. Here each sequence is paired with a sequence of k
    gradients timed just before it, every operator of both libraries in turn within each of
    ``--rounds`` rounds; a cell is the median over rounds of (new operator + k products) ÷
    (k gradients), with the rounds' range after it.
    """
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for short in args.models.split(","):
        torch.manual_seed(0)
        _first_rows(short, *MODELS[short](), device, args)


def _first_rows(short: str, model: nn.Module, batch, device: torch.device, args) -> None:
    model, batch, loss, _, P, gradient = on_device(model, batch, device)
    vs = torch.randn(100, P, device=device)

    def gradients(k: int) -> float:
        sync(device)
        t0 = clock(device)
        for _ in range(k):
            gradient()
        sync(device)
        return clock(device) - t0

    makes = {
        (library, kind): factory(kind)
        for library, factory in (("hessian_lab", ours), ("curvlinops", peer))
        for kind in ("H", "Q", "GN")
    }
    makes = {key: make for key, make in makes.items() if make is not None}
    ratios: dict[tuple[str, str, int], list[float]] = {}
    gradient()  # warm-up, and each operator's one-time costs (the "process's first product" row)
    for make in makes.values():
        mean_of_first(make, model, loss, batch, vs, 2, device)
    for _ in range(args.rounds):
        for k in (20, 100):
            for key, make in makes.items():
                unit = gradients(k)
                seq = mean_of_first(make, model, loss, batch, vs, k, device) * k
                ratios.setdefault((*key, k), []).append(seq / unit)
    print(f"\n### {short} (P={P}), {args.rounds} rounds\n")
    print("| paired ratio | " + " | ".join(f"{lib} {op}" for lib, op in makes) + " |")
    print("|---|" + "---:|" * len(makes))
    for k in (20, 100):
        cells = []
        for lib, op in makes:
            r = ratios[(lib, op, k)]
            cells.append(f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f})")
        print(f"| first {k} ÷ {k} gradients | " + " | ".join(cells) + " |")


def benchmark(
    name: str, short: str, model: nn.Module, batch, device: torch.device, args
) -> list[dict]:
    model, batch, loss, _, P, gradient = on_device(model, batch, device)
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
            vs = torch.randn(100, P, device=device)
            first_20 = min(
                mean_of_first(make, model, loss, batch, vs, 20, device) for _ in range(3)
            )
            first_100 = min(
                mean_of_first(make, model, loss, batch, vs, 100, device) for _ in range(2)
            )
            op = make(model, loss, batch)
            op @ v  # fills any cache
            amortized = best_time(lambda op=op: op @ v, device, args.products)
            per_col = best_time(lambda op=op: op @ V, device, max(3, args.repeats // 2)) / 16
            # Already a ratio (to the child's own gradient): scaled back to seconds for the rows.
            fresh = first_product_in_a_fresh_process(short, library, kind, args) * unit
            for row, value in (
                ("process's first product", fresh),
                ("new op + 1 product", first),
                ("first 20 (mean)", first_20),
                ("first 100 (mean)", first_100),
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
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--first-product", nargs=3, metavar=("MODEL", "LIBRARY", "OP"), help=argparse.SUPPRESS
    )  # the child process of "process's first product"
    parser.add_argument("--memory", action="store_true", help="the peak-memory table instead")
    parser.add_argument(
        "--matmat",
        action="store_true",
        help="only the matmat(16) / column row, libraries interleaved over --rounds rounds",
    )
    parser.add_argument(
        "--first",
        action="store_true",
        help="only the first-20/100 rows, each paired with as many gradients, over --rounds rounds",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --matmat and --first")
    parser.add_argument("--models", default="mlp,cnn", help="models of --first")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.first_product:
        _first_product_child(*args.first_product, device)
        return
    if args.memory_child:
        _memory_child(*args.memory_child, device)
        return
    if args.memory:
        memory_table(args)
        return
    if args.matmat:
        matmat_table(device, args)
        return
    if args.first:
        first_products_table(device, args)
        return
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    rows = []
    names = {"mlp": "MLP 784-256-256-10 tanh, N=512", "cnn": "CNN 3x32x32, N=128"}
    for short, build in MODELS.items():
        torch.manual_seed(0)
        model, batch = build()
        rows += benchmark(names[short], short, model, batch, device, args)

    # One Markdown table per model: rows x (library, op), ratios to one gradient.
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        unit = mine[0]
        print(f"\n### {name} (P={unit['P']}); one gradient = {unit['value'] * 1e3:.2f} ms\n")
        cols = [(r["library"], r["op"]) for r in mine[1:] if r["row"] == "amortized product"]
        print("| ratio to one gradient | " + " | ".join(f"{lib} {op}" for lib, op in cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for row in (
            "process's first product",
            "new op + 1 product",
            "first 20 (mean)",
            "first 100 (mean)",
            "amortized product",
            "matmat(16) / column",
        ):
            vals = {(r["library"], r["op"]): r["value"] for r in mine if r["row"] == row}
            print(f"| {row} | " + " | ".join(f"{vals[c]:.2f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
