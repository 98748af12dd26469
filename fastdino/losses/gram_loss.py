"""GramLoss: Gram anchoring of the student's patch similarities to a Gram teacher's
(SPEC.md §1.6; DINOv3 `dinov3/loss/gram_loss.py`).

Naive math (per image b, img_level=True):

    t = resize_bicubic(teacher patch grid [ht, wt] -> student grid [h, w])   # when they differ
    ŝ = normalize(s), t̂ = normalize(t)                                    # over D, fp32, eps 1e-12
    loss = mean_{b,p,q} (ŝ_p·ŝ_q - t̂_p·t̂_q)²                            # nn.MSELoss, N = B·P²

With img_level=False the B·P patches of the batch form one Gram (N = (B·P)²). Only the student
gets a gradient: the Gram teacher is frozen.

tokens_used (img_level=False only): all | masked | unmasked. With masked (unmasked) only the
patches where the iBOT mask of the global crops is True (False) enter the flattened Gram, the
teacher's at the same positions (official `get_gram_teacher_output`: `patches[masks]` after the
teacher grid is resized), and the mean runs over N_sel² entries, N_sel = #selected patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdino.kernels import gram as gram_kernels
from fastdino.layers.select import IMPLS, use_triton

TOKENS_USED = ("all", "masked", "unmasked")


def resize_teacher_grid(
    teacher: torch.Tensor, teacher_hw: tuple[int, int], student_hw: tuple[int, int]
) -> torch.Tensor:
    """teacher [B, ht·wt, D] -> [B, h·w, D]: bicubic, align_corners=False, antialias=False
    (the official `get_gram_teacher_output`), computed in fp32 and cast back."""
    b, p_t, d = teacher.shape
    ht, wt = teacher_hw
    h, w = student_hw
    if ht * wt != p_t:
        raise ValueError(
            f"GramLoss: teacher_hw={tuple(teacher_hw)} gives {ht * wt} patches but the "
            f"teacher has {p_t}"
        )
    grid = teacher.float().transpose(1, 2).reshape(b, d, ht, wt)  # [B, D, ht, wt]
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
    return grid.reshape(b, d, h * w).transpose(1, 2).to(teacher.dtype)  # [B, h·w, D]


class GramLoss(nn.Module):
    def __init__(
        self,
        img_level: bool = True,
        remove_neg: bool = False,
        remove_only_teacher_neg: bool = False,
        impl: str = "auto",
        tokens_used: str = "all",
    ):
        super().__init__()
        if tokens_used not in TOKENS_USED:
            raise ValueError(
                f"GramLoss: tokens_used={tokens_used!r} is invalid: allowed is one of "
                f"{' | '.join(TOKENS_USED)}"
            )
        if tokens_used != "all" and img_level:
            raise ValueError(
                f"GramLoss: tokens_used={tokens_used!r} needs img_level=False (a subset of patches "
                "has no per-image Gram); allowed with img_level=True is only 'all'"
            )
        if remove_neg and remove_only_teacher_neg:
            raise ValueError(
                "GramLoss: remove_neg and remove_only_teacher_neg are exclusive; "
                "allowed is at most one of them"
            )
        if impl not in IMPLS:
            raise ValueError(f"GramLoss: impl={impl!r} is invalid: allowed is one of {IMPLS}")
        self.img_level = img_level
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg
        self.impl = impl
        self.tokens_used = tokens_used

    def extra_repr(self) -> str:
        return (
            f"img_level={self.img_level}, remove_neg={self.remove_neg}, "
            f"remove_only_teacher_neg={self.remove_only_teacher_neg}, impl={self.impl}, "
            f"tokens_used={self.tokens_used}"
        )

    def forward(
        self,
        student_patches: torch.Tensor,
        teacher_patches: torch.Tensor,
        student_hw: tuple[int, int] | None = None,
        teacher_hw: tuple[int, int] | None = None,
        masks: torch.Tensor | None = None,
        mask_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """student_patches [B, P, D] (P = h·w), teacher_patches [B, Pt, D] (Pt = ht·wt) -> scalar.

        The teacher grid is resized to the student grid when the two differ; both hw may be
        omitted when the patch counts already agree. masks [B, P] bool (the iBOT masks of the
        global crops, same order as the B student images) is needed for tokens_used masked |
        unmasked; mask_indices [M] (= masks.flatten().nonzero(), the Batch field) is optional and
        spares the device -> host read that counting the selected patches otherwise costs.
        """
        if student_patches.dim() != 3 or teacher_patches.dim() != 3:
            raise ValueError(
                "GramLoss: student_patches and teacher_patches must be [B, P, D]; got "
                f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}"
            )
        teacher = teacher_patches.detach()
        if student_hw is not None and student_hw[0] * student_hw[1] != student_patches.shape[1]:
            raise ValueError(
                f"GramLoss: student_hw={tuple(student_hw)} does not match "
                f"{student_patches.shape[1]} student patches"
            )
        if (
            teacher_hw is not None
            and student_hw is not None
            and tuple(teacher_hw) != tuple(student_hw)
        ):
            teacher = resize_teacher_grid(teacher, teacher_hw, student_hw)
        elif teacher.shape[1] != student_patches.shape[1]:
            raise ValueError(
                f"GramLoss: teacher has {teacher.shape[1]} patches, student "
                f"{student_patches.shape[1]}: pass student_hw and teacher_hw to resize"
            )
        kwargs = dict(
            img_level=self.img_level,
            remove_neg=self.remove_neg,
            remove_only_teacher_neg=self.remove_only_teacher_neg,
            rows=self._rows(student_patches, masks, mask_indices),
        )
        if use_triton(self.impl, student_patches, "gram_loss"):
            return gram_kernels.gram_loss(student_patches, teacher, **kwargs)
        return gram_kernels.gram_loss_ref(student_patches, teacher, **kwargs)

    def _rows(
        self, student: torch.Tensor, masks: torch.Tensor | None, mask_indices: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Flat indices into the B·P patches that tokens_used selects, ascending (the order of
        the official boolean indexing), or None for all."""
        if self.tokens_used == "all":
            return None
        if masks is None:
            raise ValueError(
                f"GramLoss: tokens_used={self.tokens_used!r} needs masks [B, P] (the iBOT masks "
                "of the global crops); got none"
            )
        if masks.dtype != torch.bool or tuple(masks.shape) != tuple(student.shape[:2]):
            raise ValueError(
                f"GramLoss: masks must be bool [B, P] = {tuple(student.shape[:2])}; got "
                f"{masks.dtype} {tuple(masks.shape)}"
            )
        flat = masks.reshape(-1)
        if mask_indices is None:  # counting needs the values on the host: one sync
            return (flat if self.tokens_used == "masked" else ~flat).nonzero().reshape(-1)
        if self.tokens_used == "masked":
            return mask_indices
        # unmasked: the count is known from the shapes; a stable sort puts the False positions
        # first, in ascending order, without reading the mask on the host
        n_unmasked = flat.numel() - mask_indices.numel()
        return torch.sort(flat.to(torch.uint8), stable=True).indices[:n_unmasked]
