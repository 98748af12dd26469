"""The teacher exchange of co-distillation with students on their own ranks
(fastdino/codistill_ranks.py), on 3 gloo CPU ranks with student_ranks [2, 1] and 2 images per
rank: the first student's ranks train on 3 images each (each slice spans two ranks' batches), the
second's single rank on all 6. Every rank's slice must be the global batch's images in order
(crops, masks, mask indices and weights as one collate of them would give) with the teacher's
outputs equal to the teacher's forward on that slice, from one teacher forward per rank."""

from __future__ import annotations

import os

import torch
from spawn_ranks import mark_done, spawn_ranks
from trainer_helpers import SMOKE, _free_port

from fastdino.data.collate import Batch
from fastdino.data.masking import masks_from_bool

SIZES, B, N_LOCAL, WORLD = [2, 1], 2, 3, 3


def _teacher():
    from fastdino.config import load_config
    from fastdino.meta_arch import build_student

    cfg = load_config(SMOKE, ["dino.head.n_prototypes=96", "ibot.head.n_prototypes=80",
                              "model.depth=2"])
    torch.manual_seed(0)  # the same teacher on every rank
    t = build_student(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # far from the init (layer scale 1e-5, 0.02 heads): outputs that
        for p in t.parameters():  # differ from image to image, so a mix-up shows
            p.add_(0.3 * torch.randn_like(p))
    t.compute_dtype = torch.float32
    return t


def _local_batch(rank: int) -> Batch:
    """Rank `rank`'s batch: random crops and masks (16 patches per 64 px global crop)."""
    g = torch.Generator().manual_seed(100 + rank)
    masks = torch.rand(2 * B, 16, generator=g) < 0.4
    m = masks_from_bool(masks)
    return Batch(global_crops=torch.randn(2 * B, 3, 64, 64, generator=g),
                 local_crops=torch.randn(N_LOCAL * B, 3, 32, 32, generator=g), masks=m.masks,
                 mask_indices=m.mask_indices, masks_weight=m.masks_weight,
                 n_masked_patches=m.n_masked_patches, gram_crops=None, n_images=B)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as tdist

    from fastdino import dist as fdist
    from fastdino.codistill import SharedTeacher
    from fastdino.codistill_ranks import TeacherExchange

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=WORLD)
    try:
        index = fdist.split(SIZES)
        shared = SharedTeacher(_teacher(), capacity=1)
        mine = TeacherExchange(shared, SIZES, B, amp=False)(_local_batch(rank))
        out = shared.teacher_forward(mine.global_crops, mine.mask_indices)  # the kept outputs
        torch.save({"index": index, "group_rank": fdist.get_rank(), "forwards": shared.forwards,
                    "batch": {k: getattr(mine, k) for k in ("global_crops", "local_crops", "masks",
                                                            "mask_indices", "masks_weight",
                                                            "n_masked_patches", "n_images")},
                    "cls": out["cls_logits"], "patch": out["patch_logits"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        tdist.barrier()
        mark_done(out_dir, rank)
    finally:
        tdist.destroy_process_group()


def _images(x: torch.Tensor, n_crops: int, lo: int, hi: int) -> torch.Tensor:
    """Global images [lo, hi) of the ranks' crop-major tensors concatenated image-wise."""
    return x.view(n_crops, -1, *x.shape[1:])[:, lo:hi].flatten(0, 1)


def test_each_rank_gets_its_students_slice_with_the_teachers_outputs(tmp_path):
    spawn_ranks(_worker, (_free_port(), str(tmp_path)), WORLD, str(tmp_path))
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    batches = [_local_batch(r) for r in range(WORLD)]

    def cat(field, n_crops):  # the global batch, crop-major: [n_crops, 6 images, ...]
        return torch.cat([getattr(b, field).view(n_crops, B, *getattr(b, field).shape[1:])
                          for b in batches], 1).flatten(0, 1)

    full = {"global_crops": cat("global_crops", 2), "local_crops": cat("local_crops", N_LOCAL),
            "masks": cat("masks", 2)}
    teacher = _teacher()
    slices = [(0, 0, 3), (0, 3, 6), (1, 0, 6)]  # (student, lo, hi) of ranks 0, 1, 2
    for r, (student, lo, hi) in enumerate(slices):
        got = res[r]
        assert got["index"] == student and got["forwards"] == 1  # one forward, on its own batch
        assert got["group_rank"] == (r if student == 0 else 0)
        b = got["batch"]
        assert b["n_images"] == hi - lo
        assert torch.equal(b["global_crops"], _images(full["global_crops"], 2, lo, hi))
        assert torch.equal(b["local_crops"], _images(full["local_crops"], N_LOCAL, lo, hi))
        m = masks_from_bool(_images(full["masks"], 2, lo, hi))
        for k in ("masks", "mask_indices", "masks_weight", "n_masked_patches"):
            assert torch.equal(b[k], getattr(m, k)), (r, k)
        want = teacher.teacher_forward(b["global_crops"], m.mask_indices)
        torch.testing.assert_close(got["cls"], want["cls_logits"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["patch"], want["patch_logits"], rtol=1e-5, atol=1e-6)
