"""Worker of tests/e2e/test_qa_dist_failures.py: `fastdino/train.py`'s main() where one rank alone
meets a config error in the middle of a run (as a data folder missing on one node only would),
while the other rank goes on into the next step's collectives:

    deepspeed --num_gpus 2 qa_dist_rank_error_worker.py --at 2 --rank 1 -- [train.py args]

Before iteration `--at`, rank `--rank` raises ConfigError from its loader (`micro_batches`)."""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fastdino import train  # noqa: E402
from fastdino.config import ConfigError  # noqa: E402

MESSAGE = "data.root='/mnt/node1/images' does not exist (injected on one rank)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--at", type=int, required=True)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--local_rank", type=int, default=0)
    args, rest = ap.parse_known_args()
    rest = [a for a in rest if a != "--"]
    real = train.Trainer.micro_batches

    def micro_batches(self, loader):
        if self.micro_batch == args.at and self.info.rank == args.rank:
            raise ConfigError(MESSAGE)
        yield from real(self, loader)

    train.Trainer.micro_batches = micro_batches
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())
