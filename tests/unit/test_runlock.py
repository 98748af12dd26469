"""One training run per output_dir (fastdino/runlock.py): a second run of the same output_dir is
refused at its start, naming the holder, before it writes anything; the lock ends with its
holder, however that ends (a kill -9 leaves no stale lock)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from fastdino.config import ConfigError
from fastdino.runlock import LOCK_FILE, RunLocks


def test_a_second_holder_is_refused_naming_the_first_until_it_releases(tmp_path):
    with RunLocks() as first:
        first.hold(tmp_path)
        with pytest.raises(ConfigError, match=r"train.output_dir = .* is in use by another run "
                                              r"\(pid \d+ on .*, started "):
            RunLocks().hold(tmp_path)
    with RunLocks() as again:  # released when the first call returned
        again.hold(tmp_path)


def test_the_other_ranks_take_no_lock(tmp_path, monkeypatch):
    with RunLocks() as rank0:
        rank0.hold(tmp_path)
        monkeypatch.setenv("RANK", "1")  # a rank of the same run: rank 0 holds it for all
        RunLocks().hold(tmp_path)


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = ("import sys; from fastdino.runlock import RunLocks; l = RunLocks(); "
            f"l.hold({str(tmp_path)!r}); print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {proc.pid} "):
            RunLocks().hold(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunLocks() as after:
        after.hold(tmp_path)
    assert (tmp_path / LOCK_FILE).read_text().startswith("pid ")


def test_the_training_cli_refuses_a_busy_output_dir_before_writing_anything(tmp_path, caplog):
    from fastdino.train import main

    out = tmp_path / "run"
    with RunLocks() as other:
        other.hold(out)
        rc = main(["--config", "smoke", f"train.output_dir={out}", "train.max_iterations=1"])
    assert rc == 2
    assert "is in use by another run" in caplog.text
    assert not (out / "config.yaml").exists()
