"""Shared pytest settings for the test suite.

Threads: one intra-op thread by default. The test models are tiny (a few hundred parameters), so
threads only add synchronization. Measured on the 2-core CI machine under load: building the dense
references took 28 s with one thread and several minutes with two. ``HESSIAN_LAB_TEST_THREADS=2``
runs the suite with another thread count, which changes the order of floating-point sums: no test
may depend on it (issue 9), and this is how to check. Some test files pin one thread themselves
(their training runs compare a run with its resumed copy): the ``one_thread`` fixture below, with
``pytestmark = pytest.mark.usefixtures("one_thread")``.

Other rounding changes to check the same way: ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (MKL's kernels; on
an AVX-512 Intel CPU this changes rounding) and ``ATEN_CPU_CAPABILITY=default`` or ``avx2``
(torch's own vectorized kernels; this one also changes rounding on AMD CPUs).

The header of a run says which devices were tested: CUDA variants are collected only where CUDA
is available (``tests/operator_helpers.py``).
"""

import os

import pytest
import torch

THREADS = int(os.environ.get("HESSIAN_LAB_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)


@pytest.fixture
def one_thread():
    """One intra-op thread during the test, whatever ``HESSIAN_LAB_TEST_THREADS`` says."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _device_lines() -> list[str]:
    if torch.cuda.is_available():
        devices = f"cpu, cuda ({torch.cuda.get_device_name(0)})"
    else:
        devices = "cpu (CUDA not available: CUDA variants not collected, CUDA-only tests skipped)"
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS")
    return [
        f"hessian_lab devices tested: {devices}",
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)"
        f" (HESSIAN_LAB_TEST_THREADS), CPU capability {torch.backends.cpu.get_cpu_capability()}"
        + (f", MKL_ENABLE_INSTRUCTIONS={mkl}" if mkl else ""),
    ]


def pytest_report_header(config) -> list[str]:
    return _device_lines()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    # `pytest -q` (the README's command) hides the header: say it at the end instead.
    if config.get_verbosity() < 0:
        for line in _device_lines():
            terminalreporter.write_line(line)
