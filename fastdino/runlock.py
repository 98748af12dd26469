"""One writer per output folder at a time.

Two runs writing the same `train.output_dir` (the same command started twice, in two terminals or
two queued jobs) would each write checkpoints, `latest` and metrics.jsonl over the other's, and a
resume would then mix the two: a silently corrupted run. The training CLI's rank 0 therefore
holds an exclusive `flock` on `<output_dir>/.run.lock` for as long as it runs (`RunLocks`); a
second run is refused at its start with one line naming the holder (pid, host, start time,
written into the file by the holder). `curate cluster` locks its --out the same way
(`lock_file`).

The lock belongs to the open file, so it ends with the process however the process ends (a
crash or kill -9 leaves no stale lock to clean up). Linux NFS clients carry flock over to the
server's byte-range locks; a filesystem that cannot lock at all (ENOLCK, EOPNOTSUPP) gets a
warning and the run goes on unlocked. Platforms without fcntl (Windows) run unlocked.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import socket
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO

from fastdino.config import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

# The lock files held by this process. A forked child (a DataLoader worker, a multiprocessing
# "fork" process) inherits their descriptors, and an flock lasts until the last descriptor of
# its open file is closed: after a kill -9 of the holder, its orphaned workers (which notice the
# parent's death only every few seconds, or after a slow read) kept the run locked, and an
# immediate rerun was refused naming the dead pid. Children close their copies at once (this
# releases nothing: the parent's descriptor still holds the lock).
_held: weakref.WeakSet = weakref.WeakSet()


def _close_in_child() -> None:
    for f in list(_held):
        try:
            f.close()
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def lock_file(path: Path, refused: Callable[[str], BaseException], what: str) -> IO | None:
    """An exclusive flock on `path` (created, with its folder), held by the returned open file
    until it is closed or the process ends; the holder's pid, host and start are written into
    it. Held elsewhere: raises `refused(<the holder's line>)`. None where nothing can be locked
    (no fcntl; a filesystem without locks, with a warning that no second `what` is stopped)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        if e.errno in _UNSUPPORTED:
            logger.warning("%s: the filesystem cannot lock files (%s), so nothing stops a second "
                           "%s from writing there at the same time", path, os.strerror(e.errno),
                           what)
            return None
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise refused(holder) from None
    f.seek(0)
    f.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
    f.flush()
    _held.add(f)
    return f


class RunLocks:
    """The run locks one CLI call holds, released when it returns (an in-process caller, such as a
    test or a notebook, may then start the same run again, or another process may)."""

    def __init__(self) -> None:
        self._files: list[IO] = []

    def __enter__(self) -> RunLocks:
        return self

    def __exit__(self, *exc) -> None:
        for f in self._files:
            f.close()  # (closing the file releases its flock)
        self._files.clear()

    def hold(self, output_dir: str | Path) -> None:
        """Lock `output_dir` for this run (rank 0 only: the launchers' RANK variable; the other
        ranks share rank 0's run); ConfigError naming the holder if another run has it."""
        if int(os.environ.get("RANK", "0") or 0) != 0:
            return
        out = Path(output_dir)

        def refused(holder: str) -> ConfigError:
            return ConfigError(
                f"train.output_dir = {str(out)!r} is in use by another run ({holder}): two runs "
                "writing the same checkpoints overwrite each other's; wait for it to end, stop "
                "it, or give another train.output_dir")

        try:
            f = lock_file(out / LOCK_FILE, refused, "run")
        except OSError as e:  # a file in the way, read-only: one line, not mkdir's traceback
            raise ConfigError(
                f"train.output_dir = {str(out)!r} cannot be used: {type(e).__name__}: "
                f"{e.strerror or e} ({e.filename or out / LOCK_FILE}); give a writable "
                "folder") from None
        if f is not None:
            self._files.append(f)
