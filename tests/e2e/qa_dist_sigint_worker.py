"""Worker of tests/e2e/test_qa_dist_checkpoint.py: `fastdino/train.py`'s main() where Ctrl-C is
pressed twice while the checkpoint of iteration `--at` is being written (real SIGINTs to the real
handler; nothing in the trainer is replaced): the second one stops at once, without that
checkpoint.

    python qa_dist_sigint_worker.py --at 4 -- [train.py args]
"""

import argparse
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fastdino import checkpoint, train  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--at", type=int, required=True)
    args, rest = ap.parse_known_args()
    rest = [a for a in rest if a != "--"]
    real = checkpoint.fsync_tree

    def fsync_tree(root):  # the save's files are written, not yet published
        if checkpoint.tag_for(args.at) in str(root):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(root)

    checkpoint.fsync_tree = fsync_tree
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())
