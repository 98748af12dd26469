"""Per-phase step timing: `with timer("student_forward"): ...`. Used by train.py (phases of one
step) and by `fastdino profile` (the step-time breakdown). Synchronises CUDA at phase boundaries
only when `sync=True`, so normal training is not slowed down."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, phase: str):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.totals[phase] += time.perf_counter() - t0
            self.counts[phase] += 1

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()

    def mean_seconds(self) -> dict[str, float]:
        return {k: self.totals[k] / max(1, self.counts[k]) for k in self.totals}


class NullTimer(PhaseTimer):
    """A timer that records nothing (the default in train.py)."""

    @contextmanager
    def __call__(self, phase: str):
        yield
