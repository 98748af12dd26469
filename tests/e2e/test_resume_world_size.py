"""Resume on another number of ranks than wrote the checkpoint (USERS.md §5, §13: users change the
GPU count between jobs). CPU, gloo, fp32, configs/smoke.yaml.

A run of W ranks writes a checkpoint at iteration 2; a run of W' ranks resumes from it (DeepSpeed
refuses ZeRO partitions of another data-parallel size, so fastdino converts the checkpoint into
DeepSpeed's universal form and loads that) and trains one more iteration. The reference is what
the writer's optimizer held at the save, read by the worker through DeepSpeed's own collective
getters (full fp32 masters and AdamW moments assembled from every rank's partition); the same
getters read the resumed run right after the load. Equal bit for bit: masters, module values,
exp_avg, exp_avg_sq, the param groups' settings; the AdamW step count is 2 at the load and 3
after the next step; the data continues at the same global image count. The plain torch engine
(one process, `python fastdino/train.py`) reads and writes checkpoints the other side can resume
too."""

import math
import subprocess
import sys

import pytest
import torch
from trainer_helpers import (
    FAST,
    REPO,
    SMOKE,
    _env,
    _free_port,
    deepspeed_launcher,
    read_metrics,
    run_py,
)

from fastdino.checkpoint import remap_data_position
from fastdino.data.loader import ShardedInfiniteOrder

WORKER = REPO / "tests" / "e2e" / "resume_world_size_worker.py"


def _launch(n_ranks: int, args: list[str]) -> None:
    """n_ranks DeepSpeed ranks, or 0: `python` (the plain torch engine, one process)."""
    launcher = ([deepspeed_launcher(), "--num_gpus", str(n_ranks), "--master_port",
                 str(_free_port())] if n_ranks else [sys.executable])
    cmd = [*launcher, str(WORKER), *args]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                             f"{p.stderr[-4000:]}")


def _load(f):
    return torch.load(f, weights_only=True)


def _resume(tmp_path, name: str, stage: int, ckpts, reader_ranks: int, extra=()):
    r = tmp_path / name
    _launch(reader_ranks, ["--out", str(r), "--dump-at-load", f"deepspeed.zero_stage={stage}",
                           "train.checkpoint_every=2", "train.max_iterations=3",
                           f"train.resume={ckpts}", *extra])
    return _load(r / "at_load.pt"), _load(r / "at_end.pt"), r / "run"


def _write(tmp_path, stage: int, writer_ranks: int, extra=()):
    w = tmp_path / "writer"
    _launch(writer_ranks, ["--out", str(w), f"deepspeed.zero_stage={stage}",
                           "train.checkpoint_every=2", "train.max_iterations=2", *extra])
    return w / "run" / "checkpoints", _load(w / "at_end.pt")


def _check(saved, loaded, after, run_dir, writer_ranks, reader_ranks):
    """writer_ranks / reader_ranks: 0 = the plain torch engine (one process)."""
    assert (saved["world"], loaded["world"]) == (max(writer_ranks, 1), max(reader_ranks, 1))
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
    assert loaded["start_micro_batch"] == 2 * max(writer_ranks, 1) // max(reader_ranks, 1)
    metrics = read_metrics(run_dir)
    assert [m["iteration"] for m in metrics] == [3]
    assert torch.isfinite(torch.tensor(metrics[0]["total_loss"]))


def test_zero2_two_ranks_resume_on_one_and_on_the_torch_engine(tmp_path):
    ckpts, saved = _write(tmp_path, 2, 2)
    _check(saved, *_resume(tmp_path, "one_rank", 2, ckpts, 1), 2, 1)
    assert (ckpts / "iter_0000002" / "universal" / "zero").is_dir()  # converted once, kept
    assert not (ckpts / "iter_0000002" / ".universal.partial").exists()
    # the same checkpoint on the plain torch engine (`python fastdino/train.py`), which reads the
    # universal form kept above
    _check(saved, *_resume(tmp_path, "torch_engine", 2, ckpts, 0), 2, 0)


@pytest.mark.slow
def test_zero3_one_rank_resume_on_two(tmp_path):
    """ZeRO-3 also exercises the fixes for DeepSpeed 0.19.8's ZeRO-3 universal loader (group 0's
    settings copied into every param group; one step tensor shared by all sub-groups)."""
    ckpts, saved = _write(tmp_path, 3, 1)
    _check(saved, *_resume(tmp_path, "two_ranks", 3, ckpts, 2), 1, 2)


@pytest.mark.slow
def test_torch_engine_resume_on_two_zero3_ranks(tmp_path):
    """A one-process plain-torch run (torch_engine.pt) continued by 2 DeepSpeed ranks: its
    universal form is written by fastdino (parallel._universal_from_torch)."""
    ckpts, saved = _write(tmp_path, 3, 0)  # the stage is ignored by the torch engine
    _check(saved, *_resume(tmp_path, "two_ranks", 3, ckpts, 2), 0, 2)


@pytest.mark.slow
def test_frozen_blocks_resume_on_another_world_size(tmp_path):
    """optim.frozen_blocks: the frozen layers are outside the optimizer, so the universal form
    has no state for them; the resumed run (plain torch engine, one DeepSpeed rank) keeps the
    values it was built with, which must be the writer's (checked: a reader built otherwise
    stops), and trains the rest exactly on."""
    frozen = ["optim.frozen_blocks=1"]
    ckpts, saved = _write(tmp_path, 3, 2, frozen)
    assert len(saved["frozen"]) > 0
    for name, ranks in (("torch_engine", 0), ("one_rank", 1)):
        loaded, after, run = _resume(tmp_path, name, 3, ckpts, ranks, frozen)
        _check(saved, loaded, after, run, 2, ranks)
        for got in (loaded["frozen"], after["frozen"]):
            assert got.keys() == saved["frozen"].keys()
            assert all(torch.equal(saved["frozen"][k], got[k]) for k in got), name
    # built with another init seed: ZeRO-3 keeps the frozen values as per-rank fragments, which
    # the check reassembles (against the plain module, and against ZeRO-3's gathered partitions)
    for name, ranks in (("torch_engine_seed1", 0), ("one_rank_seed1", 1)):
        with pytest.raises(AssertionError, match=r"frozen parameter '[^']+' \(optim.frozen_bl"):
            _resume(tmp_path, name, 3, ckpts, ranks, [*frozen, "train.seed=1"])


@pytest.mark.slow
def test_zero2_universal_resume_refuses_other_frozen_values(tmp_path):
    """The same on DeepSpeed ZeRO-2 (2 ranks -> 1), and a reader built with another init seed:
    its frozen layers are not the checkpoint's, so the resume stops and says why instead of
    training a mix of two models."""
    frozen = ["optim.frozen_blocks=1"]
    ckpts, saved = _write(tmp_path, 2, 2, frozen)
    loaded, after, run = _resume(tmp_path, "one_rank", 2, ckpts, 1, frozen)
    _check(saved, loaded, after, run, 2, 1)
    assert all(torch.equal(saved["frozen"][k], loaded["frozen"][k]) for k in saved["frozen"])
    with pytest.raises(AssertionError, match=r"frozen parameter '[^']+' \(optim.frozen_blocks\)"):
        _resume(tmp_path, "other_seed", 2, ckpts, 1, [*frozen, "train.seed=1"])


# ---------------------------------------------- the same ranks, another ZeRO stage or precision

KEYS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss",
        "koleo_loss", "backbone_grad_norm", "dino_head_grad_norm", "ibot_head_grad_norm")


@pytest.fixture(scope="module")
def uninterrupted_two_ranks(tmp_path_factory):
    """The 2-rank ZeRO-2 run of 3 iterations that nobody interrupted: its iteration 3 is what a
    run resumed at 2 must log (another ZeRO stage computes the same step up to fp32 rounding)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _launch(2, ["--out", str(out), "deepspeed.zero_stage=2", "train.checkpoint_every=2",
                "train.max_iterations=3"])
    return {m["iteration"]: m for m in read_metrics(out / "run")}


@pytest.mark.parametrize(("writer", "reader"), [(2, 3), pytest.param(3, 1, marks=pytest.mark.slow)])
def test_same_ranks_other_zero_stage(tmp_path, uninterrupted_two_ranks, writer, reader):
    """2 ranks, ZeRO-2 -> ZeRO-3 and ZeRO-3 -> ZeRO-1: the data-parallel size is the writer's,
    but not the layout of the partitions (DeepSpeed's own loader failed an assertion in its
    state-dict factory on every rank). The resume goes through the universal form, made readable
    by every stage (ds_to_universal writes only what the writer's stage reads back); the state
    carries over bit for bit and the next step logs what the uninterrupted run logged."""
    ckpts, saved = _write(tmp_path, writer, 2)
    loaded, after, run = _resume(tmp_path, f"zero{reader}", reader, ckpts, 2)
    _check(saved, loaded, after, run, 2, 2)
    assert (ckpts / "iter_0000002" / "universal" / "any_stage").is_file()
    state = torch.load(ckpts / "iter_0000002" / "trainer_state.pt", weights_only=True)
    assert state["engine_layout"]["zero_stage"] == writer  # recorded for the next resume
    got, ref = read_metrics(run)[0], uninterrupted_two_ranks
    for k in KEYS:
        assert math.isclose(got[k], ref[3][k], rel_tol=1e-4, abs_tol=1e-6), (k, got[k], ref[3][k])
    assert ref[3]["total_loss"] != ref[2]["total_loss"]  # the step does move the metrics


def test_same_ranks_other_precision(tmp_path):
    """bf16 -> fp32 on one rank, ZeRO-2 both: DeepSpeed 0.19.8's own loader looks for the
    partitions under this precision's names (zero_pp_rank_*; bf16 writes bf16_zero_pp_rank_*)
    and stops; through the universal form the fp32 masters and AdamW moments carry over."""
    ckpts, saved = _write(tmp_path, 2, 1, ["deepspeed.precision=bf16"])
    _check(saved, *_resume(tmp_path, "fp32", 2, ckpts, 1, ["deepspeed.precision=fp32"]), 1, 1)


# ------------------------------------------------------------------- the data position (no ranks)


def test_resume_with_another_batch_size_continues_at_the_same_image(tmp_path):
    """One process, 2 iterations of 4 images, resumed with data.batch_size_per_gpu=2: the 8
    images seen are 4 micro-batches of 2, so the data continues at micro-batch 4 (it continued at
    2: images 4..7 seen twice)."""
    out = tmp_path / "run"
    args = ["--config", str(SMOKE), *FAST, f"train.output_dir={out}", "train.checkpoint_every=2",
            "dino.head.n_prototypes=128", "ibot.head.n_prototypes=128"]
    run_py([*args, "data.batch_size_per_gpu=4", "train.max_iterations=2"])
    first = torch.load(out / "checkpoints" / "iter_0000002" / "trainer_state.pt",
                       weights_only=True)
    assert (first["data_iteration"], first["micro_batch_size"]) == (2, 4)
    p = run_py([*args, "data.batch_size_per_gpu=2", "train.max_iterations=3"])
    assert "-> 4 micro-batches x 1 ranks x 2 images (global image 8)" in p.stdout + p.stderr
    assert "not bit-exactly the run that wrote it" not in p.stderr  # the remap's line only
    last = torch.load(out / "checkpoints" / "iter_0000003" / "trainer_state.pt",
                      weights_only=True)
    assert (last["data_iteration"], last["micro_batch_size"]) == (5, 2)  # 4 + this step's one


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
