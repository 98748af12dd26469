"""Homogeneous batches from a second source (the DINOv3 paper §3.1: 10 % of the iterations are
homogeneous ImageNet-1k batches, the rest from the curated mix): `data.homogeneous_root` names
the second source and `data.homogeneous_ratio` the share of steps whose whole global batch comes
from it.

    images = ConcatImages(main, homogeneous)       # one index space: main first
    order = MixedOrder(main_order, homo_order, seed, ratio, batch_size, offset=len(main), gas=gas)

Which source a step reads is drawn from the data seed and the optimizer step (`homogeneous_steps`
of micro_batch // gas, a counter-based hash: vectorised, so positions far into a run are counted
in milliseconds), not the rank: every rank and both loaders (torch, DALI) agree, a resume repeats
it, and the gas micro-batches of one optimizer step (deepspeed.gradient_accumulation_steps) all
read the same source, as crops.resolution_mix's draw (loader.resolution_of). Each source keeps
its own epoch order (`ShardedInfiniteOrder`) and advances only on the micro-batches that read
it: its j-th micro-batch reads its images j·B .. (j+1)·B - 1 (per rank, rank-strided as always).
So an epoch of each source is still a permutation of it, and the augmentation of an image is a
function of (seed, its source epoch, its index in the combined space). An unreadable file is
replaced by the next readable one of the same source.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from fastdino.data.datasets import ImageFolderUnlabeled

_HOMOGENEOUS = 0x486F6D6F  # domain tag of the draw ("Homo")


def homogeneous_steps(seed: int, steps: np.ndarray, ratio: float) -> np.ndarray:
    """bool per step: True where the step reads the homogeneous source. A SplitMix64 hash of
    (seed, tag, step) to a uniform in [0, 1), compared with `ratio`."""
    with np.errstate(over="ignore"):
        x = (np.asarray(steps, dtype=np.uint64)
             + np.uint64((seed * 0x9E3779B97F4A7C15 + _HOMOGENEOUS) % 2**64))
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53 < ratio


class _ConcatNames:
    def __init__(self, a, b) -> None:
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __getitem__(self, i: int) -> str:
        return self.a[i] if i < len(self.a) else self.b[i - len(self.a)]


class ConcatImages:
    """Two image datasets as one index space (the main source first). The ImageFolderUnlabeled
    interface the loaders use; skipping stays inside the part an index belongs to."""

    def __init__(self, main: ImageFolderUnlabeled, homogeneous: ImageFolderUnlabeled) -> None:
        self.parts = (main, homogeneous)
        if main.white_level != homogeneous.white_level:  # one data.white_level for the run
            raise ValueError(f"the main and homogeneous sources decode with other white levels "
                             f"({main.white_level} and {homogeneous.white_level})")
        self.white_level = main.white_level  # data.white_level, as its parts
        self.offset = len(main)
        self.paths = _ConcatNames(main.paths, homogeneous.paths)
        self.source = f"{main.source} + {homogeneous.source} (homogeneous batches)"
        self.skipped: set[str] = set()
        main.skipped = homogeneous.skipped = self.skipped  # one set: the loaders add to it
        self.skip_reasons: dict[str, str] = {}
        main.skip_reasons = homogeneous.skip_reasons = self.skip_reasons

    @property
    def log_skipped(self) -> bool:
        return self.parts[0].log_skipped

    @log_skipped.setter
    def log_skipped(self, value: bool) -> None:
        for part in self.parts:
            part.log_skipped = value

    def __len__(self) -> int:
        return len(self.paths)

    def _part(self, index: int) -> tuple[ImageFolderUnlabeled, int]:
        return (self.parts[0], 0) if index < self.offset else (self.parts[1], self.offset)

    def read(self, index: int) -> bytes:
        part, off = self._part(index)
        return part.read(index - off)

    def decode(self, index: int) -> Image.Image:
        part, off = self._part(index)
        return part.decode(index - off)

    def candidates(self, index: int):
        part, off = self._part(index)
        return (off + i for i in part.candidates(index - off))

    def between(self, index: int, used: int) -> list[str]:
        part, off = self._part(index)
        return part.between(index - off, used - off)

    def load(self, index: int) -> tuple[Image.Image, int, tuple[str, ...]]:
        part, off = self._part(index)
        image, used, skipped = part.load(index - off)
        return image, used + off, skipped


class MixedOrder:
    """The ShardedInfiniteOrder interface (`sample`, `step`, `rank`) over two sources, in loader
    micro-batches: micro-batch m reads the homogeneous source where `homogeneous_steps` says so of
    its optimizer step m // gas (all gas micro-batches of a step alike), the main one otherwise,
    each from its own position (the micro-batches before m that read it)."""

    _CHUNK = 1 << 16

    def __init__(self, main_order, homogeneous_order, seed: int, ratio: float, batch_size: int,
                 offset: int, gas: int = 1) -> None:
        self.orders = (main_order, homogeneous_order)
        self.seed, self.ratio, self.batch_size, self.offset = seed, ratio, batch_size, offset
        self.gas = gas
        self.rank = main_order.rank
        self._homo_before = np.zeros(1, dtype=np.int64)  # [s] = homogeneous optimizer steps < s

    def _count_before(self, step: int) -> int:
        """Homogeneous optimizer steps before optimizer step `step`."""
        while len(self._homo_before) <= step:  # extend the cumulative count a chunk at a time
            n = len(self._homo_before) - 1
            draws = homogeneous_steps(self.seed, np.arange(n, n + self._CHUNK), self.ratio)
            self._homo_before = np.concatenate(
                [self._homo_before, self._homo_before[-1] + np.cumsum(draws)])
        return int(self._homo_before[step])

    def source(self, micro_batch: int) -> int:
        """1 where loader micro-batch `micro_batch` reads the homogeneous source, else 0: the
        draw of its optimizer step, micro_batch // gas."""
        step = micro_batch // self.gas
        return int(homogeneous_steps(self.seed, np.array([step]), self.ratio)[0])

    def sample(self, k: int) -> tuple[int, int]:
        micro_batch, slot = divmod(k, self.batch_size)
        step, within = divmod(micro_batch, self.gas)
        homo = self.source(micro_batch)
        # homogeneous micro-batches before this one: gas per earlier homogeneous step, plus the
        # earlier micro-batches of this step where it is one
        before = self.gas * self._count_before(step) + (within if homo else 0)
        j = before if homo else micro_batch - before  # micro-batches before this that read it
        epoch, index = self.orders[homo].sample(j * self.batch_size + slot)
        return epoch, index + (self.offset if homo else 0)

    def step(self, step: int, batch_size: int) -> list[tuple[int, int]]:
        """The (epoch, index) pairs of loader micro-batch `step` (the loaders' name for it)."""
        return [self.sample(k) for k in range(step * batch_size, (step + 1) * batch_size)]
