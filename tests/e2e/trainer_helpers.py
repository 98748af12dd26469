"""Shared helpers of the trainer e2e tests: launch `deepspeed --num_gpus 2` / `python` runs on CPU
and read their metrics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "fastdino" / "train.py"
SMOKE = REPO / "configs" / "smoke.yaml"
# few, fast steps: no workers (their start-up dominates at this size), log every step
FAST = ["data.num_workers=0", "train.log_every=1"]


def deepspeed_launcher() -> str:
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(exe).exists():
        pytest.fail("the deepspeed launcher is not installed: pip install 'fastdino[train]'")
    return exe


def _env() -> dict:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.setdefault("OMP_NUM_THREADS", "1")  # 2 ranks on 2 cores
    return env


def run_ds(script: Path, args: list[str], timeout: int = 300, check: bool = True,
           ranks: int = 2) -> subprocess.CompletedProcess:
    """`ranks` CPU ranks under the deepspeed launcher; the result carries `master_port`."""
    port = _free_port()
    cmd = [deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port", str(port),
           str(script), *args]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                             f"{p.stderr[-4000:]}")
    p.master_port = port
    return p


def leaked_shm_buffers(port: int) -> list[str]:
    """DeepSpeed CPU all-reduce buffers of the launch on `port` still in /dev/shm."""
    shm = Path("/dev/shm")
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_"
    return sorted(f.name for f in shm.glob(prefix + "*")) if shm.is_dir() else []


def run_py(args: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TRAIN), *args]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
