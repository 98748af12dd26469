"""DINO CLS-token loss (SPEC.md §1.2): soft cross-entropy of every student crop against the
teacher's normalised global crops (Sinkhorn-Knopp or softmax centering, see teacher_centering.py).

Pairing (crop-major rows, B images per rank): student global crop g ∈ {0, 1} against teacher crop
1-g only (the diagonal is ignored, as in every official config); every student local crop against
both teacher crops. Weighting as `compute_losses`: n_g(n_g-1) = 2 global and n_g·n_l = 16 local
pair terms, dino_loss = (2·global + 16·w_local·local) / 18 at n_l = 8.

impl = torch runs the references of kernels/sinkhorn.py and kernels/dino_loss.py; impl = triton
runs the fused kernels, which never hold N×K teacher probabilities in memory. The trainer calls
`forward_joint` with the head's logits of all crops in one tensor: one soft-CE launch for both
crop types, and no slicing of the head output in the autograd graph.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from fastdino.kernels import dino_loss as dl
from fastdino.kernels.sinkhorn import TeacherTargets
from fastdino.losses.teacher_centering import TeacherCentering

N_GLOBAL = 2  # global crops per image (the pairing below is written for two)


# The pairings depend on (B, n_local, device) only: built once, not with ~8 small ops (host time
# and launches) per step. Read-only: the loss never writes them.
@lru_cache(maxsize=32)
def global_pair_index(batch: int, device: torch.device) -> torch.Tensor:
    """[2B, 1] int32: student global row g·B + b -> teacher row (1-g)·B + b."""
    b = torch.arange(batch, device=device, dtype=torch.int32)
    return torch.cat([b + batch, b]).reshape(-1, 1)


@lru_cache(maxsize=32)
def local_pair_index(batch: int, n_local: int, device: torch.device) -> torch.Tensor:
    """[n_local·B, 2] int32: student local row l·B + b -> teacher rows b and B + b."""
    b = torch.arange(batch, device=device, dtype=torch.int32)
    return torch.stack([b, b + batch], dim=1).repeat(n_local, 1)


@lru_cache(maxsize=32)
def joint_pair_index(batch: int, n_local: int, device: torch.device) -> torch.Tensor:
    """[2B + n_local·B, 2] int32: the global rows' pairing (second slot -1: no pair), then the
    local rows', for one soft-CE launch over all the student crops (`DINOLoss.forward_joint`)."""
    g = global_pair_index(batch, device)
    return torch.cat([torch.cat([g, torch.full_like(g, -1)], dim=1),
                      local_pair_index(batch, n_local, device)])


@lru_cache(maxsize=32)
def joint_loss_weights(batch: int, n_local: int, local_loss_weight: float,
                       device: torch.device) -> torch.Tensor:
    """[3, 2B + n_local·B] fp32: the rows' weights in (dino_loss, global, local) of
    `forward_joint`, i.e. `_combine`'s formula over the per-row losses: global = mean of the 2B
    global rows, local = mean of the local rows / N_GLOBAL (each holds N_GLOBAL pair terms),
    dino_loss = (gt·global + lt·w·local) / (gt + lt). The fused loss sums them in-kernel."""
    gt, lt = N_GLOBAL * (N_GLOBAL - 1), N_GLOBAL * n_local
    w_global, w_local = 1.0 / (N_GLOBAL * batch), 1.0 / (n_local * batch * N_GLOBAL)
    n_g, n_l = N_GLOBAL * batch, n_local * batch
    w = torch.zeros(3, n_g + n_l, dtype=torch.float64)
    w[0, :n_g] = gt / (gt + lt) * w_global
    w[0, n_g:] = lt * local_loss_weight / (gt + lt) * w_local
    w[1, :n_g] = w_global
    w[2, n_g:] = w_local
    return w.to(device=device, dtype=torch.float32)


def soft_ce_rows(student_logits: torch.Tensor, targets: TeacherTargets,
                 teacher_index: torch.Tensor, student_temp: float, fused: bool) -> torch.Tensor:
    """Per-row loss [R] fp32 through the fused kernel or the reference."""
    if fused:
        return dl.dino_soft_ce(student_logits, targets, teacher_index, student_temp)
    return dl.dino_soft_ce_ref(student_logits, targets.materialize(), teacher_index, student_temp)


class DINOLoss(TeacherCentering):
    """τ_s = student_temp; centering: sinkhorn_knopp | softmax; impl: auto | triton | torch."""

    @torch.no_grad()
    def teacher_targets(self, teacher_cls_logits: torch.Tensor,
                        teacher_temp: float) -> TeacherTargets:
        """Teacher targets of the 2B teacher global-crop CLS logits [2B, K] (no grad).
        Sinkhorn-Knopp uses n_total = 2B·world."""
        if teacher_cls_logits.shape[0] % N_GLOBAL:
            raise ValueError(f"teacher_cls_logits must hold {N_GLOBAL}·B rows (crop-major), got "
                             f"{teacher_cls_logits.shape[0]}")
        return self._normalise(teacher_cls_logits, teacher_temp, n_total=None)

    def forward(self, student_global_logits: torch.Tensor,
                student_local_logits: torch.Tensor | None, targets: TeacherTargets,
                local_loss_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """student_global_logits [2B, K] (from the masked global crops), student_local_logits
        [n_l·B, K] (or None / 0 rows), targets from `teacher_targets` ([2B, K])."""
        batch, k = self._check_global(student_global_logits, targets)
        fused = self._use_triton(student_global_logits)
        dev = student_global_logits.device  # hashable: the pairing cache key

        rows_g = soft_ce_rows(student_global_logits, targets, global_pair_index(batch, dev),
                              self.student_temp, fused)
        # mean of the 2B cross pairs (one row each): one reduction launch, not a sum and a divide
        global_loss = rows_g.mean()

        n_l = 0 if student_local_logits is None else student_local_logits.shape[0] // batch
        if n_l:
            if student_local_logits.shape != (n_l * batch, k):
                raise ValueError(f"student_local_logits must be [n_l·B (B={batch}), K={k}], got "
                                 f"{tuple(student_local_logits.shape)}")
            rows_l = soft_ce_rows(student_local_logits, targets,
                                  local_pair_index(batch, n_l, dev), self.student_temp, fused)
            local_loss = rows_l.mean() / N_GLOBAL  # each row holds its N_GLOBAL pair terms
        else:
            local_loss = global_loss.new_zeros(())
        return self._combine(global_loss, local_loss, n_l, local_loss_weight)

    def forward_joint(self, student_logits: torch.Tensor, targets: TeacherTargets,
                      local_loss_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """The same losses from the student's DINO logits of all crops in one tensor,
        [2B + n_l·B, K] crop-major (the 2B global rows first), as the head produces them.

        Triton: one soft-CE launch (and one backward) over every row with the joint pairing
        (`joint_pair_index`), instead of one per crop type; and the gradient reaches the head's
        output as one tensor: slicing it into global and local views would cost, in the
        backward, a zero-filled [rows, K] buffer per view and their sum (~0.5 GB of traffic per
        step at ViT-L shapes, K = 65,536). The three losses are weighted sums of the rows
        (`joint_loss_weights`) taken in the kernels' merge, so no torch op or autograd node
        surrounds them (3 launches forward and backward: this loss is host-bound).
        torch: the two reference calls on the row blocks."""
        two_b = targets.n_rows
        if student_logits.dim() != 2 or student_logits.shape[0] < two_b:
            raise ValueError(f"student_logits must be [2B + n_l·B, K] with the 2B = {two_b} "
                             f"global rows first, got {tuple(student_logits.shape)}")
        glob, loc = student_logits[:two_b], student_logits[two_b:]
        batch, _ = self._check_global(glob, targets)
        if loc.shape[0] % batch:
            raise ValueError(f"student_logits holds {loc.shape[0]} local rows, not a multiple of "
                             f"B = {batch}")
        n_l = loc.shape[0] // batch
        if not (n_l and self._use_triton(student_logits)):
            return self.forward(glob, loc if n_l else None, targets, local_loss_weight)
        dev = student_logits.device
        dino, glob, loc = dl.dino_soft_ce_sum(
            student_logits, targets, joint_pair_index(batch, n_l, dev), self.student_temp,
            joint_loss_weights(batch, n_l, float(local_loss_weight), dev))
        return {"dino_global_crops_loss": glob, "dino_local_crops_loss": loc, "dino_loss": dino}

    def _check_global(self, student_global_logits: torch.Tensor,
                      targets: TeacherTargets) -> tuple[int, int]:
        two_b, k = student_global_logits.shape
        if two_b != targets.n_rows or two_b % N_GLOBAL or k != self.out_dim:
            raise ValueError(f"student_global_logits must be [2B={targets.n_rows}, "
                             f"K={self.out_dim}], got {tuple(student_global_logits.shape)}")
        return two_b // N_GLOBAL, k

    @staticmethod
    def _combine(global_loss: torch.Tensor, local_loss: torch.Tensor, n_l: int,
                 local_loss_weight: float) -> dict[str, torch.Tensor]:
        global_terms = N_GLOBAL * (N_GLOBAL - 1)
        local_terms = N_GLOBAL * n_l
        # (global_terms·global + local_terms·w·local) / (global_terms + local_terms), in two
        # launches (an add with alpha and a scale) instead of five: this loss is host-bound
        dino_loss = torch.add(global_loss, local_loss,
                              alpha=local_terms * local_loss_weight / global_terms) \
            * (global_terms / (global_terms + local_terms))
        return {"dino_global_crops_loss": global_loss, "dino_local_crops_loss": local_loss,
                "dino_loss": dino_loss}
