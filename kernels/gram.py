"""Gram anchoring loss (DINOv3 `dinov3/loss/gram_loss.py`; SPEC.md §1.6, KERNELS.md §5).

    loss = mean over images b and patch pairs (p, q) of (Ĝs[b,p,q] - Ĝt[b,p,q])²
    Ĝs = ŝ ŝᵀ, Ĝt = t̂ t̂ᵀ, ŝ = F.normalize(student, dim=-1), t̂ = F.normalize(teacher, dim=-1)

Shapes: B images, P patches, D channels; student, teacher [B, P, D]. `img_level=False` flattens
the batch into one (B·P) × (B·P) Gram (the official default; the 7B anchor config is per image).
Normaliser N = B·P² (per image) or (B·P)² (flattened), the `nn.MSELoss` mean.
This file: `gram_loss_ref` (the truth) -> Triton kernels -> launchers -> torch.library op ->
`GramFn` -> `gram_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # F.normalize default, as in the official loss


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor,
                  remove_neg: bool, remove_only_teacher_neg: bool) -> None:
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(f"gram loss: student and teacher must be [B, P, D]; got student "
                         f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"gram loss: student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)} must have the same [B, P, D] (resize the teacher "
                         "grid first, see GramLoss)")
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("gram loss: remove_neg and remove_only_teacher_neg are exclusive; "
                         "allowed is at most one of them")


def gram_loss_ref(student: torch.Tensor, teacher: torch.Tensor, img_level: bool = True,
                  remove_neg: bool = False, remove_only_teacher_neg: bool = False,
                  compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The official math, in pure PyTorch. student, teacher [B, P, D] -> scalar.

    Computes in `compute_dtype` (default: the input dtype promoted to at least fp32, i.e. the
    official `.float()`; pass torch.float64 inputs for an fp64 truth, or compute_dtype=bf16 for
    the low-precision baseline of the parity rule).

    Clamp options, exactly as the official in-place index assignments act:
    - remove_neg: Ĝs[Ĝs < 0] = 0 and Ĝt[Ĝt < 0] = 0 (both Grams clamped at 0; no gradient where
      Ĝs < 0).
    - remove_only_teacher_neg: Ĝs[(Ĝs < 0) & (Ĝt < 0)] = 0, then Ĝt[Ĝt < 0] = 0. So where the
      teacher is negative the difference is relu(Ĝs); elsewhere it is Ĝs - Ĝt.
    """
    _check_inputs(student, teacher, remove_neg, remove_only_teacher_neg)
    dt = compute_dtype or torch.promote_types(student.dtype, torch.float32)
    s = F.normalize(student.to(dt), dim=-1, eps=NORM_EPS)  # [B, P, D]
    t = F.normalize(teacher.to(dt), dim=-1, eps=NORM_EPS)
    if not img_level:
        s, t = s.flatten(0, 1)[None], t.flatten(0, 1)[None]  # [1, B·P, D]
    g_s = s @ s.transpose(-1, -2)  # [B, P, P]
    g_t = t @ t.transpose(-1, -2)
    zero = torch.zeros((), dtype=dt, device=g_s.device)
    if remove_neg:
        g_s = torch.where(g_s < 0, zero, g_s)
        g_t = torch.where(g_t < 0, zero, g_t)
    elif remove_only_teacher_neg:
        g_s = torch.where((g_s < 0) & (g_t < 0), zero, g_s)
        g_t = torch.where(g_t < 0, zero, g_t)
    return F.mse_loss(g_s, g_t)


def gram_loss(student: torch.Tensor, teacher: torch.Tensor, img_level: bool = True,
              remove_neg: bool = False, remove_only_teacher_neg: bool = False) -> torch.Tensor:
    """Functional API (placeholder until the Triton path lands: runs the reference)."""
    return gram_loss_ref(student, teacher, img_level, remove_neg, remove_only_teacher_neg)
