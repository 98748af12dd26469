"""GramLoss / gram_loss_ref against hand-computed values (SPEC.md §1.6). Expected numbers are
worked out by hand in the comments, never produced by the code under test."""

import math

import pytest
import torch
import torch.nn.functional as F
from fastdino.kernels.gram import gram_loss_ref

from fastdino.losses.gram_loss import GramLoss, resize_teacher_grid

R2 = 1 / math.sqrt(2)


def t64(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_identical_inputs_give_zero():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    scale = (
        torch.rand(3, 7, 1, generator=g, dtype=torch.float64) + 0.5
    )  # per-row scale: normalised away
    for img_level in (True, False):
        loss = GramLoss(img_level=img_level, impl="torch")(s, s * scale)
        assert loss.item() == pytest.approx(0.0, abs=1e-14)


def test_orthogonal_vs_parallel_hand_value():
    # student rows orthogonal: Gs = I; teacher rows parallel: Gt = all ones.
    # Gs - Gt = [[0, -1], [-1, 0]] -> sum of squares 2, mean over P² = 4 entries: 0.5.
    s = t64([[[1, 0], [0, 1]]])
    t = t64([[[1, 0], [2, 0]]])
    assert gram_loss_ref(s, t).item() == pytest.approx(0.5, abs=1e-15)


def test_mse_normaliser_per_image_and_flattened():
    # image 0: the hand case above (sum 2); image 1: student == teacher == [(1,0), (1,0)] (sum 0).
    s = t64([[[1, 0], [0, 1]], [[1, 0], [1, 0]]])
    t = t64([[[1, 0], [2, 0]], [[1, 0], [1, 0]]])
    # per image: N = B·P² = 2·4 = 8 -> 2 / 8.
    assert gram_loss_ref(s, t, img_level=True).item() == pytest.approx(0.25, abs=1e-15)
    # flattened: rows a=(1,0), b=(0,1), c=d=(1,0) vs teacher all (1,0): Gt is all ones and Gs is 0
    # exactly on (a,b), (b,c), (b,d) and their transposes -> 6 entries of -1 over (B·P)² = 16.
    assert gram_loss_ref(s, t, img_level=False).item() == pytest.approx(6 / 16, abs=1e-15)


CLAMP_CASES = [
    # (student rows, teacher rows, expected loss: none, remove_neg, remove_only_teacher_neg)
    # student off-diagonal -1, teacher 0: remove_neg zeroes Gs; only-teacher leaves it (Gt >= 0).
    ([[1, 0], [-1, 0]], [[1, 0], [0, 1]], 0.5, 0.0, 0.5),
    # teacher -1, student 0: both modes clamp Gt to 0.
    ([[1, 0], [0, 1]], [[1, 0], [-1, 0]], 0.5, 0.0, 0.0),
    # both negative (-1 and -1/√2): both modes give 0.
    ([[1, 0], [-1, 0]], [[1, 0], [-R2, R2]], 2 * (1 - R2) ** 2 / 4, 0.0, 0.0),
    # student +1/√2, teacher -1: Gt -> 0 in both modes, off-diagonal diff 1/√2 -> 2·(1/2)/4.
    ([[1, 0], [R2, R2]], [[1, 0], [-1, 0]], 2 * (R2 + 1) ** 2 / 4, 0.25, 0.25),
    # student -1, teacher +1: remove_neg: 0 - 1; only-teacher: -1 - 1 = -2 -> 2·4/4.
    ([[1, 0], [-1, 0]], [[1, 0], [1, 0]], 2.0, 0.5, 2.0),
]


@pytest.mark.parametrize("s_rows,t_rows,none,neg,only_t", CLAMP_CASES)
def test_remove_neg_semantics(s_rows, t_rows, none, neg, only_t):
    s, t = t64([s_rows]), t64([t_rows])
    assert gram_loss_ref(s, t).item() == pytest.approx(none, abs=1e-14)
    assert gram_loss_ref(s, t, remove_neg=True).item() == pytest.approx(neg, abs=1e-14)
    assert gram_loss_ref(s, t, remove_only_teacher_neg=True).item() == pytest.approx(
        only_t, abs=1e-14
    )


def test_remove_neg_blocks_gradient_of_clamped_student_entries():
    # student off-diagonal < 0 and teacher > 0: remove_neg clamps Gs there, so no gradient flows;
    # remove_only_teacher_neg keeps it (the teacher is not negative).
    t = t64([[[1, 0], [1, 0.1]]])
    for flag, expect_zero in (("remove_neg", True), ("remove_only_teacher_neg", False)):
        s = t64([[[1, 0.2], [-1, 0.3]]]).requires_grad_()
        gram_loss_ref(s, t, **{flag: True}).backward()
        # (the diagonal Ĝs = 1 differs from Ĝt = 1 only by rounding: ~1e-32 of gradient)
        assert (s.grad.abs().max().item() < 1e-12) == expect_zero, flag


def test_exclusive_clamp_flags_rejected():
    with pytest.raises(ValueError, match="exclusive"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)


def test_bicubic_resize_of_a_2x_teacher_grid():
    # A teacher at 2× resolution whose bicubic (align_corners=False, antialias=False) downsample
    # is exactly the student gives 0; a student built with another resize does not.
    g = torch.Generator().manual_seed(1)
    b, d, h, w = 2, 6, 3, 4
    grid = torch.randn(b, d, 2 * h, 2 * w, generator=g)  # [B, D, 2h, 2w]
    teacher = grid.flatten(2).transpose(1, 2)  # [B, 4hw, D]

    def student_from(**kw):
        return (
            F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, **kw)
            .flatten(2)
            .transpose(1, 2)
        )  # [B, hw, D]

    loss_fn = GramLoss(impl="torch")
    exact = loss_fn(
        student_from(antialias=False), teacher, student_hw=(h, w), teacher_hw=(2 * h, 2 * w)
    )
    assert exact.item() == pytest.approx(0.0, abs=1e-10)
    other = loss_fn(
        student_from(antialias=True), teacher, student_hw=(h, w), teacher_hw=(2 * h, 2 * w)
    )
    assert other.item() > 1e-4
    assert resize_teacher_grid(teacher, (2 * h, 2 * w), (h, w)).shape == (b, h * w, d)


def test_teacher_gets_no_gradient_and_bad_shapes_are_named():
    s = torch.randn(1, 4, 3, requires_grad=True)
    t = torch.randn(1, 4, 3, requires_grad=True)
    GramLoss(impl="torch")(s, t).backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="teacher_hw"):
        GramLoss(impl="torch")(s, torch.randn(1, 5, 3), student_hw=(2, 2), teacher_hw=(2, 2))
    with pytest.raises(ValueError, match="patches"):
        GramLoss(impl="torch")(s, torch.randn(1, 9, 3))
