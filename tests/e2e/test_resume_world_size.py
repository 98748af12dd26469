"""Resume on another number of ranks than wrote the checkpoint (USERS.md §5, §13: users change the
GPU count between jobs). CPU, gloo, fp32, configs/smoke.yaml.

A run of W ranks writes a checkpoint at iteration 2; a run of W' ranks resumes from it (DeepSpeed
refuses ZeRO partitions of another data-parallel size, so fastdino converts the checkpoint into
DeepSpeed's universal form and loads that) and trains one more iteration. The reference is what
the writer's optimizer held at the save, read by the worker through DeepSpeed's own collective
getters (full fp32 masters and AdamW moments assembled from every rank's partition); the same
getters read the resumed run right after the load. Equal bit for bit: masters, module values,
exp_avg, exp_avg_sq, the param groups' settings; the AdamW step count is 2 at the load and 3
after the next step; the data continues at the same global image count."""

import subprocess

import pytest
import torch
from trainer_helpers import REPO, _env, _free_port, deepspeed_launcher, read_metrics, run_py

from fastdino.checkpoint import remap_data_position
from fastdino.data.loader import ShardedInfiniteOrder

WORKER = REPO / "tests" / "e2e" / "resume_world_size_worker.py"


def _launch(n_ranks: int, args: list[str]) -> None:
    cmd = [deepspeed_launcher(), "--num_gpus", str(n_ranks), "--master_port", str(_free_port()),
           str(WORKER), *args]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                             f"{p.stderr[-4000:]}")


def _write_then_resume(tmp_path, stage: int, writer_ranks: int, reader_ranks: int):
    w, r = tmp_path / "writer", tmp_path / "reader"
    common = [f"deepspeed.zero_stage={stage}", "train.checkpoint_every=2"]
    _launch(writer_ranks, ["--out", str(w), *common, "train.max_iterations=2"])
    ckpts = w / "run" / "checkpoints"
    _launch(reader_ranks, ["--out", str(r), "--dump-at-load", *common, "train.max_iterations=3",
                           f"train.resume={ckpts}"])
    load = (lambda f: torch.load(f, weights_only=True))
    return ckpts, load(w / "at_end.pt"), load(r / "at_load.pt"), load(r / "at_end.pt"), r / "run"


def _check(saved, loaded, after, run_dir, writer_ranks, reader_ranks):
    assert (saved["world"], loaded["world"]) == (writer_ranks, reader_ranks)
    for key in ("master", "module", "exp_avg", "exp_avg_sq"):
        assert saved[key].keys() == loaded[key].keys() and len(saved[key]) > 0, key
        for name, ref in saved[key].items():
            assert torch.equal(ref, loaded[key][name]), (key, name)
    # the moments are real state (two steps of AdamW), not zeros a reset would also "restore"
    assert all(v.abs().sum() > 0 for v in saved["exp_avg_sq"].values())
    assert saved["groups"] == loaded["groups"]  # per-group lr / wd multipliers, last-layer flag
    assert saved["steps"] == [2.0, 2.0] and loaded["steps"] == [2.0, 2.0]
    assert after["steps"] == [3.0, 3.0]  # every group's AdamW step advanced by exactly one
    assert loaded["start_iteration"] == 2
    # 2 micro-batches x writer_ranks x 8 images seen; the reader continues at that image count
    assert loaded["start_micro_batch"] == 2 * writer_ranks // reader_ranks
    metrics = read_metrics(run_dir)
    assert [m["iteration"] for m in metrics] == [3]
    assert torch.isfinite(torch.tensor(metrics[0]["total_loss"]))


def test_zero2_two_ranks_resume_on_one(tmp_path):
    ckpts, saved, loaded, after, run_dir = _write_then_resume(tmp_path, 2, 2, 1)
    _check(saved, loaded, after, run_dir, 2, 1)
    assert (ckpts / "iter_0000002" / "universal" / "zero").is_dir()  # converted once, kept
    assert not (ckpts / "iter_0000002" / ".universal.partial").exists()
    # the plain torch engine (one process, no DeepSpeed) cannot read it: the error names both
    p = run_py(["--config", str(REPO / "configs" / "smoke.yaml"), "data.num_workers=0",
                f"train.output_dir={tmp_path / 'torch'}", f"train.resume={ckpts}"], check=False)
    assert p.returncode != 0
    assert "DeepSpeed engine (2 rank(s))" in p.stderr and "plain torch engine" in p.stderr


@pytest.mark.slow
def test_zero3_one_rank_resume_on_two(tmp_path):
    """ZeRO-3 also exercises the fixes for DeepSpeed 0.19.8's ZeRO-3 universal loader (group 0's
    settings copied into every param group; one step tensor shared by all sub-groups)."""
    _, saved, loaded, after, run_dir = _write_then_resume(tmp_path, 3, 1, 2)
    _check(saved, loaded, after, run_dir, 1, 2)


# ------------------------------------------------------------------- the data position (no ranks)


def test_loader_stream_does_not_depend_on_world_size():
    """What makes the remap below exact: after s micro-batches of B images, W ranks together have
    read global positions 0 .. s*B*W - 1 of one world-size-independent stream."""
    n, seed, B = 37, 5, 4
    two = [ShardedInfiniteOrder(n, seed, r, 2) for r in range(2)]
    one = ShardedInfiniteOrder(n, seed, 0, 1)
    for s in range(12):  # crosses epoch boundaries (37 images)
        seen_two = {x for o in two for x in o.step(s, B)}
        seen_one = set(one.step(2 * s, B)) | set(one.step(2 * s + 1, B))
        assert seen_two == seen_one


@pytest.mark.parametrize(("mb", "w0", "b0", "w1", "b1", "want"), [
    (2, 2, 8, 1, 8, 4),     # 32 images: 4 micro-batches of 8 on one rank
    (4, 1, 8, 2, 8, 2),     # 32 images: 2 micro-batches of 2 x 8
    (3, 1, 8, 2, 8, 1),     # 24 images on 2 x 8: restart at image 16 (8 seen again)
    (5, 4, 16, 8, 4, 10),   # 320 images, batch size changed too: 10 x 8 x 4
    (7, 2, None, 4, 8, 3),  # old checkpoint without the micro-batch size: assume unchanged
])
def test_remap_data_position(mb, w0, b0, w1, b1, want):
    assert remap_data_position(mb, w0, b0, w1, b1) == want
