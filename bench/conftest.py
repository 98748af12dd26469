"""pytest-benchmark over the harness's cases: `pytest bench/ --benchmark-only` (not part of the
default test run: pyproject's testpaths is `tests`). Without CUDA the Triton kernels run under the
interpreter at the interpreter-sized cases, so TRITON_INTERPRET is set here, before any kernel
module is imported. Without pytest-benchmark installed, `--benchmark-only` is still accepted and
every benchmark is skipped with that reason."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)  # as `python -m bench` on CPU: no OpenMP-barrier outliers

try:
    import pytest_benchmark  # noqa: F401

    HAVE_PLUGIN = True
except ImportError:
    HAVE_PLUGIN = False


def pytest_addoption(parser):
    if not HAVE_PLUGIN:
        parser.addoption("--benchmark-only", action="store_true",
                         help="(pytest-benchmark not installed: accepted, benchmarks skip)")


if not HAVE_PLUGIN:
    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed (pip install pytest-benchmark, or the "
                    "`bench` extra)")
