"""iBOT masked-patch loss (SPEC.md §1.4): soft cross-entropy of the student's masked patch tokens
against the teacher's same tokens after Sinkhorn-Knopp (or softmax centering), each token
weighted by 1/(#masked in its image), normalised by the 2B global-crop images (unmasked images
count in the denominator): L = -(1/n_images) Σ_t w_t Σ_k q_tk log softmax(z_t/τ_s)_k.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from fastdino import dist
from fastdino.kernels import dino_loss as dl
from fastdino.kernels.sinkhorn import TeacherTargets
from fastdino.losses.dino_clstoken_loss import soft_ce_rows
from fastdino.losses.teacher_centering import TeacherCentering


@lru_cache(maxsize=8)
def own_row_index(m: int, device: torch.device) -> torch.Tensor:
    """[M, 1] int32: each student token against its own teacher token (M is static per config:
    built once, not one arange launch per step). Read-only."""
    return torch.arange(m, device=device, dtype=torch.int32)[:, None]


class iBOTPatchLoss(TeacherCentering):  # noqa: N801 (paper name)
    """τ_s = student_temp; centering: sinkhorn_knopp | softmax; impl: auto | triton | torch."""

    @torch.no_grad()
    def teacher_targets(self, teacher_patch_logits: torch.Tensor, teacher_temp: float,
                        n_masked_patches: int | torch.Tensor) -> TeacherTargets:
        """Targets of the teacher's masked patch logits [M, K] (no grad). Sinkhorn-Knopp uses
        n_total = all-reduce sum of this rank's `n_masked_patches` (the official SK denominator;
        in DINOv3 M == n_masked_patches, every row is a real masked token)."""
        if dist.get_world_size() == 1 and not torch.is_tensor(n_masked_patches):
            n_total = float(n_masked_patches)  # nothing to reduce, nothing on device
        else:
            # a device tensor (NCCL reduces CUDA tensors) and no .item(): no host sync, no graph
            # break; the SK divides by it as a 0-d tensor, as the official code does
            n_total = torch.as_tensor(n_masked_patches, dtype=torch.float32,
                                      device=teacher_patch_logits.device).reshape(()).clone()
            n_total = dist.all_reduce_sum(n_total)
        return self._normalise(teacher_patch_logits, teacher_temp, n_total=n_total)

    def forward(self, student_patch_logits: torch.Tensor, targets: TeacherTargets,
                masks_weight: torch.Tensor, n_images: int) -> torch.Tensor:
        """student_patch_logits [M, K] (masked tokens, same order as the teacher's),
        masks_weight [M] (1/n_masked of the token's image), n_images = 2B. Returns the scalar."""
        m, k = student_patch_logits.shape
        if m != targets.n_rows or k != self.out_dim:
            raise ValueError(f"student_patch_logits must be [M={targets.n_rows}, K={self.out_dim}]"
                             f", got {tuple(student_patch_logits.shape)}")
        if masks_weight.shape != (m,):
            raise ValueError(f"masks_weight must be [M={m}], got {tuple(masks_weight.shape)}")
        if n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {n_images}")
        index = own_row_index(m, student_patch_logits.device)
        if self._use_triton(student_patch_logits):
            # the weighted sum in the kernels' merge: no torch op or autograd node around them
            (loss,) = dl.dino_soft_ce_sum(student_patch_logits, targets, index,
                                          self.student_temp, masks_weight.reshape(1, m),
                                          scale=1.0 / n_images)
            return loss
        rows = soft_ce_rows(student_patch_logits, targets, index, self.student_temp, fused=False)
        return (rows * masks_weight.float()).sum() / n_images
