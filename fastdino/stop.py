"""Graceful stop on a signal: finish the current step, write a checkpoint, exit (nothing lost when
a job is preempted, cancelled or interrupted; `train.resume=auto` continues from it).

    with StopOnSignal(cfg.train.stop_signals) as stop:   # Trainer.train
        ...  step(it, ...) reads stop.requested into the step's one reduction ...

Which signals (`train.stop_signals`, default SIGTERM, SIGINT, SIGUSR1):
- SIGTERM: what `scancel`, Kubernetes and the DeepSpeed launcher send first (the launcher sends
  it to every rank and kills them 30 s later: the step and the checkpoint must fit in that);
- SIGUSR1: Slurm's early warning (`#SBATCH --signal=USR1@120`: 120 s before the time limit);
- SIGINT: Ctrl-C. A second Ctrl-C stops at once (KeyboardInterrupt), without a checkpoint.

Ranks receive a signal at different moments (or only some of them do), but a checkpoint is
collective: the local flag rides on the step's existing reduction (the clip norms,
`engine.clip_grad_norms(flags=...)`), so every rank learns in the same step that some rank was
signalled, and all stop after that step. No extra collective and no extra host sync per step.

DataLoader workers ignore these signals (`ignore_in_worker`, their worker_init): a terminal's
Ctrl-C and the launcher's SIGTERM reach the workers too, and a worker that dies makes the main
process fail at its next batch; the workers end with the main process instead. That has one
cost: at interpreter exit, multiprocessing stops the children still alive with SIGTERM and waits
for them, forever for workers that ignore it (a run that crashed with its loader's workers
running would never exit, and hold its GPUs until the job's time limit). `reap_workers_at_exit`,
called by the process that starts such workers, kills them first.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import signal
import threading

logger = logging.getLogger("fastdino")

class NonFiniteLossError(RuntimeError):
    """Raised after `train.max_consecutive_nan` consecutive non-finite steps. (Defined here, not
    in train.py: run as a script that module is `__main__`, and a co-distillation run raises it
    from the `fastdino.train` copy, which `except` in `__main__` would not match.)"""


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")  # allowed names


def parse_signals(names) -> list[signal.Signals]:
    bad = [n for n in names if n not in STOP_SIGNALS]
    if bad:
        raise ValueError(f"train.stop_signals: {bad} unknown; allowed are "
                         + ", ".join(STOP_SIGNALS))
    return [signal.Signals[n] for n in names]


def exit_code(name: str | None) -> int:
    """The shell's code for a run ended by signal `name` (128 + its number; SIGTERM's when the
    signal reached another rank only), so scripts see that the run did not finish."""
    return 128 + int(signal.Signals[name or "SIGTERM"])


class StopOnSignal:
    """Context manager that turns the given signals into a stop request (`requested`: the first
    signal's name, or None) and restores the previous handlers on exit. Outside the main thread
    (where Python cannot install handlers) it installs none and says so."""

    def __init__(self, names=("SIGTERM", "SIGINT", "SIGUSR1")) -> None:
        self.signals = parse_signals(names)
        self.requested: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopOnSignal:
        if not self.signals:
            return self
        if threading.current_thread() is not threading.main_thread():
            logger.info("training outside the main thread: train.stop_signals are not handled")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
            return
        self.requested = name
        again = " (Ctrl-C again stops at once, without one)" if signum == signal.SIGINT else ""
        logger.warning("%s received: stopping after the current step with a checkpoint%s", name,
                       again)


def ignore_in_worker() -> None:
    """For DataLoader workers: leave every stop signal to the main process (module docstring)."""
    for s in parse_signals(STOP_SIGNALS):
        signal.signal(s, signal.SIG_IGN)


_reaper_registered = False


def reap_workers_at_exit() -> None:
    """In the process that starts workers calling `ignore_in_worker`: at interpreter exit, kill
    its multiprocessing children that are still alive (module docstring). Registered once, after
    multiprocessing's own exit hook (atexit runs hooks last-in first-out: this one first).
    A loader closed on the way out (a normal end) has no workers left for it."""
    global _reaper_registered
    if not _reaper_registered:
        atexit.register(_kill_children)
        _reaper_registered = True


def _kill_children() -> None:
    children = multiprocessing.active_children()
    if children and hasattr(signal, "SIGCHLD"):
        # torch's DataLoader handler would raise "worker killed by signal" into this hook
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        p.kill()
    for p in children:
        p.join(timeout=10)
