"""Worker of tests/e2e/test_stop_signal.py: `fastdino/train.py`'s main() with one rank sending
itself a signal in the middle of a step, as a scheduler would (a real signal, delivered to the
real handler; nothing in the trainer is replaced):

    python|deepspeed ... stop_signal_worker.py --signal SIGTERM --at 2 --rank 1 -- [train.py args]

At iteration `--at` on rank `--rank`, between the student forward and the clip (where a signal
lands at an arbitrary moment of a real step), the process calls os.kill(getpid(), signal).
"""

import argparse
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fastdino import train  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--signal", required=True)
    ap.add_argument("--at", type=int, required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--local_rank", type=int, default=0)
    args, rest = ap.parse_known_args()
    rest = [a for a in rest if a != "--"]
    real_step = train.Trainer.step

    def step(self, it, batches):
        if it == args.at and self.info.rank == args.rank:
            os.kill(os.getpid(), signal.Signals[args.signal])
        return real_step(self, it, batches)

    train.Trainer.step = step
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())
