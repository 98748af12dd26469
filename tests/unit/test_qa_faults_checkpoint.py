"""Checkpoint folders that exist but are damaged, as a node or network-filesystem crash leaves
them (files cut short, empty or missing after the folder was published): train.resume=auto
continues from the newest whole checkpoint with a warning, an explicit train.resume names the
file in one line, and a damaged file met while loading is one line, not torch's traceback."""

import logging

import pytest
import torch
from torch import nn

from fastdino import checkpoint as ck
from fastdino.config import load_config
from fastdino.parallel import DistInfo, TorchStudent


def _engine():
    torch.manual_seed(0)
    m = nn.Linear(4, 2)
    groups = [{"params": list(m.parameters()), "lr": 0.1, "weight_decay": 0.0,
               "lr_multiplier": 1.0, "wd_multiplier": 0.0, "is_last_layer": False,
               "is_backbone": False}]
    return TorchStudent(m, groups, load_config(None, []),
                        DistInfo(0, 1, 0, torch.device("cpu"), False), torch.float32)


def _two(tmp_path):
    eng = _engine()
    for it in (5, 10):
        ck.save_checkpoint(tmp_path, it, eng, {"data_iteration": it}, keep=3)
    return tmp_path / "iter_0000005", tmp_path / "iter_0000010"


def _cut(f, size):
    data = f.read_bytes()
    f.write_bytes(data[:size])


@pytest.mark.parametrize(("name", "damage", "said"), [
    (ck.STATE_FILE, lambda f: _cut(f, 1000), "trainer_state.pt has 1000 bytes"),
    ("torch_engine.pt", lambda f: _cut(f, 0), "torch_engine.pt has 0 bytes"),
    ("rng_rank0.pt", lambda f: f.unlink(), "rng_rank0.pt is missing"),
])
def test_auto_resume_skips_a_damaged_latest_and_an_explicit_one_is_one_line(tmp_path, caplog,
                                                                            name, damage, said):
    older, newest = _two(tmp_path)
    damage(newest / name)
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        assert ck.resolve_resume("auto", tmp_path) == older
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and said in warned[0] and "iter_0000005" in warned[0], warned
    # the run's output_dir given as train.resume: the same fallback
    assert ck.resolve_resume(str(tmp_path), tmp_path / "other") == older
    with pytest.raises(FileNotFoundError) as err:
        ck.resolve_resume(str(newest), tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and said in msg and "iter_0000005" in msg, msg


def test_a_checkpoint_from_before_the_file_list_with_an_empty_file_is_skipped(tmp_path, caplog):
    older, newest = _two(tmp_path)
    for p in (older, newest):  # written by an earlier fastdino: no files.json
        (p / ck.MANIFEST_FILE).unlink()
    _cut(newest / "torch_engine.pt", 0)
    assert ck.resolve_resume("auto", tmp_path) == older
    assert "torch_engine.pt is cut short" in caplog.text


def test_only_damaged_checkpoints_and_no_pointer_stop_instead_of_starting_over(tmp_path):
    """Starting from iteration 0 would replace the checkpoints one by one: the user decides."""
    older, newest = _two(tmp_path)
    (tmp_path / "latest").unlink()
    for p in (older, newest):
        _cut(p / ck.STATE_FILE, 10)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint to resume from .*"
                       "train.resume=none starts over"):
        ck.resolve_resume("auto", tmp_path)
    assert ck.resolve_resume("none", tmp_path) is None


def test_an_empty_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    _, newest = _two(tmp_path)
    (tmp_path / "latest").write_text("")  # a filesystem crash right after the replace
    assert ck.resolve_resume("auto", tmp_path) == newest
    assert "not a checkpoint name" in caplog.text


def test_a_damaged_file_found_while_loading_is_one_line_naming_the_checkpoint(tmp_path):
    """Past the size check (damaged in place, or an older checkpoint loaded directly): a
    ValueError (train.py: one error line, exit 2), not EOFError / torch's zip-reader traceback."""
    _, newest = _two(tmp_path)
    _cut(newest / "torch_engine.pt", 0)
    with pytest.raises(ValueError) as err:
        ck.load_checkpoint(newest, _engine())
    msg = str(err.value)
    assert "\n" not in msg
    assert f"checkpoint {newest} is damaged: the student / optimizer files cannot be read" in msg
    _cut(newest / ck.STATE_FILE, 500)
    with pytest.raises(ValueError, match=f"damaged: {ck.STATE_FILE} cannot be read"):
        ck.load_checkpoint(newest, _engine())


def test_a_rotated_checkpoint_that_cannot_be_deleted_is_a_warning_and_never_a_checkpoint(
        tmp_path, monkeypatch, caplog):
    """train.keep_checkpoints deleting a folder whose files cannot go (held open on a network
    filesystem, read-only): the run goes on with one warning naming it, and what is left is not
    an iter_N folder a resume could fall back to (a trainer_state.pt without its engine file)."""
    eng = _engine()
    ck.save_checkpoint(tmp_path, 5, eng, {"data_iteration": 5}, keep=1)
    real = ck.os.unlink

    def held(path, *a, **k):
        if str(path).endswith(ck.STATE_FILE):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(ck.os, "unlink", held)
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        ck.save_checkpoint(tmp_path, 10, eng, {"data_iteration": 10}, keep=1)
    monkeypatch.undo()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "could not delete checkpoint iter_0000005" in warned[0], warned
    assert "PermissionError" in warned[0]
    assert [p.name for _, p in ck.checkpoint_dirs(tmp_path)] == ["iter_0000010"]
    # the next save removes what is left
    ck.save_checkpoint(tmp_path, 15, eng, {"data_iteration": 15}, keep=1)
    assert not (tmp_path / ck.TRASH).exists()


def test_a_stale_partial_that_cannot_be_deleted_does_not_stop_the_saves(tmp_path, monkeypatch,
                                                                         caplog):
    eng = _engine()
    stale = tmp_path / ".partial" / "iter_0000003"
    stale.mkdir(parents=True)
    (stale / "trainer_state.pt").write_bytes(b"x")
    real = ck.os.unlink

    def held(path, *a, **k):
        if str(path).endswith(ck.STATE_FILE) and k.get("dir_fd") is not None:
            raise OSError(16, "Device or resource busy", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(ck.os, "unlink", held)
    path = ck.save_checkpoint(tmp_path, 5, eng, {"data_iteration": 5}, keep=3)
    monkeypatch.undo()
    assert ck.resolve_resume("auto", tmp_path) == path
    assert "could not delete an earlier save's unfinished files" in caplog.text


def test_every_rank_makes_its_own_files_durable_before_the_checkpoint_is_published(
        tmp_path, monkeypatch):
    """Rank 0's fsync reaches only its own node's cache: on a filesystem that caches writes on
    the writer's node, another node's shard would be lost in a crash after the publication (and
    the rotation of the previous checkpoint). Here as rank 1 of 2 (no rank 0 part)."""
    from fastdino import dist as fdist

    partial = tmp_path / ".partial" / "iter_0000005"
    partial.mkdir(parents=True)  # (rank 0 makes it before the first barrier)

    class Engine:  # DeepSpeed's file names for rank 1's partition
        def save_checkpoint(self, save_dir, tag):
            torch.save({}, partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt")

    synced = []
    monkeypatch.setattr(fdist, "get_rank", lambda: 1)
    monkeypatch.setattr(fdist, "is_main_process", lambda: False)
    monkeypatch.setattr(ck, "_fsync_path", lambda p: synced.append(p.name))
    ck.save_checkpoint(tmp_path, 5, Engine(), {"data_iteration": 5}, keep=3)
    assert sorted(synced) == ["rng_rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
