"""A dense probe's head saved while it trains, so that an interrupted probe continues and a
finished one is evaluated again without training (`fastdino eval seg|depth --output-dir DIR`).

The official ADE20k / NYU probes train for 40k / 38.4k iterations, hours of a frozen ViT-L's
forward: `DIR/head.pt` holds {"key", "step", "head", "optimizer"}, written atomically (a temporary
file, then a rename) every `every` steps and at the end. `key` is what makes the head this
probe's: the task, the backbone's weights digest and every setting of the fit (classes, crop,
iterations, batch, lr, seed, ...); a file written under another key is never resumed or
overwritten: the run stops naming the keys that differ.

A resumed fit continues the head, the optimizer moments and the lr schedule at the saved step;
its batches after the resume are drawn afresh (the shuffle is seeded by the seed and the step,
the augmentations by the workers' seeds): not bit for bit the uninterrupted fit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("fastdino.eval")
FILE = "head.pt"


class HeadCheckpoint:
    def __init__(self, folder: str | Path, key: dict, every: int = 500):
        if every <= 0:
            raise ValueError(f"--checkpoint-every {every} is invalid: allowed is an integer > 0")
        self.path, self.key, self.every = Path(folder) / FILE, dict(key), every

    def load(self, head: nn.Module, opt: torch.optim.Optimizer) -> int:
        """The saved step (0 when there is no file), with head and optimizer restored."""
        if not self.path.is_file():
            return 0
        st = torch.load(self.path, map_location="cpu", weights_only=True)
        saved = st.get("key", {})
        if saved != self.key:
            diff = ", ".join(f"{k}: {saved.get(k, '<absent>')!r} there, {self.key.get(k)!r} now"
                             for k in sorted(set(saved) | set(self.key))
                             if saved.get(k) != self.key.get(k))
            raise ValueError(f"{self.path} holds a head of another probe ({diff}): use another "
                             "--output-dir, or remove the file to train anew")
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["optimizer"])
        logger.info("%s: resumed the head at step %d of %d", self.path, st["step"],
                    self.key.get("iterations", -1))
        return int(st["step"])

    def due(self, step: int, iterations: int) -> bool:
        return step == iterations or step % self.every == 0

    def save(self, head: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".pt.tmp")
        torch.save({"key": self.key, "step": step, "head": head.state_dict(),
                    "optimizer": opt.state_dict()}, tmp)
        os.replace(tmp, self.path)


def head_checkpoint(output_dir: str | Path | None, every: int, task: str, weights: str,
                    train_digest: str, **settings) -> HeadCheckpoint | None:
    """The checkpoint of a probe saved under `output_dir` (None: not saved), keyed by its task,
    its backbone's weights digest, its training pairs' digest and every setting of the fit."""
    if output_dir is None:
        return None
    return HeadCheckpoint(output_dir, dict(task=task, weights=weights, train=train_digest,
                                           **settings), every)
