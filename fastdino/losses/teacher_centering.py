"""Teacher normalisation shared by DINOLoss and iBOTPatchLoss (SPEC.md §1.1, §1.2, §10.2):
Sinkhorn-Knopp (DINOv3 default) or DINOv2 softmax centering with a lazily applied EMA center.

The center is a [1, K] buffer (zeros and unused under Sinkhorn-Knopp, kept so state dicts match
the official ones). Softmax centering uses the center of the *previous* step and then records
this batch's mean for the EMA c <- m·c + (1-m)·mean:
- default (`defer_center_update=False`): the recorded mean is folded in at the next call, exactly
  DINOv2's asynchronous update, made synchronous through fastdino.dist (no torch.distributed
  import here);
- `defer_center_update=True` (the trainer, for gradient accumulation: USERS.md §2, LightlyTrain
  #968, LightlySSL PR#2062): calls only record; the center stays fixed across the micro-batches
  of one optimizer step, and the owner calls `apply_center_update()` once per optimizer step
  (or `discard_center_update()` when the step is skipped). The mean folded in is the mean over
  the step's micro-batches of each micro-batch's row mean, averaged over ranks: with equal rows
  per micro-batch and rank (static shapes: 2B CLS rows, a config-fixed masked count M) it is the
  mean over all teacher rows of the global batch, as one big batch would give.
The rank average is one all-reduce per update (at `apply_center_update`), not one per call.
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
                 sk_iterations: int = 3, impl: str = "auto", defer_center_update: bool = False):
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
        self.defer_center_update = defer_center_update
        self.register_buffer("center", torch.zeros(1, out_dim))
        # softmax only: sum [1, K] of this rank's per-call row means not yet folded into the
        # center, and the number of calls summed (their mean is all-reduced at the update)
        self._pending_sum: torch.Tensor | None = None
        self._pending_calls = 0

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, student_temp={self.student_temp}, "
                f"centering={self.centering}, center_momentum={self.center_momentum}, "
                f"sk_iterations={self.sk_iterations}, impl={self.impl}")

    def _use_triton(self, x: torch.Tensor) -> bool:
        return use_triton(self.impl, x, "dino_loss")

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """center <- m·center + (1-m)·batch_mean, batch_mean = the mean of the row means recorded
        since the last update, averaged over ranks (no-op if none pending). Collective when
        something is pending (every rank has the same pending state: they make the same calls)."""
        if self._pending_sum is None:
            return
        batch_mean = dist.all_reduce_mean(self._pending_sum / self._pending_calls)
        m = self.center_momentum
        self.center.mul_(m).add_(batch_mean.to(self.center.dtype), alpha=1.0 - m)
        self.discard_center_update()

    def discard_center_update(self) -> None:
        """Forget the recorded means (a skipped optimizer step leaves the center unchanged)."""
        self._pending_sum, self._pending_calls = None, 0

    def pending_center_state(self) -> tuple[torch.Tensor, int] | None:
        """(sum of this rank's recorded row means [1, K], number of calls), or None."""
        return None if self._pending_sum is None else (self._pending_sum, self._pending_calls)

    def load_pending_center_state(self, state: tuple[torch.Tensor, int] | torch.Tensor | None
                                  ) -> None:
        """Inverse of `pending_center_state`; a bare [1, K] tensor (checkpoints written before
        the deferred update: the rank-averaged mean of the last call) counts as one call."""
        if state is None:
            self.discard_center_update()
            return
        total, calls = (state, 1) if torch.is_tensor(state) else state
        self._pending_sum = total.to(self.center.device, torch.float32).reshape(1, -1).clone()
        self._pending_calls = int(calls)

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
        # softmax centering: the center of the previous step, then record this batch's mean
        if not self.defer_center_update:
            self.apply_center_update()
        if fused:
            targets, col_sum = sk.softmax_center(teacher_logits, self.center, teacher_temp)
        else:
            targets = sk.TeacherTargets(
                probs=sk.softmax_center_ref(teacher_logits, self.center, teacher_temp))
            col_sum = sk.center_batch_sum_ref(teacher_logits)
        if not teacher_logits.shape[0]:
            # no rows (no masked patches; the count is fixed by the config, so on every rank):
            # no mean to record, the center stays as it is (a 0/0 would make it NaN for good)
            return targets
        # mean over this rank's rows; averaged over ranks at the update (DINOv2: sum / (N·world))
        row_mean = (col_sum.float() / teacher_logits.shape[0]).reshape(1, -1)
        self._pending_sum = row_mean if self._pending_sum is None else self._pending_sum + row_mean
        self._pending_calls += 1
        return targets
