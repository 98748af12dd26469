"""An explicit train.resume goes back to that checkpoint at every start: the same command started
again (a requeued job) silently redid the run's own later checkpoints and dropped their metrics
lines. resolve_resume now says so when the output_dir holds later checkpoints."""

from __future__ import annotations

import json
import logging

import torch

from fastdino.checkpoint import MANIFEST_FILE, STATE_FILE, resolve_resume, tag_for


def _checkpoint(ckpt_dir, iteration):
    folder = ckpt_dir / tag_for(iteration)
    folder.mkdir(parents=True)
    torch.save({"iteration": iteration}, folder / STATE_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(
        {STATE_FILE: (folder / STATE_FILE).stat().st_size}))
    (ckpt_dir / "latest").write_text(folder.name + "\n")
    return folder


def test_an_explicit_resume_behind_the_runs_own_checkpoints_is_said(tmp_path, caplog):
    source = _checkpoint(tmp_path / "pretrain" / "checkpoints", 100)
    own = tmp_path / "run" / "checkpoints"
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        assert resolve_resume(str(tmp_path / "pretrain"), own) == source  # the first start
    assert "later checkpoints" not in caplog.text
    _checkpoint(own, 120)
    _checkpoint(own, 140)  # the run went on; the same command is started again
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        assert resolve_resume(str(tmp_path / "pretrain"), own) == source
        assert resolve_resume(str(own / tag_for(120)), own) == own / tag_for(120)  # a rewind
    assert caplog.text.count("holds later checkpoints (up to iter_0000140)") == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdino"):  # its own newest: nothing to say
        assert resolve_resume(str(own / tag_for(140)), own) == own / tag_for(140)
        assert resolve_resume(str(own.parent), own) == own / tag_for(140)
    assert "later checkpoints" not in caplog.text
