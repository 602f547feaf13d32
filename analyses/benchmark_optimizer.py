"""Cost of one ADLER step in units of one plain SGD step on the same batch.

SGD step = ``zero_grad(); loss_fn(model(x), y).backward(); step()`` of ``torch.optim.SGD``.
ADLER step = ``ADLER.step(x, y)`` (loss, G, the curvature term, η_k, η̂_k, the update).
For each device, model and ADLER configuration the two are timed interleaved (so that a busy
machine slows both alike), after warm-up, and the table shows median(ADLER) / median(SGD). On CPU
the clock is the process's CPU time (``time.process_time``), which a shared machine does not
stretch; on CUDA it is wall time between synchronizations.
The parameters are reset before every timed step, so every repeat sees the same θ.

Targets (the paper says "twice"): ``"ggn"`` and ``"ef"`` ≤ 1.7 SGD steps with the full batch for
the curvature, ≤ 1.3 with ``curvature_fraction=0.25``; after the user's own backward ADLER adds
only the curvature pass.

Usage:
    python analyses/benchmark_optimizer.py [--threads 1] [--repeats 15] [--devices cpu,cuda]
        [--jvp-methods auto,forward,double_backward]
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from hessian_lab.experiments.models import build_model
from hessian_lab.optim import ADLER

# (name, build_model kwargs, batch size): a CIFAR-shaped input, sizes that run in ~0.1 s on 1 core.
MODELS = {
    "mlp": ({"width": 512, "depth": 2}, 128),
    "cnn": ({"width": 16, "depth": 2}, 64),
    "vit": ({"width": 64, "depth": 2, "patch_size": 4, "heads": 4}, 64),
}
# (curvature, curvature_fraction, how the step is called): "own" = opt.step(x, y), ADLER's own
# gradient pass; "after backward" = zero_grad + the user's forward + backward + opt.step(), the
# loop people write (ADLER adds only the curvature pass).
CONFIGS = [
    ("ggn", None, "own"),
    ("ef", None, "own"),
    ("ef_batch", None, "own"),
    ("hessian", None, "own"),
    ("ggn", 0.25, "own"),
    ("ef", 0.25, "own"),
    ("hessian", 0.25, "own"),
    ("ggn", None, "after backward"),
    ("ggn", 0.25, "after backward"),
]


def config_key(curvature: str, fraction: float | None, pattern: str) -> str:
    """The table's column name of a configuration."""
    key = curvature if fraction is None else f"{curvature} f={fraction}"
    return key if pattern == "own" else f"{key} after backward"


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    # CPU: the process's CPU time, not wall time: on a shared machine other jobs stretch wall
    # time at random, while CPU time counts only our work (with one intra-op thread it is exact).
    # CUDA: wall time between synchronizations.
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - start

    return run


def make_steps(
    name: str, device: torch.device, jvp_method: str
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Callable[[], object]], int]:
    """The model, its initial θ, one step callable per column ("sgd" first) and the batch size."""
    kwargs, batch = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, in_shape=(3, 32, 32), num_classes=10, **kwargs).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    theta0 = copy.deepcopy(model.state_dict())

    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)

    def sgd_step() -> None:
        sgd.zero_grad()
        loss_fn(model(x), y).backward()
        sgd.step()

    steps: dict[str, Callable[[], object]] = {"sgd": sgd_step}
    for curvature, fraction, pattern in CONFIGS:
        opt = ADLER(
            model,
            loss_fn,
            curvature=curvature,
            curvature_fraction=fraction,
            max_consecutive_skips=None,
            jvp_method=jvp_method,
        )
        if pattern == "own":
            step = lambda opt=opt: opt.step(x, y)  # noqa: E731
        else:

            def step(opt: ADLER = opt) -> None:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()

        steps[config_key(curvature, fraction, pattern)] = step
    return model, theta0, steps, batch


def bench_model(
    name: str, device: torch.device, repeats: int, warmup: int, jvp_method: str
) -> dict[str, float]:
    model, theta0, steps, batch = make_steps(name, device, jvp_method)
    timer = _timer(device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(warmup + repeats):
        for key, fn in steps.items():
            model.load_state_dict(theta0)  # same θ for every timed step
            t = timer(fn)
            if r >= warmup:
                times[key].append(t)
    out = {"P": float(sum(p.numel() for p in model.parameters())), "batch": float(batch)}
    for stat, fn in (("median", statistics.median), ("min", min)):
        sgd_time = fn(times["sgd"])
        out[f"{stat} sgd_ms"] = 1e3 * sgd_time
        for key in steps:
            if key != "sgd":
                out[f"{stat} {key}"] = fn(times[key]) / sgd_time
    return out


def breakdown(name: str, column: str, repeats: int, warmup: int, jvp_method: str) -> None:
    """Print where one ADLER column's step spends its time, operation by operation, against SGD."""
    model, theta0, steps, _ = make_steps(name, torch.device("cpu"), jvp_method)
    if column not in steps:
        raise SystemExit(f"--breakdown: no column {column!r}; choose from {sorted(steps)}")
    # Self CPU time per operation (torch.profiler, wall clock of this thread, children excluded),
    # backward operations included: the autograd engine runs them in this thread on CPU.
    seconds = {k: collections.Counter() for k in ("sgd", column)}
    calls = {k: collections.Counter() for k in ("sgd", column)}
    for r in range(warmup + repeats):
        for key in seconds:  # interleaved, as in the step table
            model.load_state_dict(theta0)
            if r < warmup:
                steps[key]()
                continue
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                steps[key]()
            for event in prof.key_averages():
                if event.key.startswith("aten::"):
                    seconds[key][event.key] += event.self_cpu_time_total / 1e6
                    calls[key][event.key] += event.count
    per_step = {k: sum(c.values()) / repeats * 1e3 for k, c in seconds.items()}
    print(
        f"\n### {name}, {column} ({jvp_method}): aten operations' self time per step, SGD "
        f"{per_step['sgd']:.1f} ms, ADLER {per_step[column]:.1f} ms, ratio "
        f"{per_step[column] / per_step['sgd']:.2f}\n"
    )
    print("| operation | SGD calls | SGD ms | ADLER calls | ADLER ms | ADLER − SGD ms |")
    print("|---|---|---|---|---|---|")
    sgd, adler = seconds["sgd"], seconds[column]
    names = sorted(set(sgd) | set(adler), key=lambda n: -adler[n])
    for op in names[:15]:
        a, b = sgd[op] / repeats * 1e3, adler[op] / repeats * 1e3
        print(
            f"| `{op}` | {calls['sgd'][op] // repeats} | {a:.2f} | "
            f"{calls[column][op] // repeats} | {b:.2f} | {b - a:+.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--devices", default="cpu,cuda", help="comma list; cuda skipped if absent")
    parser.add_argument("--models", default="mlp,cnn,vit")
    parser.add_argument(
        "--jvp-methods",
        default="auto",
        help="comma list of ADLER jvp_method values: auto, forward, double_backward",
    )
    parser.add_argument(
        "--breakdown",
        metavar="COLUMN",
        help='instead of the table: per-operation CPU time of one column (e.g. "ggn" or '
        '"ggn f=0.25") against SGD, for each of --models, on CPU',
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.breakdown:
        for name in args.models.split(","):
            for method in args.jvp_methods.split(","):
                breakdown(name, args.breakdown, args.repeats, args.warmup, method)
        return
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
    print(f"repeats {args.repeats} after {args.warmup} warm-up; ratios = median ADLER / median SGD")
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    methods = args.jvp_methods.split(",")
    keys = [config_key(*config) for config in CONFIGS]
    rows = []
    for device in devices:
        for method in methods:
            for name in args.models.split(","):
                res = bench_model(name, torch.device(device), args.repeats, args.warmup, method)
                rows.append((device, method, name, res))
                print(f"  done: {device} {method} {name}", flush=True)
    # The median is the headline (as asked); the minimum is the classic estimator under
    # interference from other jobs (noise only ever adds time), shown as a cross-check.
    for stat in ("median", "min"):
        header = (
            f"| device | jvp_method | model | P | batch | SGD ms ({stat}) | "
            + " | ".join(keys)
            + " |"
        )
        print(f"\nADLER step / SGD step, ratio of the {stat}s over repeats\n")
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for device, method, name, res in rows:
            cells = " | ".join(f"{res[f'{stat} {k}']:.2f}" for k in keys)
            print(
                f"| {device} | {method} | {name} | {int(res['P'])} | {int(res['batch'])} | "
                f"{res[f'{stat} sgd_ms']:.1f} | {cells} |"
            )


if __name__ == "__main__":
    main()
