"""`train.resume=auto` continues exactly (issue 3 item 6): the losses of an interrupted run,
resumed from its checkpoint at iteration 3, equal those of the uninterrupted run at iterations
4..6 — single process (plain torch engine) and 2 ranks under DeepSpeed ZeRO-3 (partitioned
optimizer state), fp32 on CPU.

The "interrupted" run is the uninterrupted run's own checkpoint at iteration 3 copied into a fresh
output dir (a run killed right after that save leaves exactly this on disk)."""

import math
import shutil

import pytest
from trainer_helpers import (
    FAST,
    SMOKE,
    TRAIN,
    leaked_shm_buffers,
    read_metrics,
    run_ds,
    run_py,
)

KEYS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss",
        "koleo_loss", "backbone_grad_norm", "dino_head_grad_norm", "ibot_head_grad_norm")


def _interrupt_copy(full, resumed):
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "iter_0000003",
                    resumed / "checkpoints" / "iter_0000003")
    (resumed / "checkpoints" / "latest").write_text("iter_0000003\n")


def _compare(full, resumed):
    a = {m["iteration"]: m for m in read_metrics(full)}
    b = {m["iteration"]: m for m in read_metrics(resumed)}
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [4, 5, 6]
    for it in (4, 5, 6):
        for k in KEYS:
            assert math.isclose(a[it][k], b[it][k], rel_tol=1e-6, abs_tol=1e-6), (it, k, a[it][k],
                                                                                  b[it][k])
    assert a[4]["total_loss"] != a[3]["total_loss"]  # the metrics do change between steps


def _args(out):
    return ["--config", str(SMOKE), *FAST, f"train.output_dir={out}", "train.max_iterations=6",
            "train.checkpoint_every=3", "optim.warmup_epochs=0", "train.keep_checkpoints=5"]


def test_resume_exact_single_process(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_py(_args(full))
    _interrupt_copy(full, resumed)
    run_py(_args(resumed))
    _compare(full, resumed)


@pytest.mark.slow
def test_resume_exact_zero3_two_ranks(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    first = run_ds(TRAIN, _args(full) + ["deepspeed.zero_stage=3"])
    _interrupt_copy(full, resumed)
    second = run_ds(TRAIN, _args(resumed) + ["deepspeed.zero_stage=3"])
    _compare(full, resumed)
    # the trainer releases DeepSpeed's CPU shared-memory all-reduce buffers at exit (DeepSpeed
    # itself leaves ~66 MB per rank in /dev/shm)
    for run in (first, second):
        assert leaked_shm_buffers(run.master_port) == []
