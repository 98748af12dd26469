"""Which rank prints which log line, so that a 256-rank run logs each thing once.

Most of what fastdino logs holds on every rank alike: the config, the schedule, the checkpoint
every rank resumes (rank 0 resolves it for all), a health finding computed from reduced values. Such
lines print from rank 0 of the training group only, warnings included: printed by every rank they
come 256 times at 256 ranks, and the one line that differs drowns.

A few warnings are about one rank's own condition: an unreadable image in its shard of the data, a
rank waiting on rank 0. They are logged with `extra=EVERY_RANK` and print from the rank they
happen on, tagged "[rank N]" (the world rank, as the launcher and the scheduler name it). Errors
print from every rank, tagged the same way: a rank that fails alone must be seen.

Before the process group starts every rank counts as rank 0 (`fdist.is_main_process`), so a
config error says itself on each rank of a launch that never got going.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from fastdino import dist as fdist

EVERY_RANK = {"every_rank": True}  # logger.warning(..., extra=EVERY_RANK)


def _world_rank() -> int:
    return dist.get_rank() if fdist.is_enabled() else 0


class MainRankInfo(logging.Filter):
    """Passes every line on rank 0 of the training group (world rank 0, or each co-distillation
    student's own rank 0 after `fdist.split`); on the other ranks only errors and EVERY_RANK
    warnings. Those are tagged with the world rank wherever it is not 0, a student's rank 0
    included (two students' lines about their own shards must not read the same). Asked at
    each line, so the group in force decides."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.levelno >= logging.ERROR or getattr(record, "every_rank", False)
        if not own:
            return fdist.is_main_process()
        if not getattr(record, "rank_tagged", False):  # one record can pass several handlers
            rank = _world_rank()
            if rank != 0:
                record.msg = f"[rank {rank}] {record.msg}"
            record.rank_tagged = True
        return True


def install() -> None:
    """Adds the filter to every root handler (once: main() can run twice in one process)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, MainRankInfo) for f in handler.filters):
            handler.addFilter(MainRankInfo())
