"""What a run leaves when it fails or is killed outside the checkpoint write itself (in-process,
one rank): the end-of-run export and the teacher snapshots are whole or absent, a failed write is
one line, a rerun exports what a killed export did not, and metrics.jsonl has one line per
iteration after a resume that redoes iterations."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer_step import SMALL, SMOKE

from fastdino.checkpoint import CheckpointWriteError
from fastdino.config import load_config
from fastdino.metrics import drop_redone_lines

DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 3234752 vs 3234640"


def _train(run, iters, *extra):
    from fastdino.train import Trainer

    cfg = load_config(SMOKE, [*SMALL, f"train.output_dir={run}", f"train.max_iterations={iters}",
                              "train.log_every=1", *extra])
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def test_an_export_killed_half_way_leaves_no_file_and_the_rerun_exports_it(tmp_path, monkeypatch):
    import fastdino.train as tr

    real = tr.export_backbone

    def killed(ckpt, out):
        targets = real(ckpt, out)
        targets[0].write_bytes(targets[0].read_bytes()[:100])  # the .pth half-written
        targets[1].unlink()
        raise KeyboardInterrupt("killed during the export")  # a second Ctrl-C, the launcher

    monkeypatch.setattr(tr, "export_backbone", killed)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _train(run, 1)
    monkeypatch.undo()
    assert not (run / "teacher_backbone.pth").exists()  # nothing a user would take as the export
    _train(run, 1)  # "nothing to do": the checkpoint is at the last iteration
    sd = torch.load(run / "teacher_backbone.pth", map_location="cpu", weights_only=True)
    assert any(k.startswith("blocks.") for k in sd)
    assert (run / "teacher_backbone.safetensors").is_file()
    assert not (run / ".teacher_backbone.partial").exists()


def test_an_export_on_a_full_disk_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch):
    import fastdino.train as tr

    def full(ckpt, out):
        raise RuntimeError(DISK_FULL)

    monkeypatch.setattr(tr, "export_backbone", full)
    run = tmp_path / "run"
    with pytest.raises(CheckpointWriteError) as err:
        _train(run, 1)
    msg = str(err.value)
    assert "\n" not in msg and "teacher backbone could not be exported" in msg
    assert DISK_FULL in msg and f"the checkpoint {run / 'checkpoints' / 'iter_0000001'}" in msg


def test_a_teacher_snapshot_on_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path,
                                                                              monkeypatch):
    real = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith("teacher_checkpoint.pth.tmp"):
            real(obj, f, *a, **k)
            raise RuntimeError(DISK_FULL)
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    run = tmp_path / "run"
    with pytest.raises(CheckpointWriteError) as err:
        _train(run, 2, "train.teacher_snapshot_every=2", "train.checkpoint_every=1")
    msg = str(err.value)
    assert "\n" not in msg and DISK_FULL in msg
    assert f"teacher snapshot {run / 'eval' / 'training_2' / 'teacher_checkpoint.pth'}" in msg
    assert str(run / "checkpoints" / "iter_0000001") in msg  # where the same command continues
    assert not any((run / "eval" / "training_2").iterdir())


def _iterations(run):
    return [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_resume_that_redoes_iterations_leaves_one_metrics_line_per_iteration(tmp_path):
    run = tmp_path / "run"
    _train(run, 3, "train.checkpoint_every=2")
    assert _iterations(run) == [1, 2, 3]
    # killed after logging iteration 3, before its checkpoint was published
    ck = run / "checkpoints"
    import shutil

    shutil.rmtree(ck / "iter_0000003")
    (ck / "latest").write_text("iter_0000002\n")
    _train(run, 4, "train.checkpoint_every=2")
    assert _iterations(run) == [1, 2, 3, 4]
    kept = list(run.glob("metrics.*.jsonl"))  # the file as it was, nothing thrown away
    assert len(kept) == 1 and [json.loads(x)["iteration"] for x in
                               kept[0].read_text().splitlines()] == [1, 2, 3]


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\n{"iteration": 2}\n{"iterat')
    assert drop_redone_lines(path, 2) == 1
    assert path.read_text() == '{"iteration": 1}\n{"iteration": 2}\n'
    assert drop_redone_lines(path, 2) == 0  # nothing to drop: no second copy
    assert len(list(tmp_path.glob("metrics.*.jsonl"))) == 1


def test_a_metrics_line_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    from pathlib import Path

    from fastdino.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, 10, 0, 8, True, printer=lambda line: None)
    real = Path.open

    def full(self, mode="r", *a, **k):
        if self.name == "metrics.jsonl" and "a" in mode:
            raise OSError(28, "No space left on device")
        return real(self, mode, *a, **k)

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(CheckpointWriteError) as err:
        log.log(1, {"total_loss": 1.0})
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "metrics.jsonl") in msg
    assert "No space left on device" in msg and "train.resume=auto" in msg
