"""Atomic, rotated checkpoints and exact RNG / engine round trips (single process, torch engine)."""

import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from fastdino import checkpoint as ck
from fastdino.config import load_config
from fastdino.parallel import DistInfo, TorchStudent


def _engine():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    groups = [{"params": list(m.parameters()), "lr": 0.1, "weight_decay": 0.0,
               "lr_multiplier": 1.0, "wd_multiplier": 0.0, "is_last_layer": False,
               "is_backbone": False}]
    return TorchStudent(m, groups, load_config(None, []),
                        DistInfo(0, 1, 0, torch.device("cpu"), False), torch.float32)


def _train_step(eng):
    loss = eng(torch.ones(3, 4)).pow(2).sum()
    eng.backward(loss)
    eng.step()


def test_save_load_roundtrip_engine_state_and_rng(tmp_path):
    eng = _engine()
    _train_step(eng)
    path = ck.save_checkpoint(tmp_path, 1, eng, {"teacher": {"w": torch.arange(3)},
                                                 "data_iteration": 1}, keep=3)
    expect_rand = (random.random(), np.random.rand(), torch.rand(2))
    _train_step(eng)  # change params, optimizer state and RNG
    random.random(), np.random.rand(), torch.rand(5)
    eng2 = _engine()
    st = ck.load_checkpoint(ck.resolve_resume("auto", tmp_path), eng2)
    ck.set_rng_state(st["rng"])
    assert path == tmp_path / "iter_0000001" and st["iteration"] == 1
    assert torch.equal(st["teacher"]["w"], torch.arange(3))
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expect_rand[0] and got[1] == expect_rand[1]
    assert torch.equal(got[2], expect_rand[2])
    # the restored engine continues exactly like the original would have from the checkpoint
    eng3 = _engine()
    ck.load_checkpoint(path, eng3)
    _train_step(eng2)
    _train_step(eng3)
    for a, b in zip(eng2.module.parameters(), eng3.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_rotation_keeps_newest(tmp_path):
    eng = _engine()
    for it in (5, 10, 15, 20):
        ck.save_checkpoint(tmp_path, it, eng, {"data_iteration": it}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000015", "iter_0000020"]
    assert (tmp_path / "latest").read_text().strip() == "iter_0000020"


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path, caplog):
    """A fresh start (train.resume=none) in the folder of a run that went further: the old
    iter_20 is not this run's to rotate away, and must not make it delete its own new ones."""
    eng = _engine()
    ck.save_checkpoint(tmp_path, 20, eng, {"data_iteration": 20}, keep=1)
    assert ck.resolve_resume("none", tmp_path) is None
    assert "starting from scratch in a folder holding checkpoints" in caplog.text
    for it in (5, 10):
        ck.save_checkpoint(tmp_path, it, eng, {"data_iteration": it}, keep=1)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000010", "iter_0000020"]
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "iter_0000010"
    ck.save_checkpoint(tmp_path, 20, eng, {"data_iteration": 20}, keep=1)  # replaces the old
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000020"]


def test_auto_resume_without_latest_takes_the_newest_complete_checkpoint(tmp_path, caplog):
    """iter_N folders copied without their 'latest' pointer: resume, not a silent restart that
    overwrites them."""
    eng = _engine()
    for it in (5, 10):
        ck.save_checkpoint(tmp_path, it, eng, {"data_iteration": it}, keep=3)
    (tmp_path / "latest").unlink()
    (tmp_path / "iter_0000015").mkdir()  # incomplete: no trainer state
    assert ck.resolve_resume("auto", tmp_path) == tmp_path / "iter_0000010"
    assert "no 'latest' pointer" in caplog.text


def test_kill_during_save_keeps_previous_latest(tmp_path, monkeypatch):
    eng = _engine()
    ck.save_checkpoint(tmp_path, 5, eng, {"data_iteration": 5}, keep=3)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(ck.os, "rename", killed)  # dies after the files, before publishing
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 10, eng, {"data_iteration": 10}, keep=3)
    monkeypatch.undo()
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "iter_0000005"
    assert not (tmp_path / "iter_0000010").exists()
    assert (tmp_path / ".partial" / "iter_0000010").exists()  # garbage, never pointed to
    ck.save_checkpoint(tmp_path, 10, eng, {"data_iteration": 10}, keep=3)  # retry cleans up
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "iter_0000010"
    assert not (tmp_path / ".partial" / "iter_0000010").exists()


def test_resolve_resume_modes(tmp_path):
    assert ck.resolve_resume("auto", tmp_path) is None
    assert ck.resolve_resume("none", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="trainer_state.pt"):
        ck.resolve_resume(str(tmp_path / "nope"), tmp_path)
    eng = _engine()
    ck.save_checkpoint(tmp_path, 3, eng, {"data_iteration": 3}, keep=3)
    assert ck.resolve_resume(str(tmp_path), tmp_path / "x") == tmp_path / "iter_0000003"
    assert ck.resolve_resume(str(tmp_path / "iter_0000003"), "x") == tmp_path / "iter_0000003"


def test_resume_from_a_run_folder_or_copied_checkpoints(tmp_path):
    """train.resume=<a run's output_dir> (what users type) was refused: only checkpoints/ or
    iter_N were; a checkpoints/ folder copied without its `latest` was refused too."""
    run = tmp_path / "run"
    eng = _engine()
    for it in (3, 6):
        ck.save_checkpoint(run / "checkpoints", it, eng, {"data_iteration": it}, keep=3)
    assert ck.resolve_resume(str(run), "x") == run / "checkpoints" / "iter_0000006"
    (run / "checkpoints" / "latest").unlink()
    assert ck.resolve_resume(str(run), "x") == run / "checkpoints" / "iter_0000006"
    assert ck.resolve_resume(str(run / "checkpoints"), "x") == run / "checkpoints" / "iter_0000006"
    (run / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="a run's output_dir"):
        ck.resolve_resume(str(run / "empty"), "x")


def test_user_files_are_loaded_weights_only(tmp_path):
    eng = _engine()
    path = ck.save_checkpoint(tmp_path, 1, eng, {"data_iteration": 1}, keep=3)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"data_iteration": 1, "x": Evil()}, path / ck.STATE_FILE)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ck.load_checkpoint(path, _engine())


# ------------------------------------------------ the data position when the per-rank batch changes


@pytest.mark.parametrize(("saved_world", "saved_batch", "world", "batch", "want"), [
    (2, 8, 2, 8, False),     # the writer's ranks and batch: the position is this run's as it is
    (2, 8, 1, 8, True),      # other ranks
    (1, 8, 1, 4, True),      # same ranks, other batch: 8 images per micro-batch became 4
    (2, 8, 4, 4, True),      # both
    (1, None, 1, 4, False),  # an older checkpoint without the batch: assumed this run's, as before
    (1, None, 2, 4, True),   # ... still remapped for the ranks
    (None, 8, 2, 4, False),  # the oldest, without the world size: left as it is
])
def test_needs_data_remap(saved_world, saved_batch, world, batch, want, caplog):
    assert ck.needs_data_remap(saved_world, saved_batch, world, batch) is want
    warned = "does not record the images per rank" in caplog.text
    assert warned == (saved_batch is None and saved_world is not None)


def _engine_b(batch: int):
    eng = _engine()
    eng.micro_batch_size = batch  # data.batch_size_per_gpu of the run that built it
    return eng


def test_resume_with_another_batch_continues_at_the_same_image(tmp_path, caplog):
    """The per-rank batch is recorded for every engine (the plain torch engine recorded None) and
    a resume with another data.batch_size_per_gpu on the same ranks remaps the loader position:
    8 micro-batches of 8 images = 64 images -> micro-batch 16 of 4 images (not 8: 32 images
    would be seen twice)."""
    caplog.set_level(logging.INFO, logger="fastdino")
    eng = _engine_b(8)
    path = ck.save_checkpoint(tmp_path, 8, eng, {"data_iteration": 8}, keep=3)
    saved = torch.load(path / ck.STATE_FILE, weights_only=True)
    assert saved["micro_batch_size"] == 8 and saved["world_size"] == 1
    assert saved["engine_layout"]["format"] == "torch"
    assert ck.load_checkpoint(path, _engine_b(4))["data_iteration"] == 16
    assert "-> 16 micro-batches x 1 ranks x 4 images (global image 64)" in caplog.text
    assert ck.load_checkpoint(path, _engine_b(8))["data_iteration"] == 8  # unchanged batch
    assert ck.load_checkpoint(path, _engine_b(16))["data_iteration"] == 4
    # B = 8 -> 3 images: 64 is not a multiple; restart at image 63 (one image seen again)
    assert ck.load_checkpoint(path, _engine_b(3))["data_iteration"] == 21


def test_torch_engine_records_its_batch(tmp_path):
    eng = TorchStudent(nn.Linear(2, 2), [{"params": [], "names": []}],
                       load_config(None, ["data.batch_size_per_gpu=5"]),
                       DistInfo(0, 1, 0, torch.device("cpu"), False), torch.float32)
    assert eng.micro_batch_size == 5
    assert eng.checkpoint_layout == {"engine": "torch", "zero_stage": None, "precision": "fp32",
                                     "optimizer": "AdamW", "format": "torch"}


def test_old_checkpoint_without_the_batch_keeps_the_position_and_warns(tmp_path, caplog):
    eng = _engine_b(8)
    path = ck.save_checkpoint(tmp_path, 8, eng, {"data_iteration": 8}, keep=3)
    st = torch.load(path / ck.STATE_FILE, weights_only=True)
    del st["micro_batch_size"], st["engine_layout"]  # as written before they were recorded
    torch.save(st, path / ck.STATE_FILE)
    assert ck.load_checkpoint(path, _engine_b(4))["data_iteration"] == 8
    assert "does not record the images per rank per micro-batch" in caplog.text
