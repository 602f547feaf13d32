"""The ``hessian-lab`` command: ``train``, ``sweep`` and ``summarize``.

``hessian-lab train`` with no arguments trains a small CNN on scikit-learn's digits with ADLER
(a few seconds to a minute on a CPU) and prints where its logs went.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hessian_lab.experiments.adler_options import parse_option_value
from hessian_lab.experiments.config import TrainConfig
from hessian_lab.experiments.models import model_option_specs

__all__ = ["build_parser", "config_from_args", "main", "version_text"]

#: Options of ``train`` that are not configuration fields.
_RUN_OPTIONS = {"command", "config", "resume", "overwrite", "no_progress", "threads", "func"}


def version_text() -> str:
    """``hessian-lab 0.1.0 (torch 2.13.0, Python 3.11.9)``."""
    from importlib import metadata

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    own = version("hessian-lab")
    if own == "not installed":  # running from a source tree without installing
        from hessian_lab import __version__ as own
    return f"hessian-lab {own} (torch {version('torch')}, Python {sys.version.split()[0]})"


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _default_text(value: Any) -> str:
    if value is None or value is False or value == "" or value == {}:
        return ""
    if isinstance(value, tuple):
        value = " ".join(map(str, value))
    return f" (default: {value})"


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One option per :class:`TrainConfig` field and per built-in model option.

    Derived from the fields' types and ``metadata`` (and the models' constructors), so that the
    command line cannot drift from the configuration.
    """
    # SUPPRESS: only options given on the command line override --config / the defaults.
    S = argparse.SUPPRESS
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        args = [t for t in typing.get_args(hint) if t is not type(None)]
        base = args[0] if origin in (typing.Union, types.UnionType) and len(args) == 1 else hint
        default = f.default if f.default is not dataclasses.MISSING else None
        kw: dict[str, Any] = {"default": S, "dest": f.name}
        help_text = f.metadata["help"] + _default_text(default)
        if base is bool:
            kw["action"] = "store_true"
        elif base is dict or typing.get_origin(base) is dict:
            kw.update(action="append", metavar="KEY=VALUE")
        elif typing.get_origin(base) is tuple:
            kw.update(nargs=len(typing.get_args(base)), type=int, metavar=("C", "H", "W"))
        else:
            kw["type"] = base
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        groups[group].add_argument(_flag(f), help=help_text, **kw)
    model_group = groups["model"]
    for spec in model_option_specs().values():
        model_group.add_argument(
            "--" + spec.name.replace("_", "-"),
            type=spec.type,
            default=S,
            dest=spec.name,
            help=f"{'/'.join(spec.models)}: {spec.help}"
            + (f" (default: {spec.default})" if spec.default is not None else ""),
        )
    g = groups["run"]
    g.add_argument(
        "--config",
        type=Path,
        help="start from this configuration (a run's config.json); other options override it",
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


def _parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """Parse ``["trust_region=1.0", "averaging=log"]``; values are JSON where they parse."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_option_value(text)
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge ``--config`` (if any) with the options given on the command line.

    Settings read from ``--config`` that do not apply to an optimizer, model or data set chosen
    on the command line are dropped (e.g. the lr of a saved SGD run with ``--optimizer adler``);
    options *given* on the command line that do not apply are refused.

    Raises:
        ValueError: Malformed ``KEY=VALUE``, or a given option that does not apply.
        FileNotFoundError: ``--config`` does not exist.
    """
    values: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"--config {args.config} does not exist")
        values = TrainConfig.load(args.config).to_dict()
    option_names = set(model_option_specs())
    given = {k: v for k, v in vars(args).items() if k not in _RUN_OPTIONS}
    given_fields = {k for k in given if k not in option_names}
    changed = set(given) - {"device", "name", "out_dir", "log_every", "tensorboard"}
    flags = {f.name: _flag(f) for f in dataclasses.fields(TrainConfig)}
    if (
        args.config is not None
        and "optimizer" in given
        and "lr" not in given
        and (given["optimizer"] == "sgd") != (values.get("optimizer") == "sgd")
    ):
        # SGD's lr is its learning rate, ADLER's a multiplier of η̂: never carry one over.
        values["lr"] = None
    if args.config is not None and "model" in given and given["model"] != values.get("model"):
        # Another model: the saved model's settings and options are not this one's.
        for key in ("activation", "width", "depth"):
            values[key] = None
        values["model_options"] = {}
    for key in ("model_options", "adler_options", "dataset_options"):
        if key in given:
            merged = dict(values.get(key, {}))
            merged.update(_parse_key_values(given.pop(key), flags[key]))
            given[key] = merged
    options = dict(given.pop("model_options", values.get("model_options", {})))
    options.update({k: given.pop(k) for k in option_names if k in given})
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
    if "synthetic_shape" in values:
        values["synthetic_shape"] = tuple(values["synthetic_shape"])
    config = TrainConfig.from_dict(values)
    defaults = TrainConfig.defaults()
    for key, reason in config.inapplicable().items():
        if key in given_fields:
            raise ValueError(f"{flags[key]} does not apply here: {reason}")
        if args.config is not None:  # from the saved file, for another choice: drop it
            value = defaults[key]
            setattr(config, key, tuple(value) if key == "synthetic_shape" else value)
    return config


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
    if args.executor is not None:
        spec.executor = args.executor
    spec.slurm.update(_parse_key_values(args.slurm or [], "--slurm"))
    configs = expand_grid(spec)
    workers = spec.workers if args.workers is None else args.workers
    if args.dry_run:
        for config in configs:
            print(config.out_dir)
        print(f"{len(configs)} runs")
        return 0
    how = f"{workers} workers" if spec.executor == "pool" else f"executor {spec.executor}"
    print(f"sweep {spec.name}: {len(configs)} runs, {how} -> {spec.out_dir}")
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
        table = paper_table(runs, metric=args.metric, rows=tuple(args.rows), over=tuple(args.over))
        if not table.empty:
            split = table.attrs.get("split", [])
            index = [*args.rows, *split]
            wide = (
                table.pivot_table(
                    index=index, columns="optimizer", values="text", aggfunc="first", dropna=False
                )
                .dropna(how="all")
                .fillna("—")
            )
            print(
                f"\nfinal {args.metric}, mean ± std over {', '.join(args.over)} "
                "(SGD: best lr of each configuration):"
            )
            if split:
                print(
                    f"(the runs differ in {', '.join(split)}: separate rows, never averaged "
                    "together; --over adds fields to average over)"
                )
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
    parser.add_argument("--version", action="version", version=version_text())
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
        "worker processes or as SLURM jobs. Re-running skips finished runs and resumes "
        "interrupted ones.",
    )
    p.add_argument("file", type=Path, help="sweep TOML file")
    p.add_argument(
        "--workers",
        type=int,
        help="runs at once: worker processes (pool; 0 runs in-process), jobs (submitit-local) "
        "or the SLURM job array's parallelism (default: from the file)",
    )
    p.add_argument(
        "--executor",
        choices=("pool", "slurm", "submitit-local"),
        help="pool: worker processes on this machine (the default); slurm: one SLURM job per "
        "run through submitit (pip install 'hessian-lab[cluster]'); submitit-local: the same "
        "submitit path as local processes (default: from the file, else pool)",
    )
    p.add_argument(
        "--slurm",
        action="append",
        metavar="KEY=VALUE",
        help="submitit parameter, repeatable, added to the file's [slurm] table: "
        "timeout_min=240, slurm_partition=gpu, gpus_per_node=1, cpus_per_task=8, mem_gb=32, "
        "slurm_account=..., slurm_array_parallelism=16",
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
    p.add_argument(
        "--over",
        nargs="+",
        default=["seed"],
        help="configuration fields the mean ± std is taken over (default: seed; the paper's "
        "Table 1: width depth seed). Runs differing in any other setting get their own rows",
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
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
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
