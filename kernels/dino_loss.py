"""Soft-target cross-entropy of the DINO CLS and iBOT patch losses, with the teacher
probabilities formed on the fly (SPEC.md §1.2, §1.4; KERNELS.md §2).

For student row i (logits s_i [K], z_i = s_i/τ_s) compared with the teacher rows J(i) (the DINO
pairing: global crop g against teacher crop 1-g, local crops against both teacher crops; iBOT:
the row's own masked patch), the per-row loss is

    loss_i = Σ_{j∈J(i)} -Σ_k p_jk log softmax(z_i)_k = |J(i)|·LSE(z_i) - Σ_k (Σ_{j∈J(i)} p_jk) z_ik

(Σ_k p_jk = 1), and its gradient is dloss_i/ds_i = (|J(i)|·softmax(z_i) - Σ_j p_j)/τ_s.
Teacher rows are addressed by an index map `teacher_index` [R, J] (-1 = no pair), so no teacher
row is copied; the weights (1/(2B), 1/n_masked, ...) are applied to the per-row losses by the
caller, whose gradient arrives here as grad_row [R].

Order (DESIGN.md kernel contract): reference → Triton kernels → launchers → torch.library
registration → autograd Function → functional API.
"""

from __future__ import annotations

import torch

from fastdino.kernels.sinkhorn import TeacherTargets

# ------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, fp32)
# ------------------------------------------------------------------------------------------------


def dino_soft_ce_ref(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                     teacher_index: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row soft cross-entropy [R] fp32 (differentiable in `student_logits`).

    student_logits: [R, K] (any float dtype; upcast to fp32 as the official code does);
    teacher_probs: [N, K] rows summing to 1; teacher_index: [R, J] int, entries in [0, N) or -1.
    """
    if student_logits.dim() != 2 or teacher_probs.dim() != 2:
        raise ValueError("student_logits and teacher_probs must be 2-D [rows, K], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}")
    if student_logits.shape[1] != teacher_probs.shape[1]:
        raise ValueError(f"K differs: student {student_logits.shape[1]}, "
                         f"teacher {teacher_probs.shape[1]}")
    if teacher_index.dim() != 2 or teacher_index.shape[0] != student_logits.shape[0]:
        raise ValueError(f"teacher_index must be [R={student_logits.shape[0]}, J], got "
                         f"{tuple(teacher_index.shape)}")
    logsm = torch.log_softmax(student_logits.float() / student_temp, dim=-1)  # [R, K]
    idx = teacher_index.long()
    valid = (idx >= 0).float()  # [R, J]
    q = teacher_probs.float()[idx.clamp_min(0)] * valid[..., None]  # [R, J, K]
    return -(q.sum(dim=1) * logsm).sum(dim=-1)
