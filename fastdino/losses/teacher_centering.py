"""Teacher normalisation shared by DINOLoss and iBOTPatchLoss (SPEC.md §1.1, §1.2, §10.2):
Sinkhorn-Knopp (DINOv3 default) or DINOv2 softmax centering with a lazily applied EMA center.

The center is a [1, K] buffer (zeros and unused under Sinkhorn-Knopp, kept so state dicts match
the official ones). Softmax centering uses the center of the *previous* call and then records
this batch's mean, applied at the next call: exactly DINOv2's asynchronous update, made
synchronous through fastdino.dist (no torch.distributed import here).
"""

from __future__ import annotations

import torch
from torch import nn

from fastdino import dist
from fastdino.kernels import sinkhorn as sk
from fastdino.layers.select import use_triton

CENTERINGS = ("sinkhorn_knopp", "softmax")


class TeacherCentering(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1,
                 centering: str = "sinkhorn_knopp", center_momentum: float = 0.9,
                 sk_iterations: int = 3, impl: str = "auto"):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering = {centering!r} is invalid: allowed is one of "
                             f"{' | '.join(CENTERINGS)}")
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1), got {center_momentum}")
        if sk_iterations < 1:
            raise ValueError(f"sk_iterations must be >= 1, got {sk_iterations}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.centering = centering
        self.center_momentum = center_momentum
        self.sk_iterations = sk_iterations
        self.impl = impl
        self.register_buffer("center", torch.zeros(1, out_dim))
        # batch mean [1, K] waiting to be folded into the center at the next call (softmax only)
        self._pending_batch_mean: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, student_temp={self.student_temp}, "
                f"centering={self.centering}, center_momentum={self.center_momentum}, "
                f"sk_iterations={self.sk_iterations}, impl={self.impl}")

    def _use_triton(self, x: torch.Tensor) -> bool:
        return use_triton(self.impl, x, "dino_loss")

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """center <- m·center + (1-m)·batch_mean of the previous call (no-op if none pending)."""
        if self._pending_batch_mean is not None:
            m = self.center_momentum
            self.center.mul_(m).add_(self._pending_batch_mean, alpha=1.0 - m)
            self._pending_batch_mean = None

    @torch.no_grad()
    def _normalise(self, teacher_logits: torch.Tensor, teacher_temp: float,
                   n_total: float | torch.Tensor | None) -> sk.TeacherTargets:
        if teacher_logits.dim() != 2 or teacher_logits.shape[1] != self.out_dim:
            raise ValueError(f"teacher logits must be [N, K={self.out_dim}], got "
                             f"{tuple(teacher_logits.shape)}")
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        fused = self._use_triton(teacher_logits)
        if self.centering == "sinkhorn_knopp":
            if fused:
                return sk.sinkhorn_knopp(teacher_logits, teacher_temp, self.sk_iterations, n_total)
            return sk.TeacherTargets(probs=sk.sinkhorn_knopp_ref(
                teacher_logits, teacher_temp, self.sk_iterations, n_total))
        # softmax centering: previous center, then record this batch's mean for the next call
        self.apply_center_update()
        if fused:
            targets, col_sum = sk.softmax_center(teacher_logits, self.center, teacher_temp)
        else:
            targets = sk.TeacherTargets(
                probs=sk.softmax_center_ref(teacher_logits, self.center, teacher_temp))
            col_sum = sk.center_batch_sum_ref(teacher_logits)
        # mean over this rank's rows, averaged over ranks (DINOv2: sum / (N_local · world))
        batch_mean = dist.all_reduce_mean(col_sum / teacher_logits.shape[0])
        self._pending_batch_mean = batch_mean.reshape(1, -1).to(self.center.dtype)
        return targets
