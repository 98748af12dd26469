"""The run lock (fastdino/runlock.py) ends with its holder even while a child it forked lives on:
DataLoader workers are forked children, and after a kill -9 of the holder they lingered a few
seconds holding the inherited lock, so an immediate rerun was refused naming the dead pid."""

from __future__ import annotations

import os

from fastdino.runlock import RunLocks


def test_a_forked_child_does_not_keep_the_run_locked(tmp_path):
    started_r, started_w = os.pipe()
    end_r, end_w = os.pipe()
    with RunLocks() as first:
        first.hold(tmp_path)
        pid = os.fork()
        if pid == 0:  # the child (a DataLoader worker): lives until the test is done
            try:
                os.write(started_w, b"s")
                os.read(end_r, 1)
            finally:
                os._exit(0)
    try:
        assert os.read(started_r, 1) == b"s"  # the child runs (its fork is complete)
        with RunLocks() as again:  # the holder has released it; its child still lives
            again.hold(tmp_path)
    finally:
        os.write(end_w, b"e")
        os.waitpid(pid, 0)
        for fd in (started_r, started_w, end_r, end_w):
            os.close(fd)


def test_an_output_dir_that_is_a_file_is_one_config_error(tmp_path):
    import pytest

    from fastdino.config import ConfigError

    (tmp_path / "taken").write_text("not a folder")
    for out in (tmp_path / "taken", tmp_path / "taken" / "run"):
        with pytest.raises(ConfigError, match=r"train.output_dir = .*taken.* cannot be used: "):
            RunLocks().hold(out)
