"""Sweeps on a cluster through submitit.

Two executors: SLURM jobs (``slurm``) or submitit's local processes (``submitit-local``, the same
code path on one machine, which is how CI tests it).

One job trains one run with the function the sweep passes in (the sweep's ``run_one``: resume
if possible, errors reported, never raised), so this module does not import the sweep. The jobs'
pickles and logs go to ``<sweep out_dir>/submitit/``. A job that reaches its time limit or is
preempted is requeued by submitit (the task is checkpointable) and its run resumes from the last
epoch checkpoint; a job that dies anyway is reported as failed, and rerunning the sweep resumes
it. A run folder is locked while a job trains in it, so a rerun while old jobs still run never
trains one run twice at the same time.

``submitit`` is imported only here, and only when such an executor is used:
``pip install 'hessian-lab[cluster]'``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SUBMITIT_EXECUTORS", "RunTask", "run_with_submitit"]

#: Executor names handled here, and submitit's cluster name for each.
SUBMITIT_EXECUTORS: dict[str, str] = {"slurm": "slurm", "submitit-local": "local"}


def _submitit() -> Any:
    try:
        import submitit
    except ImportError as err:
        raise ImportError(
            f"--executor slurm / submitit-local needs the submitit package ({err}); install it "
            "with pip install 'hessian-lab[cluster]' (or pip install submitit)"
        ) from err
    return submitit


RunFn = Callable[[dict[str, Any], int], dict[str, Any]]


class RunTask:
    """What one job runs: train one run (resuming), return its outcome row.

    Checkpointable in submitit's sense (it has ``checkpoint``): on a timeout or preemption
    submitit calls it and requeues the same task; the run then resumes from its last epoch
    checkpoint.

    Args:
        run: ``run(config_dict, threads) -> outcome``, a module-level function (submitit
            pickles it by reference).
    """

    def __init__(self, run: RunFn) -> None:
        self.run = run

    def __call__(self, config_dict: dict[str, Any], threads: int) -> dict[str, Any]:
        """Train the run described by ``config_dict`` with ``threads`` torch threads."""
        return self.run(config_dict, threads)

    def checkpoint(self, config_dict: dict[str, Any], threads: int) -> Any:
        """Requeue the same run (its own checkpoints hold the progress)."""
        return _submitit().helpers.DelayedSubmission(self, config_dict, threads)


def run_with_submitit(
    kind: str,
    folder: str | Path,
    parameters: dict[str, Any],
    tasks: Sequence[tuple[int, dict[str, Any]]],
    finish: Callable[[int, dict[str, Any]], None],
    run: RunFn,
    *,
    workers: int,
    job_name: str,
    poll_s: float | None = None,
) -> None:
    """Submit ``tasks`` as submitit jobs and call ``finish(i, outcome)`` as each ends.

    Args:
        kind: ``"slurm"`` or ``"submitit-local"``.
        folder: submitit's folder (pickles, logs).
        parameters: submitit executor parameters (``timeout_min``, ``slurm_partition``,
            ``gpus_per_node``, ``cpus_per_task``, ``slurm_array_parallelism``, ...), passed to
            ``update_parameters`` as they are; submitit checks them.
        tasks: ``(index, config dict)`` of the runs to train.
        finish: Called in this process with the run's outcome (a failed job gives
            ``status = "failed"`` and the job's log file in the error).
        run: What a job calls, ``run(config_dict, threads) -> outcome`` (the sweep's
            ``run_one``).
        workers: ``submitit-local``: jobs running at once; ``slurm``: the job array's
            parallelism unless ``slurm_array_parallelism`` is given.
        job_name: The jobs' name.
        poll_s: Seconds between status checks (default 1 locally, 15 on SLURM).

    Raises:
        ImportError: submitit is missing.
        ValueError: ``kind`` is unknown, or SLURM without ``timeout_min``.
    """
    if kind not in SUBMITIT_EXECUTORS:
        valid = ", ".join(SUBMITIT_EXECUTORS)
        raise ValueError(f"unknown submitit executor {kind!r}; valid: {valid}")
    submitit = _submitit()
    params = dict(parameters)
    if kind == "slurm":
        if "timeout_min" not in params:
            raise ValueError(
                "--executor slurm needs timeout_min, the jobs' time limit in minutes ([slurm] "
                "timeout_min = 240 in the sweep file, or --slurm timeout_min=240); a run that "
                "outlives it is requeued and resumes from its last epoch checkpoint"
            )
        params.setdefault("slurm_array_parallelism", max(1, workers))
        threads = int(params.get("cpus_per_task", 0))
    else:
        params.setdefault("timeout_min", 7 * 24 * 60)  # submitit's local default is 2 minutes
        import os

        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    executor = submitit.AutoExecutor(folder=str(folder), cluster=SUBMITIT_EXECUTORS[kind])
    executor.update_parameters(name=job_name, **params)
    task = RunTask(run)
    poll = poll_s if poll_s is not None else (15.0 if kind == "slurm" else 1.0)
    window = len(tasks) if kind == "slurm" else max(1, workers)

    queue = list(tasks)
    running: dict[Any, int] = {}

    def submit(batch: list[tuple[int, dict[str, Any]]]) -> None:
        if kind == "slurm":
            with executor.batch():  # one job array
                jobs = [executor.submit(task, config, threads) for _, config in batch]
        else:
            jobs = [executor.submit(task, config, threads) for _, config in batch]
        for job, (i, _) in zip(jobs, batch, strict=True):
            running[job] = i

    try:
        while queue or running:
            free = window - len(running)
            if free > 0 and queue:
                submit(queue[:free])
                queue = queue[free:]
            done = [job for job in running if job.done()]
            for job in done:
                i = running.pop(job)
                finish(i, _outcome(job))
            if not done:
                time.sleep(poll)
    except KeyboardInterrupt:
        ids = ", ".join(str(job.job_id) for job in running)
        if kind == "slurm":
            print(
                f"interrupted: SLURM jobs {ids} keep running; rerun the sweep to collect their "
                "results (a run in progress is locked, never trained twice at once)"
            )
        else:
            for job in running:
                job.cancel(check=False)
        raise


def _outcome(job: Any) -> dict[str, Any]:
    """The run's outcome, or a failure naming the job and its log."""
    try:
        return job.result()
    except Exception as err:  # noqa: BLE001 - a dead job is one failed run, not a failed sweep
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return {
            "status": "failed",
            "error": (
                f"job {job.job_id} did not complete ({first}); log: {job.paths.stderr}; rerun "
                "the sweep to resume it from its last checkpoint"
            ),
        }
