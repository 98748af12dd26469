"""fastdino without triton (CPU-only torch wheels, macOS, Windows: USERS.md §6).

Each test runs a subprocess in which triton is absent as it is there: a sitecustomize puts
`sys.modules["triton"] = None`, so `import triton` raises ModuleNotFoundError and
`importlib.util.find_spec("triton")` answers None. The trainer, eval, export, profile and curation
must import; `kernels.impl=auto` must train with the PyTorch references; `kernels.impl=triton` is
a one-line config error; the bench's Triton targets say in one line that they need triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_triton_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['triton'] = None\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


IMPORTS = """
import importlib.util, sys
assert importlib.util.find_spec("triton") is None  # the stand-in for 'not installed' holds
import fastdino.train, fastdino.cli, fastdino.export, fastdino.profile, fastdino.curation.cli
import fastdino.curation.kmeans
from fastdino.kernels import (dino_loss, gram, kmeans_assign, koleo, layernorm_residual,
                              photometric, rope, sinkhorn, swiglu)
from fastdino.kernels._triton import HAS_TRITON, TritonNotInstalled
assert not HAS_TRITON
# a kernel launched anyway (a direct call of a launcher) is a one-line error, not a NameError
try:
    dino_loss._soft_ce_merge_kernel[(1,)]()
except TritonNotInstalled as e:
    assert "triton is not installed" in str(e) and "\\n" not in str(e), e
else:
    raise AssertionError("launching a kernel without triton did not raise")
print("imports ok")
"""


def test_everything_imports_without_triton(no_triton_env):
    r = _run(["-c", IMPORTS], no_triton_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "imports ok" in r.stdout


def test_smoke_run_trains_with_the_references_without_triton(no_triton_env, tmp_path):
    out = tmp_path / "run"
    r = _run(["fastdino/train.py", "--config", "configs/smoke.yaml", f"train.output_dir={out}",
              "train.max_iterations=2", "data.num_workers=0", "kernels.impl=auto"],
             no_triton_env, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "kernels: dino_loss uses the torch implementation" in log
    assert "it 2/2" in log
    assert (out / "checkpoints" / "iter_0000002").exists()


def test_kernels_impl_triton_without_triton_is_one_config_error(no_triton_env, tmp_path):
    r = _run(["fastdino/train.py", "--config", "configs/smoke.yaml",
              f"train.output_dir={tmp_path / 'run'}", "train.max_iterations=1",
              "kernels.impl=triton"], no_triton_env)
    log = r.stdout + r.stderr
    assert r.returncode == 2, log[-3000:]
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if "kernels.impl" in line]
    assert len(errors) == 1, log[-3000:]
    assert "config key 'kernels.impl' = 'triton'" in errors[0]
    assert "triton is not installed" in errors[0]


def test_bench_kernel_targets_say_in_one_line_that_they_need_triton(no_triton_env):
    for target in (["dino_loss", "--no-save"], ["compile-report"]):
        r = _run(["-m", "bench", *target], no_triton_env)
        assert r.returncode == 2, (target, r.stderr[-3000:])
        assert "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines() == [
            f"error: python -m bench {target[0]} needs triton, which is not installed (the Linux "
            "CUDA torch wheels ship it): without it only step and data run"], r.stderr[-3000:]
