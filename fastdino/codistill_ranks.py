"""Co-distillation with each student on its own ranks (`distillation.student_ranks`; the official
MultiDistillationMetaArch layout, SPEC.md §1.8).

    distillation.students: [students/vitb16.yaml, students/vits16.yaml]
    distillation.student_ranks: [4, 2, 2]        # main student on ranks 0-3, then 4-5, 6-7

Every rank loads its share of the global batch (G = data.batch_size_per_gpu x world images per
micro-batch, one loader over all ranks) and runs the frozen teacher on it: the teacher's
inference is spread over all ranks, once per image. Each student trains on the whole global
batch, split over its own ranks (G / n_s images per rank): `exchange` sends every rank's crops,
masks and teacher bottleneck outputs (the heads' normalised 256-d features before their last
layer: a few hundred bytes per token instead of K logits) to the student ranks whose slice holds
those images, point to point, and each student rank applies the teacher heads' last layers to
its slice. So a rank holds one student (its engine, optimizer and EMA) plus the teacher, and a
student's run is the run its config would give alone on its n_s ranks at G / n_s images per rank
(the losses' Sinkhorn-Knopp sums, gradient reductions, metrics and checkpoints are over its
ranks: fastdino.dist's group).

Traffic per micro-batch: each rank sends its batch once per student and receives its student's
slice (G / n_s images' crops: ~1.5 MB per 224 px image with 8 local crops in fp32), instead of an
all-gather of the global batch to every rank. No host read: when a rank receives whole batches
(n_s divides the world, e.g. [4, 2, 2]) its slice's mask indices are rebuilt at a known count
(`TeacherExchange._count`); other layouts count them with `nonzero`, one sync per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastdino import dist as fdist
from fastdino.config import ConfigError
from fastdino.data.collate import Batch
from fastdino.data.masking import masks_from_bool


def check_layout(students: list[tuple[str, object]], sizes: list[int], batch_size_per_gpu: int,
                 world: int) -> list[int]:
    """Images per rank of each student (G / n_s), after the checks: the rank counts cover the
    world, split the global batch evenly, and no student uses ZeRO-3 (DeepSpeed's ZeRO-3 checks
    its parameter-fetch trace against world rank 0's, a broadcast over every rank: on ranks of
    another student that rank holds another model; ZeRO-1/2 still partition a student's optimizer
    states over its ranks)."""
    names = [name for name, _ in students]
    if sum(sizes) != world:
        raise ConfigError(f"distillation.student_ranks={sizes} sum to {sum(sizes)} ranks but the "
                          f"run has {world}: give one rank count per student ({', '.join(names)})"
                          f" summing to {world}")
    G = batch_size_per_gpu * world
    bad = [f"{name}: {n} ranks" for name, n in zip(names, sizes, strict=True) if G % n]
    if bad:
        raise ConfigError(f"distillation.student_ranks={sizes}: the global batch of {G} images "
                          f"(data.batch_size_per_gpu={batch_size_per_gpu} x {world} ranks) does "
                          f"not split evenly over {', '.join(bad)}")
    zero3 = [name for name, c in students if c.deepspeed.zero_stage == 3]
    if zero3:
        raise ConfigError(f"distillation.student_ranks: student {', '.join(zero3)} has deepspeed."
                          "zero_stage=3, which cannot train on a rank range of its own (DeepSpeed "
                          "checks ZeRO-3's parameter fetches against world rank 0): use stage 1 "
                          "or 2 (its optimizer states are still partitioned over its ranks), or "
                          "leave distillation.student_ranks empty")
    return [G // n for n in sizes]


@dataclass(frozen=True)
class Piece:
    """Global images [lo, hi) moving from rank `src` to rank `dst`."""
    src: int
    dst: int
    lo: int
    hi: int


def plan(sizes: list[int], batch_size_per_gpu: int) -> list[Piece]:
    """Every transfer of one micro-batch: rank r holds global images [r·B, (r+1)·B); rank j of
    student s (its ranks start at a_s) trains on images [j·m_s, (j+1)·m_s), m_s = G / n_s. Sorted
    by destination, then image: a rank's pieces in that order concatenate to its slice."""
    B, world = batch_size_per_gpu, sum(sizes)
    pieces, start = [], 0
    for n in sizes:
        m = B * world // n
        for j in range(n):
            lo, hi = j * m, (j + 1) * m
            for src in range(lo // B, (hi - 1) // B + 1):
                pieces.append(Piece(src, start + j, max(lo, src * B), min(hi, (src + 1) * B)))
        start += n
    return sorted(pieces, key=lambda p: (p.dst, p.lo))


def _rows(x: torch.Tensor, n_crops: int, lo: int, hi: int) -> torch.Tensor:
    """Images [lo, hi) (this rank's indices) of crop-major rows x [n_crops·B, ...], as
    [n_crops, hi - lo, ...]."""
    return x.view(n_crops, -1, *x.shape[1:])[:, lo:hi].contiguous()


class TeacherExchange:
    """The teacher's forward on this rank's batch and the exchange that gives this rank its
    student's slice of the global batch with the teacher's outputs on it (module docstring).
    `__call__(batch)` returns the slice's `Batch`; its outputs are kept in `shared` (a
    codistill.SharedTeacher), where the student's teacher_forward finds them."""

    def __init__(self, shared, sizes: list[int], batch_size_per_gpu: int, amp: bool):
        self.shared, self.amp, self.B = shared, amp, batch_size_per_gpu
        with fdist.world():
            self.rank = fdist.get_rank()
        self.pieces = plan(sizes, batch_size_per_gpu)
        # Whole batches only (every piece this rank receives is a sending rank's whole batch,
        # e.g. student_ranks [4, 2, 2]: n_s divides the world): the slice holds n_whole x M masked
        # tokens, M being every rank's own (a constant of the config, data/masking.py), so its
        # mask indices need no host read of the received masks (`_count`).
        mine = [p for p in self.pieces if p.dst == self.rank]
        self.n_whole = len(mine) if all(p.hi - p.lo == self.B for p in mine) else None
        self._checked: set[int] = set()  # the local M values whose slice count was verified

    @torch.no_grad()
    def bottlenecks(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher heads' normalised bottleneck features on this rank's global crops: CLS
        [2B, d_dino] and every patch [2B, N, d_ibot] (the student ranks pick the masked ones)."""
        teacher = self.shared.teacher
        with torch.autocast("cuda", dtype=torch.bfloat16,
                            enabled=batch.global_crops.is_cuda and self.amp):
            g = teacher.backbone.forward_features(batch.global_crops.to(teacher.compute_dtype))
            cls = teacher.dino_head(g["x_norm_clstoken"], no_last_layer=True)
            patches = g["x_norm_patchtokens"]
            bn = teacher.ibot_head(patches.flatten(0, 1), no_last_layer=True)
        self.shared.forwards += 1
        return cls, bn.view(*patches.shape[:2], -1)

    def __call__(self, batch: Batch) -> Batch:
        if batch.gram_crops is not None:  # config.validate: distillation has no Gram loss
            raise ValueError("co-distillation batches carry no Gram crops")
        cls, patch = self.bottlenecks(batch)
        n_local = batch.local_crops.shape[0] // batch.n_images
        fields = [(batch.global_crops, 2), (batch.local_crops, n_local),
                  (batch.masks.to(torch.uint8), 2), (cls, 2), (patch, 2)]  # (gloo: no bool)
        got = self._send_receive(fields)
        global_crops, local_crops, masks, cls, patch = (torch.cat(parts, 1).flatten(0, 1)
                                                        for parts in got)
        count = self._count(batch)
        m = masks_from_bool(masks.bool(), count)
        if count is None and self.n_whole is not None:  # first slice at this M: count verified
            M = batch.mask_indices.numel()
            if m.mask_indices.numel() == self.n_whole * M:
                self._checked.add(M)
            else:  # ranks with different M (not a loader's batches): read the count each time
                self.n_whole = None
        teacher = self.shared.teacher
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16,
                                             enabled=global_crops.is_cuda and self.amp):
            out = {"cls_logits": teacher.dino_head(cls, only_last_layer=True),
                   "patch_logits": teacher.ibot_head(
                       patch.flatten(0, 1).index_select(0, m.mask_indices), only_last_layer=True),
                   "patches": None}
        mine = Batch(global_crops=global_crops, local_crops=local_crops, masks=m.masks,
                     mask_indices=m.mask_indices, masks_weight=m.masks_weight,
                     n_masked_patches=m.n_masked_patches, gram_crops=None,
                     n_images=global_crops.shape[0] // 2, skipped_files=batch.skipped_files,
                     skipped_reasons=batch.skipped_reasons)
        self.shared.put(mine.global_crops, mine.mask_indices, out)
        return mine

    def _count(self, batch: Batch) -> int | None:
        """The slice's number of masked tokens when known without reading the device (whole
        batches, at a local M already verified once); None: `nonzero` counts them (a sync)."""
        M = batch.mask_indices.numel()
        return self.n_whole * M if self.n_whole is not None and M in self._checked else None

    def _send_receive(self, fields: list[tuple[torch.Tensor, int]]) -> list[list[torch.Tensor]]:
        """For each (crop-major tensor, crops per image) of `fields`, the [crops, n, ...] pieces
        of this rank's slice, in image order. Point to point over the world; a piece that stays on
        this rank is copied."""
        me, B = self.rank, self.B
        got: list[list[torch.Tensor]] = [[] for _ in fields]
        ops = []
        for p in self.pieces:
            if p.src == me:
                lo, hi = p.lo - me * B, p.hi - me * B
                parts = [_rows(x, c, lo, hi) for x, c in fields]
                if p.dst == me:
                    for k, part in enumerate(parts):
                        got[k].append(part)
                else:
                    ops += [dist.P2POp(dist.isend, part, p.dst) for part in parts]
            elif p.dst == me:
                for k, (x, c) in enumerate(fields):
                    buf = x.new_empty((c, p.hi - p.lo, *x.shape[1:]))
                    got[k].append(buf)
                    ops.append(dist.P2POp(dist.irecv, buf, p.src))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return got
