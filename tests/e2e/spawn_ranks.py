"""Run a gloo worker on N spawned CPU ranks, tolerating only gloo's teardown abort.

gloo's pair threads can abort a process ('terminate called without an active exception',
SIGABRT) while the group is destroyed at exit, when the peer rank has already gone: seen once in
CI on tests/e2e/test_koleo_distributed.py after both ranks had saved their results and passed the
final barrier. That is not what these tests check, so a rank that wrote its `done` marker (after
its results and the barrier) and then died of SIGABRT counts as finished; any other failure, or
a missing marker, fails the test as before.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch.multiprocessing as mp


def mark_done(out_dir: str, rank: int) -> None:
    """Call after the results are saved and the final barrier has passed."""
    Path(out_dir, f"rank{rank}.done").touch()


def spawn_ranks(worker, args: tuple, nprocs: int, out_dir: str) -> None:
    """mp.spawn(worker, args, nprocs); worker(rank, *args) must call mark_done(out_dir, rank)."""
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    while True:
        try:
            if ctx.join():
                return
        except mp.ProcessExitedException as e:
            done = all(Path(out_dir, f"rank{r}.done").exists() for r in range(nprocs))
            if not (done and e.exit_code == -signal.SIGABRT):
                raise
            for p in ctx.processes:  # the other ranks finished their work too: let them exit
                p.join(timeout=30)
            return
