"""Teacher targets of the DINO and iBOT losses: Sinkhorn-Knopp (DINOv3) or softmax centering
(DINOv2), SPEC.md §1.1-§1.2, §10.2; KERNELS.md §3.

Both normalisations give teacher probabilities of one factorised form, which the fused student
kernel (kernels/dino_loss.py) evaluates on the fly instead of reading an N×K probability tensor:

    p[b, k] = exp(t[b, k] / τ_t - col_shift[k] - row_shift[b])        t: teacher logits [N, K]

- softmax centering: col_shift = c / τ_t, row_shift[b] = LSE_k((t[b] - c) / τ_t).
- Sinkhorn-Knopp, written in the log domain on P = N_total·Q (Q the official K×N matrix,
  transposed): the prototype ("row" in the paper's K×N layout) normalisation
  Q_k· <- Q_k· / (K Σ_b Q_kb) is `col_shift[k] += log(K/N_total · Σ_b P[b, k])` (the sum over b
  is all-reduced), and the sample normalisation Q_·b <- Q_·b / (N_total Σ_k Q_kb) is
  `row_shift[b] = LSE_k(t[b, k]/τ_t - col_shift[k])` (local: a sample lives on one rank).
  The start is col_shift = per-prototype max of t/τ_t (all-reduced MAX), row_shift = 0: a
  per-prototype constant is cancelled exactly by the first prototype normalisation (and so is
  the official first division by the global sum), so this is the official algorithm, with the
  exact overflow guard of SPEC.md §10.2. The final ×N_total is built into P.

Streaming passes over the teacher logits (N×K elements of `t` read, nothing N×K written):
SK = 1 (prototype max) + iters × (1 prototype sums + 1 row LSE) = 2·iters + 1 = 7 reads at 3
iterations; softmax centering = 1 read (row LSE with the center's batch column sum fused).
Bytes: (2·iters + 1)·N·K·elsize for SK, N·K·elsize + 4K for centering, plus O(N + K) vectors.
The teacher entropy (a collapse indicator) is accumulated in the last row pass for free.

Order of this file (DESIGN.md kernel contract): references → Triton kernels → launchers →
torch.library registration → functional API (no autograd: teacher targets carry no gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastdino import dist

# ------------------------------------------------------------------------------------------------
# The teacher-target record both implementations return.
# ------------------------------------------------------------------------------------------------


@dataclass
class TeacherTargets:
    """Teacher probabilities [N, K], either materialised (`probs`, the reference path) or
    factorised as exp(logits·inv_temp - col_shift[k] - row_shift[b]) (the Triton path).

    `row_entropy` [N] (nats) is filled by whichever path is cheap; `entropy()` is its mean.
    """

    probs: torch.Tensor | None = None  # [N, K] fp32, rows sum to 1 (reference path)
    logits: torch.Tensor | None = None  # [N, K] teacher logits, bf16 or fp32 (factorised path)
    inv_temp: float = 1.0  # 1 / τ_t
    col_shift: torch.Tensor | None = None  # [K] fp32
    row_shift: torch.Tensor | None = None  # [N] fp32
    row_entropy: torch.Tensor | None = None  # [N] fp32, nats

    @property
    def n_rows(self) -> int:
        return (self.probs if self.probs is not None else self.logits).shape[0]

    def materialize(self) -> torch.Tensor:
        """The probabilities [N, K] in fp32 (tests, debugging; the fused path never calls it)."""
        if self.probs is not None:
            return self.probs
        x = self.logits.float() * self.inv_temp - self.col_shift[None, :] - self.row_shift[:, None]
        return torch.exp(x)

    def factorised(self) -> "TeacherTargets":
        """The same targets in factorised form (log p as logits, zero shifts), so the fused
        student kernel can consume reference targets too. p = 0 gives logit -inf, exp2 -> 0."""
        if self.probs is None:
            return self
        n, k = self.probs.shape
        dev = self.probs.device
        return TeacherTargets(logits=torch.log(self.probs), inv_temp=1.0,
                              col_shift=torch.zeros(k, device=dev),
                              row_shift=torch.zeros(n, device=dev), row_entropy=self.row_entropy)

    def entropy(self) -> torch.Tensor:
        """Mean teacher entropy over rows, in nats (scalar fp32)."""
        if self.row_entropy is None:
            p = self.materialize()
            self.row_entropy = -torch.special.xlogy(p, p).sum(dim=-1)
        return self.row_entropy.mean()


# ------------------------------------------------------------------------------------------------
# References (pure PyTorch, fp32): the truth the tests and benchmarks import.
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn_knopp_ref(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                       n_total: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """Sinkhorn-Knopp teacher probabilities [N, K] fp32, as the official DINOv3
    `sinkhorn_knopp_teacher` / `SinkhornKnoppTeacher` (SPEC.md §1.1), all-reductions through
    fastdino.dist.

    One deliberate difference: the official code exponentiates t/τ_t with no shift; this
    reference first subtracts the per-prototype max of t/τ_t over the global batch
    (all-reduced MAX). A per-prototype constant is cancelled exactly by the first prototype
    normalisation, so the result is mathematically identical, and it stays finite for
    t/τ_t > 88 where the official code overflows (SPEC.md §10.2).

    teacher_logits: [N, K] (this rank's rows). n_total: global number of samples (DINO: N·world,
    the default; iBOT: the all-reduced masked-patch count).
    """
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be [N, K], got shape {tuple(teacher_logits.shape)}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    x = teacher_logits.float() / teacher_temp
    shift = dist.all_reduce_max(x.amax(dim=0, keepdim=True))  # [1, K] per-prototype max
    Q = torch.exp(x - shift).t()  # [K, N]: the paper's layout
    K = Q.shape[0]
    B = float(Q.shape[1] * dist.get_world_size()) if n_total is None else n_total
    eps = torch.finfo(Q.dtype).eps

    sum_Q = dist.all_reduce_sum(torch.sum(Q))  # make the matrix sum to 1 (cancelled below)
    Q /= sum_Q.clamp_min(eps)
    for _ in range(n_iterations):
        # each prototype's total weight must be 1/K (sums over samples of every rank)
        sum_of_rows = dist.all_reduce_sum(torch.sum(Q, dim=1, keepdim=True))
        Q /= sum_of_rows.clamp_min(eps)
        Q /= K
        # each sample's total weight must be 1/B (a sample lives on one rank: local sum)
        Q /= torch.sum(Q, dim=0, keepdim=True).clamp_min(eps)
        Q /= B
    Q *= B  # columns sum to 1: an assignment
    return Q.t()


@torch.no_grad()
def softmax_center_ref(teacher_logits: torch.Tensor, center: torch.Tensor,
                       teacher_temp: float) -> torch.Tensor:
    """DINOv2 softmax centering: softmax((t - c)/τ_t) [N, K] fp32 (c: [1, K] or [K])."""
    c = center.reshape(1, -1).float()
    return torch.softmax((teacher_logits.float() - c) / teacher_temp, dim=-1)


@torch.no_grad()
def center_batch_sum_ref(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Column sum of the teacher logits [K] fp32: the center EMA's batch statistic (this rank)."""
    return teacher_logits.float().sum(dim=0)
