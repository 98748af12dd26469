"""fastdino/stop.py: signals become a stop request, handlers are restored, a second Ctrl-C stops at
once, the loader's workers survive the signals a launcher or terminal sends them, and the config
names the allowed signals. (The stop itself, end to end: tests/e2e/test_stop_signal.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fastdino.config import ConfigError, load_config
from fastdino.stop import StopOnSignal, exit_code


def _deliver(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # Python runs the handler at the next bytecode boundary


def test_signal_becomes_a_request_and_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    with StopOnSignal(("SIGUSR1", "SIGINT")) as stop:
        assert stop.requested is None
        _deliver(signal.SIGUSR1)
        assert stop.requested == "SIGUSR1"
        _deliver(signal.SIGUSR1)  # a repeat changes nothing
        assert stop.requested == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            _deliver(signal.SIGINT)  # after a request, Ctrl-C stops at once
    assert signal.getsignal(signal.SIGUSR1) is before
    assert exit_code("SIGUSR1") == 128 + signal.SIGUSR1 and exit_code(None) == 143


def test_no_signals_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal(()) as stop:
        assert signal.getsignal(signal.SIGTERM) is before and stop.requested is None


def test_loader_workers_ignore_stop_signals(tmp_path):
    """A launcher's SIGTERM (sent to every process of the tree) or a terminal's Ctrl-C reaches the
    DataLoader workers too: they must not die of it (the main process would fail at its next
    batch); the main process decides."""
    from fastdino.data import build_train_loader

    cfg = load_config(None, ["data.num_workers=2", "data.batch_size_per_gpu=2",
                             "data.loader=torch", "crops.local_crops_number=2",
                             "crops.global_crops_size=32", "crops.local_crops_size=16",
                             "model.arch=vit_test"])
    loader = build_train_loader(cfg, 0, 1, 0)
    next(loader)
    next(loader)  # one batch from each worker: both have run their init (a signal before it kills)
    workers = loader._it._workers  # the DataLoader iterator's worker processes
    assert len(workers) == 2
    for w in workers:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            os.kill(w.pid, sig)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    next(loader)
    next(loader)


def test_a_crash_with_loader_workers_running_exits(tmp_path):
    """Workers that ignore SIGTERM would keep a crashed run from exiting: multiprocessing's exit
    hook stops live children with SIGTERM and joins them (forever). The loader's process kills
    them first (stop.reap_workers_at_exit); the crash's own exit code and traceback stay."""
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent("""
        from fastdino.config import load_config
        from fastdino.data import build_train_loader

        cfg = load_config(None, ["data.num_workers=2", "data.batch_size_per_gpu=2",
                                 "data.loader=torch", "crops.local_crops_number=2",
                                 "crops.global_crops_size=32", "crops.local_crops_size=16",
                                 "model.arch=vit_test"])
        loader = build_train_loader(cfg, 0, 1, 0)  # a global: alive when the exit hooks run
        next(loader)
        raise RuntimeError("crashed mid-run")
    """))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "RuntimeError: crashed mid-run" in p.stderr, p.stderr[-2000:]
    assert "Exception ignored" not in p.stderr  # no noise from the workers' deaths


def test_config_names_the_allowed_signals():
    with pytest.raises(ConfigError, match=r"train.stop_signals.*SIGTERM, SIGINT, SIGUSR1"):
        load_config(None, ["train.stop_signals=[SIGKILL]"])
    assert load_config(None, ["train.stop_signals=[]"]).train.stop_signals == ()
