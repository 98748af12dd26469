"""A signal stops training after the current step with a checkpoint (fastdino/stop.py), and the
same command continues from it exactly: the resumed run's losses at iterations 4..6 equal the
uninterrupted run's. Single process (plain torch engine) with SIGTERM, and 2 DeepSpeed ranks where
only rank 1 is signalled (SIGUSR1, Slurm's warning): rank 0 learns it through the step's reduction
and both stop at the same iteration."""

import math
import signal
import subprocess
import sys

import pytest
from trainer_helpers import (
    FAST,
    REPO,
    SMOKE,
    TRAIN,
    _env,
    _free_port,
    deepspeed_launcher,
    read_metrics,
    run_ds,
    run_py,
)

WORKER = REPO / "tests" / "e2e" / "stop_signal_worker.py"
KEYS = ("total_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss", "backbone_grad_norm")


def _args(out):
    return ["--config", str(SMOKE), *FAST, f"train.output_dir={out}", "train.max_iterations=6",
            "train.checkpoint_every=100", "optim.warmup_epochs=0"]


def _stopped(launcher: list[str], name: str, rank: int, args: list[str]):
    cmd = [*launcher, str(WORKER), "--signal", name, "--at", "2", "--rank", str(rank), "--",
           *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _check_stopped(stopped, p, name: str, ranks: int):
    ckpts = stopped / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000003", p.stderr[-3000:]
    assert [m["iteration"] for m in read_metrics(stopped)] == [1, 2, 3]
    assert f"stopped by {name} at iteration 3 of 6" in p.stderr
    assert not (stopped / "teacher_backbone.safetensors").exists()  # exported at the real end
    if ranks > 1:  # the rank that got no signal says it stopped for another rank's
        assert "stopped by a stop signal on another rank at iteration 3" in p.stderr


def _check_resumed(full, stopped):
    a = {m["iteration"]: m for m in read_metrics(full)}
    b = {m["iteration"]: m for m in read_metrics(stopped)}
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for it in (4, 5, 6):
        for k in KEYS:
            assert math.isclose(a[it][k], b[it][k], rel_tol=1e-6, abs_tol=1e-6), (it, k)
    assert (stopped / "teacher_backbone.safetensors").exists()


def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run_py(_args(full))
    p = _stopped([sys.executable], "SIGTERM", 0, _args(stopped))
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    _check_stopped(stopped, p, "SIGTERM", 1)
    run_py(_args(stopped))  # the same command: train.resume=auto
    _check_resumed(full, stopped)


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_both(tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    zero = ["deepspeed.zero_stage=2"]
    run_ds(TRAIN, _args(full) + zero)
    launcher = [deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(_free_port())]
    p = _stopped(launcher, "SIGUSR1", 1, _args(stopped) + zero)
    assert p.returncode != 0, p.stderr[-3000:]  # 128 + SIGUSR1 on rank 1, SIGTERM's on rank 0
    _check_stopped(stopped, p, "SIGUSR1", 2)
    run_ds(TRAIN, _args(stopped) + zero)
    _check_resumed(full, stopped)
