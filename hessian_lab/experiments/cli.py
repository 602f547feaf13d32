"""The ``hessian-lab`` command: ``train``, ``sweep`` and ``summarize``.

``hessian-lab train`` with no arguments trains a small CNN on scikit-learn's digits with ADLER
(a few seconds to a minute on a CPU) and prints where its logs went.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hessian_lab.experiments.config import CURVATURES, OPTIMIZER_NAMES, TrainConfig
from hessian_lab.experiments.datasets import DATASET_NAMES
from hessian_lab.experiments.models import ACTIVATIONS, MODEL_NAMES

__all__ = ["build_parser", "main"]

_DEFAULTS = TrainConfig()


def _d(field: str) -> str:
    return f" (default: {getattr(_DEFAULTS, field)!r})"


def _add_train_options(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: only options given on the command line override --config / the defaults.
    S = argparse.SUPPRESS
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODEL_NAMES, default=S, help="model family" + _d("model"))
    g.add_argument(
        "--activation", choices=sorted(ACTIVATIONS), default=S, help="activation" + _d("activation")
    )
    g.add_argument(
        "--width",
        type=int,
        default=S,
        help="hidden units (mlp), channels (cnn/rescnn) or embedding size (vit)" + _d("width"),
    )
    g.add_argument(
        "--depth",
        type=int,
        default=S,
        help="hidden layers (mlp), conv blocks (cnn/rescnn) or transformer blocks (vit)"
        + _d("depth"),
    )
    g.add_argument("--patch-size", type=int, default=S, help="vit: patch side (default: 4)")
    g.add_argument("--heads", type=int, default=S, help="vit: attention heads (default: 4)")
    g.add_argument(
        "--mlp-ratio", type=int, default=S, help="vit: MLP hidden size / width (default: 2)"
    )
    g.add_argument(
        "--last-layer-std",
        type=float,
        default=S,
        help="std of the zero-mean classifier weights (default: 1/sqrt(fan_in))",
    )

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASET_NAMES, default=S, help="data set" + _d("dataset"))
    g.add_argument(
        "--data-dir",
        default=S,
        help="folder with the unpacked CIFAR python-pickle files (cifar-10-batches-py/ or "
        "cifar-100-python/); required for cifar10/cifar100",
    )
    g.add_argument(
        "--download",
        action="store_true",
        default=S,
        help="download CIFAR into --data-dir if files are missing (off: nothing is downloaded)",
    )
    g.add_argument(
        "--split-seed",
        type=int,
        default=S,
        help="seed of the digits train/test split and of the synthetic data" + _d("split_seed"),
    )
    g.add_argument(
        "--max-train", type=int, default=S, help="use only the first N training examples"
    )
    g.add_argument("--max-test", type=int, default=S, help="use only the first N test examples")

    g = p.add_argument_group("optimization")
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZER_NAMES,
        default=S,
        help="adler: step size from the paper's Q (GGN), log-averaged; gn: from the empirical "
        "Fisher, arithmetic average; sgd: fixed --lr, no momentum" + _d("optimizer"),
    )
    g.add_argument("--lr", type=float, default=S, help="SGD learning rate (required for sgd)")
    g.add_argument("--beta", type=float, default=S, help="ADLER averaging factor β" + _d("beta"))
    g.add_argument(
        "--eps", type=float, default=S, help="ADLER regularization ε (Q + εI)" + _d("eps")
    )
    g.add_argument(
        "--curvature",
        choices=CURVATURES,
        default=S,
        help="override ADLER's curvature matrix (default: ggn for adler, ef for gn)",
    )
    g.add_argument(
        "--adler-option",
        action="append",
        metavar="KEY=VALUE",
        default=S,
        help="extra ADLER argument, repeatable: trust_region=1.0, max_lr=0.5, "
        "curvature_fraction=0.25, max_consecutive_skips=10, averaging=log (default: none, "
        "the paper's algorithm)",
    )
    g.add_argument("--epochs", type=int, default=S, help="passes over the data" + _d("epochs"))
    g.add_argument("--batch-size", type=int, default=S, help="minibatch size" + _d("batch_size"))
    g.add_argument(
        "--eval-batch-size",
        type=int,
        default=S,
        help="batch size of the per-epoch evaluation (memory only)" + _d("eval_batch_size"),
    )
    g.add_argument(
        "--seed", type=int, default=S, help="seed of initialization and data order" + _d("seed")
    )
    g.add_argument(
        "--device",
        default=S,
        help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ..." + _d("device"),
    )

    g = p.add_argument_group("run")
    g.add_argument(
        "--config",
        type=Path,
        help="start from this configuration (a run's config.json); other options override it",
    )
    g.add_argument(
        "--name",
        default=S,
        help="run name (default: derived, e.g. cnn-relu-w32-d2-digits-adler-s0)",
    )
    g.add_argument("--out-dir", default=S, help="run folder (default: runs/<name>)")
    g.add_argument(
        "--log-every", type=int, default=S, help="write every k-th step record" + _d("log_every")
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the run folder from its last checkpoint (same options)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="delete an existing run in the run folder first"
    )
    g.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar and the per-epoch lines"
    )
    g.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (torch.set_num_threads). Default: 1 for digits (its tiny "
        "models run fastest single-threaded, 3x faster on a busy 2-core machine), torch's "
        "choice otherwise",
    )


_MODEL_OPTION_FLAGS = ("patch_size", "heads", "mlp_ratio", "last_layer_std")
_NOT_CONFIG = {"command", "config", "resume", "overwrite", "no_progress", "threads", "func"}


def _parse_key_values(items: list[str]) -> dict[str, Any]:
    """Parse ``["trust_region=1.0", "averaging=log"]``; values are JSON where they parse."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--adler-option expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(text)  # numbers, true/false, null
        except json.JSONDecodeError:
            out[key] = text
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge ``--config`` (if any) with the options given on the command line."""
    values: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"--config {args.config} does not exist")
        values = TrainConfig.load(args.config).to_dict()
    given = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    changed = set(given) - {"device", "name", "out_dir"}
    if "adler_option" in given:
        adler = dict(values.get("adler_options", {}))
        adler.update(_parse_key_values(given.pop("adler_option")))
        given["adler_options"] = adler
    options = dict(values.get("model_options", {}))
    options.update({k: given.pop(k) for k in _MODEL_OPTION_FLAGS if k in given})
    if args.config is not None and changed:
        # A changed configuration is a different run: let it name itself anew.
        if "name" not in given:
            values["name"] = ""
        if "out_dir" not in given:
            values["out_dir"] = ""
    if "name" in given and "out_dir" not in given:
        values["out_dir"] = ""  # a new name means a new folder, runs/<name>
    values.update(given)
    values["model_options"] = options
    return TrainConfig.from_dict(values)


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from hessian_lab.experiments.training import train

    config = config_from_args(args).validate()
    threads = args.threads
    if threads is None and config.dataset == "digits":
        threads = 1  # 8x8 inputs: thread start-up costs more than it saves
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads}")
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        result = train(
            config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
        )
    finally:
        torch.set_num_threads(previous)  # main() may be called in-process (tests, notebooks)
    out = Path(result["out_dir"])
    print(
        f"finished {result['name']}: train loss {result['train_loss']:.4f}, "
        f"train acc {result['train_acc']:.3f}, test loss {result['test_loss']:.4f}, "
        f"test acc {result['test_acc']:.3f} ({result['steps']} steps, "
        f"{result['train_time_s']:.1f} s training)"
    )
    print(f"logs: {out}/  (config.json, steps.jsonl/.csv, epochs.jsonl/.csv, result.json)")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from hessian_lab.experiments.sweep import expand_grid, load_sweep, run_sweep

    spec = load_sweep(args.file)
    if args.out_dir is not None:
        spec.out_dir = str(args.out_dir)
    configs = expand_grid(spec)
    workers = spec.workers if args.workers is None else args.workers
    if args.dry_run:
        for config in configs:
            print(config.out_dir)
        print(f"{len(configs)} runs")
        return 0
    print(f"sweep {spec.name}: {len(configs)} runs, {workers} workers -> {spec.out_dir}")
    done = [0]

    def report(config: TrainConfig, outcome: dict[str, Any]) -> None:
        done[0] += 1
        if outcome["status"] == "finished":
            text = f"test acc {outcome['test_acc']:.3f}"
        else:
            text = f"FAILED: {outcome['error']}"
        print(f"[{done[0]}/{len(configs)}] {config.name}: {text}", flush=True)

    rows = run_sweep(spec, workers=workers, on_result=report)
    failed = [r for r in rows if r["status"] != "finished"]
    print(f"results: {Path(spec.out_dir) / 'results.csv'}")
    if failed:
        print(f"{len(failed)} of {len(rows)} runs failed:")
        for row in failed:
            print(f"  {row['name']}: {row['error']}  (see {row['out_dir']}/error.txt)")
        return 1
    return 0


def _cmd_summarize(args: argparse.Namespace) -> int:
    import pandas as pd

    from hessian_lab.experiments.summarize import collect_runs, paper_table

    runs = collect_runs(args.paths)
    if runs.empty:
        print(f"no runs (folders with config.json) under {', '.join(map(str, args.paths))}")
        return 1
    counts = runs["status"].value_counts().to_dict()
    print(f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    columns = ["name", "status", "epoch", "train_loss", "train_acc", "test_loss", "test_acc"]
    with pd.option_context("display.width", 200):
        shown = runs[columns].sort_values("name")
        print(shown.head(args.max_rows).to_string(index=False, float_format="%.4f"))
        if len(shown) > args.max_rows:
            print(f"... {len(shown) - args.max_rows} more runs (--max-rows, --out)")
        table = paper_table(runs, metric=args.metric, rows=tuple(args.rows))
        if not table.empty:
            wide = table.pivot_table(
                index=list(args.rows), columns="optimizer", values="text", aggfunc="first"
            )
            print(f"\nfinal {args.metric}, mean ± std over variations (SGD: best lr each):")
            print(wide.to_string())
    if args.out is not None:
        runs.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hessian-lab``."""
    parser = argparse.ArgumentParser(
        prog="hessian-lab",
        description="Experiments of the ADLER paper: train, sweep, summarize.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train one model (default: small CNN on digits with ADLER)",
        description="Train one model; logs go to runs/<name>/ unless --out-dir is given. "
        "With no options: a small CNN on scikit-learn's digits with ADLER.",
    )
    _add_train_options(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "sweep",
        help="run a grid of trainings from a TOML file, in parallel, resumable",
        description="Run every grid point of a sweep TOML file (see docs/experiments.md) in "
        "worker processes. Re-running skips finished runs and resumes interrupted ones.",
    )
    p.add_argument("file", type=Path, help="sweep TOML file")
    p.add_argument(
        "--workers", type=int, help="parallel worker processes; 0 runs in-process (default: file)"
    )
    p.add_argument("--out-dir", type=Path, help="sweep folder (default: from the file)")
    p.add_argument("--dry-run", action="store_true", help="list the run folders and stop")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "summarize",
        help="tabulate runs and the paper's Table 1 (mean ± std per optimizer)",
        description="Find run folders (with config.json) under PATHS, print their final metrics "
        "and a Table-1 style summary (SGD reduced to its best learning rate per variation).",
    )
    p.add_argument("paths", nargs="*", type=Path, default=[Path("runs")], help="folders to search")
    p.add_argument(
        "--metric",
        default="test_acc",
        help="metric of the summary: test_acc, train_acc, test_loss, train_loss, best_test_acc "
        "(default: test_acc)",
    )
    p.add_argument(
        "--rows",
        nargs="+",
        default=["dataset", "model", "activation"],
        help="configuration fields indexing the summary rows (default: dataset model activation)",
    )
    p.add_argument("--out", type=Path, help="also write the per-run table to this CSV file")
    p.add_argument(
        "--max-rows", type=int, default=50, help="runs listed before the summary (default: 50)"
    )
    p.set_defaults(func=_cmd_summarize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hessian-lab``; returns the exit status.

    ``hessian-lab`` with no command runs ``train`` with its defaults.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"hessian-lab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as err:
        print(f"hessian-lab {args.command}: error: bad JSON: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
