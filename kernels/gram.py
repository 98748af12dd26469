"""Gram anchoring loss on tensor cores, without P×P matrices in memory (DINOv3
`dinov3/loss/gram_loss.py`; SPEC.md §1.6, KERNELS.md §5). No public fused anchor exists; the
target is the bf16 GEMM roofline.

    loss = mean over images b and patch pairs (p, q) of (Ĝs[b,p,q] - Ĝt[b,p,q])²
    Ĝs = ŝ ŝᵀ, Ĝt = t̂ t̂ᵀ, ŝ = F.normalize(student, dim=-1), t̂ = F.normalize(teacher, dim=-1)

Legend: B images, P patches, D channels; student, teacher [B, P, D]. `img_level=False` flattens
the batch into one (B·P) × (B·P) Gram, which the kernels see as NB = 1 image of Pe = B·P rows
(per image: NB = B, Pe = P). Normaliser N = NB·Pe² (`nn.MSELoss` mean). Only the student gets a
gradient (the Gram teacher is frozen).

Numerics (the danger is cancellation: the student Gram tracks the teacher's, so Ĝs - Ĝt is
small while each entry is O(1)). A pre-pass normalises both rows in fp32 and writes the
sum/difference split  F = ŝ + t̂, E = ŝ - t̂  (and ŝ) in the working precision. Then
    S = ŝŝᵀ - t̂t̂ᵀ = ½ (F Eᵀ + E Fᵀ)
is formed from products that are each O(|E|): no O(1) terms cancel, so bf16 operands with fp32
accumulation keep a relative error of ~2⁻⁸ on S itself instead of on the Gram entries.

Two exact forms, picked by `choose_form` (crossover derived from the FLOP counts below):
- P×P, tiled flash-style (any clamp): tile pairs i ≤ j (off-diagonal tiles count twice),
  S_ij = ½(F_i E_jᵀ + E_i F_jᵀ), Σ S² into one partial per tile pair, then a fixed-order sum
  (deterministic loss). Backward, two ways (`gram_loss(pp_backward=...)`):
  stored (the default where Pe <= D, `stores_w`: W is then no larger than F or E): the forward
  also writes W_ij = dL/dĜs (rounded to the working dtype as the MMA operand it becomes) at
  (i, j) and W_ijᵀ at (j, i), and the backward is one batched GEMM dÂ = W Â (2·P²·D FLOPs, GEMM
  tiles, deterministic); recompute (Pe > D, or forced): one program per row block i walks every
  column block j in order, recomputes S_ij and adds W_ij Â_j into its own rows of dÂ (no
  atomics: the gradient is bitwise reproducible; S is recomputed for j < i too; 6·P²·D FLOPs).
  fwd 2·P²·D FLOPs per image. At ViT-L 224 px (P = 196, D = 1024, 128 images) the recomputing
  backward took 0.50 ms against 0.16 ms for the forward (H200, check5); the stored path is not
  timed on a GPU yet (bench provider `triton_pp_recompute` is the A/B).
- D×D (no clamp, P >= D): ‖S‖² = ½(⟨FᵀF, EᵀE⟩ + tr(X X)), X = FᵀE, and
  S ŝ = ¼(F M1 + E M2), M1 = Xᵀ + EᵀE, M2 = FᵀF + X. The forward runs over the block pairs
  I <= J of the D×D matrices (both Grams are symmetric): four dots per pair (F_IᵀF_J, E_IᵀE_J,
  F_IᵀE_J = X[I, J], E_IᵀF_J = X[J, I]ᵀ) on the same four operand tiles give the pair's loss
  partial and M1, M2 at (I, J) and (J, I) in its epilogue, so no D×D fp32 matrix reaches memory
  and the backward starts from M1, M2 in the working dtype (before: three fp32 D×D matrices,
  then ~4 torch passes over them for the loss and for M1, M2: 120 µs fwd + 170 µs bwd of
  2.0 ms at P = 4096, D = 1024, 8 images, H200 check4). Grids under two waves (ViT-L
  flattened: 136 pairs) split the rows; a finish launch sums the splits in order
  (`_dd_splits`). The prep stores F and E side by side in one [R, 2D] buffer FE, so the
  backward is one batched GEMM FE·[M1; M2] (K = 2D, fp32 out) that cuBLAS runs for bf16/fp16
  on CUDA (`torch.bmm` with out_dtype; `gram_loss(backward_gemm=...)`, as the stored-W P×P
  backward W Â). fwd 4·P·D² (+ the diagonal blocks' second half), bwd 4·P·D² FLOPs.
  (Its weak case is a teacher that is a rotation of the student, where FEᵀ is antisymmetric
  and the two terms cancel.) Chosen when 8·P²·D >= 8·P·D², i.e. Pe >= D.

Clamp options (P×P only), exactly the official in-place assignments:
  remove_neg               S = relu(Ĝs) - relu(Ĝt), no gradient where Ĝs < 0;
  remove_only_teacher_neg  S = Ĝs - Ĝt where Ĝt >= 0, relu(Ĝs) where Ĝt < 0 (zero gradient
                           where both are negative). Ĝs comes from one more GEMM, Ĝt = Ĝs - S.

Selected rows (`gram.tokens_used: masked | unmasked`, img_level=False only; official
`get_gram_teacher_output`: `patches[masks]` for student and Gram teacher, after the teacher grid
is resized): `rows` [N_sel] flat indices into the B·P patches are gathered (index_select) into
one [1, N_sel, D] image before the kernels, so NB = 1, Pe = N_sel and the normaliser is N_sel²,
not (B·P)² (KERNELS.md §5.3); the gather's backward scatters dŝ back, unselected rows get 0.
GramLoss builds `rows` from the Batch's mask_indices (masked) or a stable sort of the masks
(unmasked) without a device -> host read. N_sel = 0 gives 0 (the official mean of an empty
Gram is nan).

Cost model (w = bytes of a working-dtype element, 2 for bf16; in = input element bytes; R = NB·Pe
rows; BM = 64-row tiles, T = ⌈Pe/BM⌉; BK = 64 D×D blocks):
  prep       reads 2·R·D·in, writes 3·R·D·w (4 with a clamp on bf16/fp16: lo(ŝ); 2 for D×D);
             D <= 4096: each row read once (kept in registers), else twice (L2)
  P×P fwd    T(T+1)/2 tile pairs per image, each reads F_i, E_i, F_j, E_j (4·BM·D·w; 8 with a
             clamp): ≈ 2·NB·Pe²·D·w/BM bytes for 2·NB·Pe²·D FLOPs, BM/w = 32 FLOP/B (bf16)
  P×P bwd    stored W: writes NB·Pe²·w in the forward, reads it and Â once per column tile of
             the GEMM, writes dÂ in fp32 (R·D·4). Recompute: T² pairs, each reads F, E of both
             blocks and Â_j (5·BM·D·w) and read-modify-writes dÂ_i in fp32 (8·BM·D): 18·BM·D B
             per 6·BM²·D FLOPs, BM/3 ≈ 21 FLOP/B (bf16)
  D×D fwd    (D/BK)(D/BK + 1)/2 block pairs per image, each streams F, E at its two column
             blocks: 2·NB·Pe·D²·w/BK bytes for 4·NB·Pe·D² FLOPs, 2·BK/w = 64 FLOP/B; writes
             2·NB·D²·w (M1, M2); a row split adds 2 x 64 KB of fp32 scratch per program
  D×D bwd    reads F, E rows per column block and M1, M2 per row block: 2·NB·Pe·D²·w·(1/BN +
             1/BM) bytes for 4·NB·Pe·D² FLOPs (32 FLOP/B at 64×64 tiles); writes R·D·4
  norm bwd   reads R·D·(in + 4), writes R·D·in (as prep: once or twice)       memory-bound
All below the H100 ridge from HBM (989 TFLOP/s / 3.35 TB/s ≈ 295 FLOP/B): the tiles reach tensor-
core speed only because the re-reads hit L2 (one image's F, E are 2·Pe·D·w bytes: 4 MiB at the 7B
shape P = 256, D = 4096, against 50 MB of L2). The P×P backward's fp32 dÂ_i (1 MiB per program at
D = 4096) is its weak spot. Saved for the backward: ŝ, F, E (3·R·D·w, + lo) and the stored W
(NB·Pe²·w <= R·D·w) for P×P; F, E (2·R·D·w) and M1, M2 (2·NB·D²·w) for D×D, whose prep writes
no ŝ.

Tiles (explained at `_pp_gpu`): 64-row square tiles. bf16/fp16 tiles run 4 warps, one per
16-row MMA slice, because the dots of every loop here are "chained" and Triton lays all warps
along M (on sm_80 8 warps would compute each fragment twice; on sm_90 the 8-warp set was slower,
timed on an H200), on every GPU (`auto_tiles`; gram_loss(tiles=...) forces the 8-warp sm90 set
for A/B timings). fp32 (FMA dots): the same tiles in both sets.

Dtypes: bf16/fp16 inputs -> operands in that dtype, fp32 accumulation; fp32 inputs -> fp32
operands with input_precision="ieee" (exact, CUDA-core speed: feed bf16 for tensor cores).
Under the Triton interpreter bf16 tiles are upcast before tl.dot (upstream interpreter bug,
noted 2026-07). Supports any B, P >= 1, D >= 1 (odd sizes masked). Tested under the interpreter
with triton 3.6 and 3.9 (both tile sets); every shipped configuration compiles for sm_90 / sm_80
without spills, on the path real launches take (aligned pointers, D % 16 == 0: declared per spec
as `divisible_by_16`, tests/kernels/test_gram_compile.py) and on the odd-D path (bench
compile-report as it stands); not yet timed on a GPU.

This file: `gram_loss_ref` (the truth) -> Triton kernels -> launchers -> torch.library ops ->
`GramFn` -> `gram_loss`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from fastdino.kernels._rounding import rne_bf16
from fastdino.kernels._triton import tl, triton
from fastdino.kernels._utils import (
    CompileSpec,
    _cuda_arch_family,
    arch_family,
    cdiv,
    eager_or_op,
    is_interpreter,
    next_pow2,
)

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


def _check_rows(rows: torch.Tensor | None, img_level: bool) -> None:
    if rows is None:
        return
    if img_level:
        raise ValueError("gram loss: rows (tokens_used masked | unmasked) need img_level=False: "
                         "a row subset has no per-image Gram (official: only with img_level false)")
    if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"gram loss: rows must be a 1-D integer tensor of flat indices into the "
                         f"B·P patches; got {rows.dtype} {tuple(rows.shape)}")


def select_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, P, D] -> [1, N_sel, D]: the patches at flat indices `rows` into B·P, in that order
    (official `x[masks]` for rows = masks.flatten().nonzero()). A gather; its backward scatters
    the gradient back to the selected rows (the others get 0)."""
    return x.flatten(0, 1).index_select(0, rows.to(x.device, torch.long))[None]


def gram_loss_ref(student: torch.Tensor, teacher: torch.Tensor, img_level: bool = True,
                  remove_neg: bool = False, remove_only_teacher_neg: bool = False,
                  compute_dtype: torch.dtype | None = None,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """The official math, in pure PyTorch. student, teacher [B, P, D] -> scalar.

    rows (img_level=False only; `gram.tokens_used` masked | unmasked): [N_sel] flat indices into
    the B·P patches; only those rows form the flattened Gram, and the MSE mean runs over its
    N_sel² entries (official: `student_patches[masks]` before the loss). N_sel = 0 gives 0.

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
    _check_rows(rows, img_level)
    if rows is not None:
        if rows.numel() == 0:  # official: MSE of empty Grams is nan; nothing to anchor is 0
            return (student.sum() * 0).to(compute_dtype or torch.float32)
        student, teacher = select_rows(student, rows), select_rows(teacher, rows)
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



# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------

CLAMP_NONE, CLAMP_NEG, CLAMP_TEACHER_NEG = 0, 1, 2
FORM_PP, FORM_DD = 0, 1
TILES = {"auto": 0, "sm90": 90, "sm80": 80}  # gram_loss(tiles=...) -> the launchers' arch (0: own)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc += a @ b with fp32 accumulation. UPCAST: interpreter-only bf16 workaround; IEEE: exact
    fp32 products (fp32 inputs), otherwise the operand dtype's tensor-core path."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _round(x, dtype: tl.constexpr, RNE_FIX: tl.constexpr):
    """Cast fp32 to the working dtype. The GPU rounds to nearest even; the interpreter truncates
    fp32 -> bf16 (even with fp_downcast_rounding="rtne"; seen 2026-07 in triton 3.6 and 3.9),
    which shrinks |S| by ~2⁻⁸ on average and biases the loss. RNE_FIX (interpreter + bf16 only)
    rounds the fp32 bits to nearest even first, so the truncation is exact."""
    if RNE_FIX:
        x = rne_bf16(x)
    return x.to(dtype)


@triton.jit
def _prep_store(A_ptr, Lo_ptr, F_ptr, E_ptr, off, off_fe, m, a, b, RNE_FIX: tl.constexpr,
                WRITE_LO: tl.constexpr, WRITE_A: tl.constexpr):
    """Stores of one [BLOCK_R, BLOCK_D] chunk of ŝ (a) and t̂ (b), fp32 in registers; off: the
    chunk's offsets in ŝ and lo, off_fe in F and E."""
    # the difference is taken in fp32 before rounding: this is what keeps S accurate
    if WRITE_A:
        hi = _round(a, A_ptr.dtype.element_ty, RNE_FIX)
        tl.store(A_ptr + off, hi, mask=m)
        if WRITE_LO:
            lo = _round(a - hi.to(tl.float32), Lo_ptr.dtype.element_ty, RNE_FIX)
            tl.store(Lo_ptr + off, lo, mask=m)
    tl.store(F_ptr + off_fe, _round(a + b, F_ptr.dtype.element_ty, RNE_FIX), mask=m)
    tl.store(E_ptr + off_fe, _round(a - b, E_ptr.dtype.element_ty, RNE_FIX), mask=m)


@triton.jit
def _gram_prep_kernel(
    A_ptr,  # out [R, D] ŝ, working dtype (its "hi" part)
    Lo_ptr,  # out [R, D] ŝ - hi, working dtype (clamp modes only: an accurate Ĝs sign)
    F_ptr,  # out [R, D] ŝ + t̂, rows stride_fe apart
    E_ptr,  # out [R, D] ŝ - t̂, rows stride_fe apart
    S_ptr,  # in  [R, D] student rows
    T_ptr,  # in  [R, D] teacher rows
    R, D, stride_fe, EPS,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ONE_PASS: tl.constexpr,
    RNE_FIX: tl.constexpr, WRITE_LO: tl.constexpr, WRITE_A: tl.constexpr,
):
    """BLOCK_R rows per program. ONE_PASS (D <= BLOCK_D): each row is read once and stays in
    registers between its norm and its stores; else two passes over D in BLOCK_D chunks (the
    second re-reads from L2). WRITE_A: the P×P form reads ŝ; the D×D form only F and E, which
    it stores side by side in one [R, 2D] buffer (stride_fe = 2D: the backward's one GEMM)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = (rows < R)[:, None]
    base = rows[:, None] * D
    base_fe = rows[:, None] * stride_fe
    offs = tl.arange(0, BLOCK_D)[None, :]
    if ONE_PASS:
        m = row_ok & (offs < D)
        s = tl.load(S_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        t = tl.load(T_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        # F.normalize: x / max(‖x‖, eps)
        inv_s = 1.0 / tl.maximum(tl.sqrt(tl.sum(s * s, axis=1)), EPS)
        inv_t = 1.0 / tl.maximum(tl.sqrt(tl.sum(t * t, axis=1)), EPS)
        _prep_store(A_ptr, Lo_ptr, F_ptr, E_ptr, base + offs, base_fe + offs, m,
                    s * inv_s[:, None], t * inv_t[:, None], RNE_FIX, WRITE_LO, WRITE_A)
    else:
        ss = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        tt = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        for k in range(0, D, BLOCK_D):
            m = row_ok & (k + offs < D)
            s = tl.load(S_ptr + base + k + offs, mask=m, other=0.0).to(tl.float32)
            t = tl.load(T_ptr + base + k + offs, mask=m, other=0.0).to(tl.float32)
            ss += s * s
            tt += t * t
        inv_s = 1.0 / tl.maximum(tl.sqrt(tl.sum(ss, axis=1)), EPS)
        inv_t = 1.0 / tl.maximum(tl.sqrt(tl.sum(tt, axis=1)), EPS)
        for k in range(0, D, BLOCK_D):
            m = row_ok & (k + offs < D)
            a = tl.load(S_ptr + base + k + offs, mask=m, other=0.0).to(tl.float32)
            b = tl.load(T_ptr + base + k + offs, mask=m, other=0.0).to(tl.float32)
            _prep_store(A_ptr, Lo_ptr, F_ptr, E_ptr, base + k + offs, base_fe + k + offs, m,
                        a * inv_s[:, None], b * inv_t[:, None], RNE_FIX, WRITE_LO, WRITE_A)


@triton.jit
def _pp_tile(A_ptr, Lo_ptr, F_ptr, E_ptr, rows_i, rows_j, P, D,
             CLAMP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
             UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """S_ij (clamped) and W_ij = dL/dĜs_ij up to 2/N, both fp32 [BLOCK_M, BLOCK_M]. The pointers
    already point at this image, so the tile offsets stay int32 (int64 offset tensors spill).
    Rows j are loaded row-major like rows i and transposed in registers (tl.trans): transposed
    loads are not vectorised and cost registers for their addresses."""
    offs_d = tl.arange(0, BLOCK_D)
    ok_i = (rows_i < P)[:, None]
    ok_j = (rows_j < P)[:, None]
    p_i = rows_i[:, None] * D + offs_d[None, :]  # [BM, BD] at k = 0, advanced by BLOCK_D
    p_j = rows_j[:, None] * D + offs_d[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_M), tl.float32)  # F_i E_jᵀ + E_i F_jᵀ
    g_s = tl.zeros((BLOCK_M, BLOCK_M), tl.float32)  # Ĝs_ij (clamp modes only)
    for k in range(0, D, BLOCK_D):
        ok_d = (k + offs_d < D)[None, :]
        m_i = ok_i & ok_d
        m_j = ok_j & ok_d
        f_i = tl.load(F_ptr + p_i, mask=m_i, other=0.0)
        e_j = tl.load(E_ptr + p_j, mask=m_j, other=0.0)
        acc = _mma(f_i, tl.trans(e_j), acc, UPCAST, IEEE)
        e_i = tl.load(E_ptr + p_i, mask=m_i, other=0.0)
        f_j = tl.load(F_ptr + p_j, mask=m_j, other=0.0)
        acc = _mma(e_i, tl.trans(f_j), acc, UPCAST, IEEE)
        if CLAMP != 0:
            a_i = tl.load(A_ptr + p_i, mask=m_i, other=0.0)
            a_j = tl.load(A_ptr + p_j, mask=m_j, other=0.0)
            g_s = _mma(a_i, tl.trans(a_j), g_s, UPCAST, IEEE)
            if not IEEE:  # bf16x2: Ĝs = hi hiᵀ + hi loᵀ + lo hiᵀ, so the clamp masks match fp32
                lo_j = tl.load(Lo_ptr + p_j, mask=m_j, other=0.0)
                g_s = _mma(a_i, tl.trans(lo_j), g_s, UPCAST, IEEE)
                lo_i = tl.load(Lo_ptr + p_i, mask=m_i, other=0.0)
                g_s = _mma(lo_i, tl.trans(a_j), g_s, UPCAST, IEEE)
        p_i += BLOCK_D
        p_j += BLOCK_D
    s = 0.5 * acc
    w = s
    if CLAMP == 1:  # remove_neg: relu(Ĝs) - relu(Ĝt); keep the exact S where nothing is clamped
        g_t = g_s - s
        s = tl.where((g_s >= 0) & (g_t >= 0), s, tl.maximum(g_s, 0.0) - tl.maximum(g_t, 0.0))
        w = tl.where(g_s < 0, 0.0, s)
    if CLAMP == 2:  # remove_only_teacher_neg: where Ĝt < 0 the difference is relu(Ĝs)
        g_t = g_s - s
        s = tl.where(g_t < 0, tl.maximum(g_s, 0.0), s)
        w = s
    return s, w


@triton.jit
def _gram_pp_fwd_kernel(
    Partial_ptr,  # out [NB, num_pairs] fp32: Σ S² of each tile pair (×2 off the diagonal)
    A_ptr, Lo_ptr, F_ptr, E_ptr,  # in [NB, Pe, D] working dtype
    PairI_ptr, PairJ_ptr,  # in [num_pairs] int32 row-block indices, i <= j
    P, D, num_pairs,
    CLAMP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    W_ptr=None,  # out [NB, Pe, Pe] working dtype when STORE_W: W = dL/dĜs up to 2/N
    STORE_W: tl.constexpr = False, RNE_FIX: tl.constexpr = False,
):
    """One program per tile pair (i <= j): Σ S² of the pair, and with STORE_W the pair's W_ij
    (rounded to the working dtype, as the recomputing backward rounds it) at (i, j) and, W being
    symmetric, W_ijᵀ at (j, i)."""
    t = tl.program_id(0)
    b = tl.program_id(1)
    i = tl.load(PairI_ptr + t)
    j = tl.load(PairJ_ptr + t)
    base = b.to(tl.int64) * P * D
    A_ptr += base
    Lo_ptr += base
    F_ptr += base
    E_ptr += base
    rows_i = i * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_j = j * BLOCK_M + tl.arange(0, BLOCK_M)
    s, w = _pp_tile(A_ptr, Lo_ptr, F_ptr, E_ptr, rows_i, rows_j, P, D,
                    CLAMP, BLOCK_M, BLOCK_D, UPCAST, IEEE)
    part = tl.sum(tl.sum(s * s, axis=1), axis=0)
    part = tl.where(i == j, part, 2.0 * part)  # tile (i, j) also stands for (j, i): S symmetric
    tl.store(Partial_ptr + b.to(tl.int64) * num_pairs + t, part)
    if STORE_W:
        w = _round(w, W_ptr.dtype.element_ty, RNE_FIX)
        W_ptr += b.to(tl.int64) * P * P
        ok_i = rows_i < P
        ok_j = rows_j < P
        tl.store(W_ptr + rows_i[:, None] * P + rows_j[None, :], w,
                 mask=ok_i[:, None] & ok_j[None, :])
        if i != j:  # a diagonal tile once (its transposed store would race with equal values)
            tl.store(W_ptr + rows_j[:, None] * P + rows_i[None, :], tl.trans(w),
                     mask=ok_j[:, None] & ok_i[None, :])


@triton.jit
def _gram_w_grad_kernel(
    DA_ptr,  # out [NB, Pe, D] fp32: W Â (what _gram_pp_bwd_kernel accumulates)
    W_ptr,  # in [NB, Pe, Pe] working dtype, from _gram_pp_fwd_kernel (STORE_W)
    A_ptr,  # in [NB, Pe, D] working dtype: ŝ
    P, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """The P×P backward from a stored W: one batched GEMM, a [BLOCK_M, BLOCK_N] tile of dÂ per
    program, K = Pe. Deterministic (no atomics) and no S recomputed."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    b = tl.program_id(2)
    W_ptr += b.to(tl.int64) * P * P
    A_ptr += b.to(tl.int64) * P * D
    DA_ptr += b.to(tl.int64) * P * D
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, P, BLOCK_K):
        kk = k0 + offs_k
        w = tl.load(W_ptr + rows[:, None] * P + kk[None, :],
                    mask=(rows < P)[:, None] & (kk < P)[None, :], other=0.0)
        a = tl.load(A_ptr + kk[:, None] * D + cols[None, :],
                    mask=(kk < P)[:, None] & (cols < D)[None, :], other=0.0)
        acc = _mma(w, a, acc, UPCAST, IEEE)
    tl.store(DA_ptr + rows[:, None] * D + cols[None, :], acc,
             mask=(rows < P)[:, None] & (cols < D)[None, :])


@triton.jit
def _gram_pp_bwd_kernel(
    DA_ptr,  # out [NB, Pe, D] fp32: Σ_j W_ij Â_j, each program writes only its rows i
    A_ptr, Lo_ptr, F_ptr, E_ptr,  # in [NB, Pe, D] working dtype
    P, D,
    CLAMP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, RNE_FIX: tl.constexpr,
):
    """One program per row block i: for every column block j in order, recompute S_ij (and the
    clamp's Ĝs_ij) and add W_ij Â_j into its own rows of dÂ. No atomics and a fixed order over j,
    so the gradient is bitwise reproducible; the price is S recomputed for j < i as well (bwd
    6·Pe²·D FLOPs instead of 4). dÂ_i lives in global memory (it is [BLOCK_M, D] with D up to
    4096): each j reads it back and adds, which is the traffic the atomics had, without their
    contention on the same rows."""
    i = tl.program_id(0)
    b = tl.program_id(1)
    base = b.to(tl.int64) * P * D
    A_ptr += base
    Lo_ptr += base
    F_ptr += base
    E_ptr += base
    DA_ptr += base
    rows_i = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)  # the gradient's D loop has its own width
    ok_i = (rows_i < P)[:, None]
    p_i = rows_i[:, None] * D + offs_n[None, :]  # [BM, BN] at k = 0
    for j in range(0, tl.cdiv(P, BLOCK_M)):
        rows_j = j * BLOCK_M + tl.arange(0, BLOCK_M)
        _, w = _pp_tile(A_ptr, Lo_ptr, F_ptr, E_ptr, rows_i, rows_j, P, D,
                        CLAMP, BLOCK_M, BLOCK_D, UPCAST, IEEE)
        w = _round(w, A_ptr.dtype.element_ty, RNE_FIX)  # small values: a relative rounding is fine
        ok_j = (rows_j < P)[:, None]
        p_j = rows_j[:, None] * D + offs_n[None, :]
        # the rows of dÂ_i that column block j - 1 stored were stored by other threads than the
        # ones that read them below (the dot layouts differ): a block barrier makes them visible
        tl.debug_barrier()
        for k in range(0, D, BLOCK_N):
            ok_d = (k + offs_n < D)[None, :]
            a_j = tl.load(A_ptr + p_j + k, mask=ok_j & ok_d, other=0.0)
            prev = tl.load(DA_ptr + p_i + k, mask=ok_i & ok_d & (j > 0), other=0.0)
            tl.store(DA_ptr + p_i + k, _mma(w, a_j, prev, UPCAST, IEEE), mask=ok_i & ok_d)


@triton.jit
def _dd_pair_epilogue(M_ptr, Partial_ptr, ff, ee, x, y, pk, pl, pair, b, D, num_pairs,
                      BLOCK_K: tl.constexpr, RNE_FIX: tl.constexpr):
    """Block pair (I, J) = (pk, pl), I <= J, of image b, from its four [BK, BK] fp32 blocks
    ff = F_IᵀF_J, ee = E_IᵀE_J, x = F_IᵀE_J = X[I, J] and y = E_IᵀF_J = X[J, I]ᵀ:
    - the loss partial ⟨FᵀF, EᵀE⟩ + tr(X X) restricted to blocks (I, J) and (J, I): both Grams
      are symmetric and Σ_(I,J) X∘X[J, I]ᵀ = Σ x∘y, so an off-diagonal pair counts twice;
    - M1 = Xᵀ + EᵀE and M2 = FᵀF + X (what the backward multiplies F and E by) at (I, J) and,
      transposed, at (J, I): M1[J, I] = (x + ee)ᵀ, M2[J, I] = (ff + y)ᵀ. A diagonal block is
      written once (its two formulas agree only up to rounding)."""
    w = tl.where(pk == pl, 1.0, 2.0)
    part = tl.sum(tl.sum(ff * ee + x * y, axis=1), axis=0)
    tl.store(Partial_ptr + b * num_pairs + pair, w * part)
    ck = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    cl = pl * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = D.to(tl.int64) * D
    m1_ptr = M_ptr + b.to(tl.int64) * 2 * dd
    m2_ptr = m1_ptr + dd
    ty = M_ptr.dtype.element_ty
    p_ij = ck[:, None] * D + cl[None, :]
    m_ij = (ck < D)[:, None] & (cl < D)[None, :]
    tl.store(m1_ptr + p_ij, _round(y + ee, ty, RNE_FIX), mask=m_ij)
    tl.store(m2_ptr + p_ij, _round(ff + x, ty, RNE_FIX), mask=m_ij)
    if pk != pl:
        p_ji = cl[:, None] * D + ck[None, :]
        m_ji = (cl < D)[:, None] & (ck < D)[None, :]
        tl.store(m1_ptr + p_ji, _round(tl.trans(x + ee), ty, RNE_FIX), mask=m_ji)
        tl.store(m2_ptr + p_ji, _round(tl.trans(ff + y), ty, RNE_FIX), mask=m_ji)


@triton.jit
def _gram_dd_fwd_kernel(
    Out_ptr,  # SPLIT: [NB, S, num_pairs, 4, BK, BK] fp32 raw blocks; else M [NB, 2, D, D] (M1, M2)
    Partial_ptr,  # [NB, num_pairs] fp32 loss partials (unused when SPLIT)
    F_ptr, E_ptr,  # in [NB, Pe, D] working dtype, rows stride_fe apart
    PairI_ptr, PairJ_ptr,  # [num_pairs] int32 block pairs I <= J
    P, D, stride_fe, num_pairs, rows_per_split,
    SPLIT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, RNE_FIX: tl.constexpr,
):
    """One program: block pair (I, J), I <= J, of image b over rows [split · rows_per_split, +
    rows_per_split) of F and E: four dots per row step (F_IᵀF_J, E_IᵀE_J, F_IᵀE_J, E_IᵀF_J) on
    the same four operand tiles, i.e. 2·Pe·D² MACs per image instead of 3 for full FᵀF, EᵀE
    and X, and the symmetric halves come for free. Without SPLIT the epilogue finishes the
    pair; with it the raw blocks go to a scratch buffer that `_gram_dd_finish_kernel` sums in a
    fixed order (deterministic; for grids too small to fill the GPU)."""
    pair = tl.program_id(0)
    b = tl.program_id(1)
    sp = tl.program_id(2)
    pk = tl.load(PairI_ptr + pair)
    pl = tl.load(PairJ_ptr + pair)
    F_ptr += b.to(tl.int64) * P * stride_fe
    E_ptr += b.to(tl.int64) * P * stride_fe
    ck = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    cl = pl * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_P)
    acc_ff = tl.zeros((BLOCK_K, BLOCK_K), tl.float32)
    acc_ee = tl.zeros((BLOCK_K, BLOCK_K), tl.float32)
    acc_x = tl.zeros((BLOCK_K, BLOCK_K), tl.float32)
    acc_y = tl.zeros((BLOCK_K, BLOCK_K), tl.float32)
    p_lo = sp * rows_per_split
    p_hi = tl.minimum(P, p_lo + rows_per_split)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        r = p0 + offs_p
        ok_r = r < p_hi
        p_kt = r[None, :] * stride_fe + ck[:, None]  # [BK, BP]: columns of block I, transposed
        p_l = r[:, None] * stride_fe + cl[None, :]  # [BP, BK]: columns of block J
        m_kt = (ck < D)[:, None] & ok_r[None, :]
        m_l = ok_r[:, None] & (cl < D)[None, :]
        f_kt = tl.load(F_ptr + p_kt, mask=m_kt, other=0.0)
        e_kt = tl.load(E_ptr + p_kt, mask=m_kt, other=0.0)
        f_l = tl.load(F_ptr + p_l, mask=m_l, other=0.0)
        e_l = tl.load(E_ptr + p_l, mask=m_l, other=0.0)
        acc_ff = _mma(f_kt, f_l, acc_ff, UPCAST, IEEE)
        acc_ee = _mma(e_kt, e_l, acc_ee, UPCAST, IEEE)
        acc_x = _mma(f_kt, e_l, acc_x, UPCAST, IEEE)
        acc_y = _mma(e_kt, f_l, acc_y, UPCAST, IEEE)
    if SPLIT:
        blk = BLOCK_K * BLOCK_K
        base = ((b.to(tl.int64) * tl.num_programs(2) + sp) * num_pairs + pair) * 4 * blk
        p_blk = tl.arange(0, BLOCK_K)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        tl.store(Out_ptr + base + p_blk, acc_ff)
        tl.store(Out_ptr + base + blk + p_blk, acc_ee)
        tl.store(Out_ptr + base + 2 * blk + p_blk, acc_x)
        tl.store(Out_ptr + base + 3 * blk + p_blk, acc_y)
    else:
        _dd_pair_epilogue(Out_ptr, Partial_ptr, acc_ff, acc_ee, acc_x, acc_y, pk, pl, pair, b, D,
                          num_pairs, BLOCK_K, RNE_FIX)


@triton.jit
def _gram_dd_finish_kernel(
    M_ptr,  # out [NB, 2, D, D] working dtype: M1, M2
    Partial_ptr,  # out [NB, num_pairs] fp32
    Split_ptr,  # in [NB, S, num_pairs, 4, BK, BK] fp32 from _gram_dd_fwd_kernel (SPLIT)
    PairI_ptr, PairJ_ptr,
    D, num_pairs, num_splits,
    BLOCK_K: tl.constexpr, RNE_FIX: tl.constexpr,
):
    """Sums the row splits of one block pair in split order, then the pair epilogue."""
    pair = tl.program_id(0)
    b = tl.program_id(1)
    pk = tl.load(PairI_ptr + pair)
    pl = tl.load(PairJ_ptr + pair)
    blk = BLOCK_K * BLOCK_K
    p_blk = tl.arange(0, BLOCK_K)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    ff = tl.zeros((BLOCK_K, BLOCK_K), tl.float32)
    ee = tl.zeros((BLOCK_K, BLOCK_K), tl.float32)
    x = tl.zeros((BLOCK_K, BLOCK_K), tl.float32)
    y = tl.zeros((BLOCK_K, BLOCK_K), tl.float32)
    for sp in range(0, num_splits):
        base = ((b.to(tl.int64) * num_splits + sp) * num_pairs + pair) * 4 * blk
        ff += tl.load(Split_ptr + base + p_blk)
        ee += tl.load(Split_ptr + base + blk + p_blk)
        x += tl.load(Split_ptr + base + 2 * blk + p_blk)
        y += tl.load(Split_ptr + base + 3 * blk + p_blk)
    _dd_pair_epilogue(M_ptr, Partial_ptr, ff, ee, x, y, pk, pl, pair, b, D, num_pairs, BLOCK_K,
                      RNE_FIX)


@triton.jit
def _gram_dd_bwd_kernel(
    DA_ptr,  # out [NB, Pe, D] fp32: F M1 + E M2 = 4 S ŝ (the ¼ is in gram_bwd's scale)
    F_ptr, E_ptr,  # in [NB, Pe, D] working dtype, rows stride_fe apart
    M_ptr,  # in [NB, 2, D, D] working dtype: M1 = Xᵀ + EᵀE, M2 = FᵀF + X (_dd_pair_epilogue)
    P, D, stride_fe,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    b = tl.program_id(2)
    F_ptr += b.to(tl.int64) * P * stride_fe
    E_ptr += b.to(tl.int64) * P * stride_fe
    DA_ptr += b.to(tl.int64) * P * D
    M1_ptr = M_ptr + b.to(tl.int64) * 2 * D * D
    M2_ptr = M1_ptr + D * D
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        m_a = (rows < P)[:, None] & (kk < D)[None, :]
        m_m = (kk < D)[:, None] & (cols < D)[None, :]
        p_a = rows[:, None] * stride_fe + kk[None, :]  # [BM, BK]
        p_m = kk[:, None] * D + cols[None, :]  # [BK, BN]
        acc = _mma(tl.load(F_ptr + p_a, mask=m_a, other=0.0),
                   tl.load(M1_ptr + p_m, mask=m_m, other=0.0), acc, UPCAST, IEEE)
        acc = _mma(tl.load(E_ptr + p_a, mask=m_a, other=0.0),
                   tl.load(M2_ptr + p_m, mask=m_m, other=0.0), acc, UPCAST, IEEE)
    m_o = (rows < P)[:, None] & (cols < D)[None, :]
    tl.store(DA_ptr + rows[:, None] * D + cols[None, :], acc, mask=m_o)


@triton.jit
def _gram_norm_bwd_kernel(
    DS_ptr,  # out [R, D] student gradient, student dtype
    DA_ptr,  # in  [R, D] fp32 S ŝ (unscaled dL/dŝ)
    S_ptr,  # in  [R, D] student rows
    Scale_ptr,  # in  [1] fp32: 4·grad_out / N
    R, D, EPS,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ONE_PASS: tl.constexpr,
    RNE_FIX: tl.constexpr,
):
    """Backward of ŝ = s / max(‖s‖, eps): ds = (g - ŝ (ŝ·g)) / ‖s‖ (or g / eps below eps).
    BLOCK_R rows per program; ONE_PASS as in _gram_prep_kernel."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = (rows < R)[:, None]
    base = rows[:, None] * D
    offs = tl.arange(0, BLOCK_D)[None, :]
    scale = tl.load(Scale_ptr)
    if ONE_PASS:
        m = row_ok & (offs < D)
        s = tl.load(S_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(DA_ptr + base + offs, mask=m, other=0.0) * scale
        norm = tl.sqrt(tl.sum(s * s, axis=1))
        inv = 1.0 / tl.maximum(norm, EPS)
        coef = tl.where(norm > EPS, tl.sum(s * g, axis=1) * inv * inv, 0.0)  # (ŝ·g) / ‖s‖
        ds = _round(inv[:, None] * (g - s * coef[:, None]), DS_ptr.dtype.element_ty, RNE_FIX)
        tl.store(DS_ptr + base + offs, ds, mask=m)
    else:
        ss = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        sg = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        for k in range(0, D, BLOCK_D):
            m = row_ok & (k + offs < D)
            s = tl.load(S_ptr + base + k + offs, mask=m, other=0.0).to(tl.float32)
            g = tl.load(DA_ptr + base + k + offs, mask=m, other=0.0) * scale
            ss += s * s
            sg += s * g
        norm = tl.sqrt(tl.sum(ss, axis=1))
        inv = 1.0 / tl.maximum(norm, EPS)
        coef = tl.where(norm > EPS, tl.sum(sg, axis=1) * inv * inv, 0.0)
        for k in range(0, D, BLOCK_D):
            m = row_ok & (k + offs < D)
            s = tl.load(S_ptr + base + k + offs, mask=m, other=0.0).to(tl.float32)
            g = tl.load(DA_ptr + base + k + offs, mask=m, other=0.0) * scale
            ds = _round(inv[:, None] * (g - s * coef[:, None]), DS_ptr.dtype.element_ty, RNE_FIX)
            tl.store(DS_ptr + base + k + offs, ds, mask=m)


# ------------------------------------------------------------------------------------------------
# Launchers: allocate, pick the form and the fixed tile configuration, launch
# ------------------------------------------------------------------------------------------------

# Shipped GPU configurations, per architecture (compile_specs() compiles each for sm_90 and sm_80;
# none may spill). Register counts in the comments are per thread, "sm_90 tiles on sm_90 / sm_80
# tiles on sm_80" (255 is the cap), triton 3.9 (3.6 the same or lower unless noted), on the path
# real launches take: 16-byte aligned pointers and D % 16 == 0, which the runtime specialises on
# and compile_specs() declares (cp.async pipelined loads; tests/kernels/test_gram_compile.py).
# The odd-D path (scalar loads, what a report without the hints compiles) takes more: up to 254
# for the sm_80 P×P backward, still without spills. What drives the choices:
# - fp32 operands use input_precision="ieee", i.e. FMA dots, which hold a whole K slice of both
#   operands per thread: K (BLOCK_D, BLOCK_P, BLOCK_K) is 16 for fp32, whatever the row tile. FMA
#   dots have no MMA fragments to duplicate: the same tiles on both architectures.
# - Warps on an MMA tile. When the dots of a loop share a value (here: every P×P and D×D
#   kernel: two dots into one accumulator, or a dot result feeding the next dot) Triton's "chained
#   dot" rule lays ALL warps along M (warpsPerCTA = [num_warps, 1]). On sm_80 (mma.sync,
#   m16n8k16) a warp covers 16 rows, so on a 64-row tile only 64/16 = 4 warps have distinct
#   fragments: 8 warps compute every fragment twice (the same mma.sync count per warp as with 4
#   warps, twice the warps; read from the TTGIR/PTX). So bf16/fp16 tiles on sm_80 use
#   num_warps = BLOCK_M / 16 = 4 (`_mma_v2_warps`); each warp's registers are what they were with
#   8 (same 16-row slice and whole B tile per warp), the block has half the threads.
#   tests/kernels/test_gram_compile.py reads the MMA layouts of the shipped sm_80 tiles and fails
#   on any repeated fragment. BLOCK_M stays 64: the symmetric tile pairs need square tiles, and
#   128×128 fp32 accumulators take 64 registers per accumulator per thread even over 8 warps.
# - sm_90 (wgmma): the same 4-warp tiles (`auto_tiles`). With 8 warps the first dot of each P×P
#   chain (and of the D×D backward) gets warpsPerCTA [8, 1] on 64 rows, i.e. its fragments are
#   computed by both warpgroups, and its accumulator is converted to the second dot's [4, 2]
#   layout every step; 4 warps give one [4, 1] layout and fewer wgmma (pp fwd: 4 vs 6 per step).
#   Timed on an H200 (bench/results/nvidia-h200-2026-11-26-check1/, ViT-L bf16 fwd / bwd ms):
#   P×P per image 0.244 / 0.501 with 4 warps against 0.335 / 0.800 with 8; D×D flattened
#   0.446 / 0.619 against 0.460 / 1.266. The 8-warp set stays as `tiles="sm90"` for A/B timings
#   (`python -m bench gram` times it as the provider triton_sm90_tiles).
# - num_stages only matters on the aligned path (unaligned loads are not cp.async).
def _mma_v2_warps(block_m: int) -> int:
    """Warps for a chained-dot tile on sm_80: one per 16-row mma.sync slice of BLOCK_M."""
    return block_m // 16


def _pp_gpu(work: torch.dtype, clamp: int, bwd: bool = False, arch: int = 90) -> dict:
    """BLOCK_D: the D step of S_ij (and Ĝs_ij); bwd also BLOCK_N: the D step of dÂ_i += W_ij Â_j."""
    if work == torch.float32:  # fwd 116/116 (clamp 128/128), bwd 114/114 (clamp 128/128)
        cfg, block_n = dict(BLOCK_M=64, BLOCK_D=16, num_warps=8, num_stages=2), 16
    elif clamp != CLAMP_NONE:  # 6 operand tiles per step: fwd 90/120, bwd 138/168
        cfg, block_n = dict(BLOCK_M=64, BLOCK_D=16, num_warps=8, num_stages=3), 32
        if arch < 90:  # 4 warps with a 32-wide dÂ step: 254 registers (no spill yet); 16 wide
            block_n = 16
    else:  # fwd 74/78, bwd 100/168
        cfg, block_n = dict(BLOCK_M=64, BLOCK_D=32, num_warps=8, num_stages=3), 32
    if work != torch.float32 and arch < 90:
        cfg["num_warps"] = _mma_v2_warps(cfg["BLOCK_M"])
    if bwd:
        cfg["BLOCK_N"] = block_n
    return cfg


def _dd_fwd_gpu(work: torch.dtype, arch: int = 90) -> dict:  # 4 fp32 accumulators of 64×64
    # registers sm_90 / sm_80 (triton 3.6 and 3.9): fp32 ~190/199; bf16 8 warps 92-116, the
    # 4-warp set 162-166 / 236-250 (no spill)
    block_p = 16 if work == torch.float32 else 32
    warps = _mma_v2_warps(64) if work != torch.float32 and arch < 90 else 8
    return dict(BLOCK_K=64, BLOCK_P=block_p, num_warps=warps, num_stages=3)


def _dd_bwd_gpu(work: torch.dtype, arch: int = 90) -> dict:
    """dÂ = F M1 + E M2 is a plain GEMM with K = 2D (one accumulator, no chained dots), so bf16
    takes GEMM tiles: 128×128 with 8 warps (two warpgroups of 64×128 on sm_90; on sm_80 the 8
    warps along M compute distinct 16-row slices). The 4-warp 64×64 tiles reached 358 TFLOP/s
    here (P = 4096, D = 1024, 8 images, H200 check4: 384 µs), and the forced sm90 set keeps
    them for the A/B (its former 8 warps on 64×64 computed every wgmma fragment twice: 1.27 ms
    against 0.62 ms flattened, H200 check4). fp32 (FMA dots): 64×64, BLOCK_K 16."""
    if work == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=3)
    if arch >= 90:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)


def _w_grad_gpu(work: torch.dtype, arch: int = 90) -> dict:
    """The stored-W backward is a plain batched GEMM (K = Pe): the D×D backward's tiles."""
    return _dd_bwd_gpu(work, arch)


def _w_grad_config(pe: int, d: int, work: torch.dtype, arch: int = 90) -> dict:
    if not is_interpreter():
        return _w_grad_gpu(work, arch)
    return dict(BLOCK_M=min(64, max(16, next_pow2(pe))), BLOCK_N=min(64, max(16, next_pow2(d))),
                BLOCK_K=min(64, max(16, next_pow2(pe))))


# The tile family for a device: 90 (warpgroup MMA: sm_90, sm_100) or 80 (per-warp mma.sync:
# sm_80..89 and consumer Blackwell sm_120, which has no wgmma); shared with the other kernels.
device_arch = arch_family
_cuda_arch = _cuda_arch_family  # its per-device cache


def auto_tiles(device: torch.device) -> int:
    """The tile set `tiles="auto"` launches: the 4-warp set (named sm80) on every GPU. It is the
    only correct choice for per-warp mma.sync parts (no fragment computed twice) and it was also
    the faster one on sm_90 in every bf16 case timed (the comment above `_mma_v2_warps`); fp32
    tiles are the same in both sets. `device_arch` still names the family (other kernels use it)."""
    return 80


# Prep and norm backward (memory-bound: each reads and writes every row once). A row that fits
# in registers (D <= ROW_MAX_ONE_PASS) is read once and stays there between its norm and its
# stores, and a program takes ROW_ELEMS // BLOCK_D rows (4 at D = 1024: 16 elements of each input
# per thread in flight, against 4 with one row); wider rows take one row per program and two
# passes over D in ROW_BLOCK_D chunks, the second re-reading from L2. The latter was the only
# kernel until 2026-11-26 (prep 90 µs, norm backward 78 µs at P = 4096, 8 images: ~70 % and ~60 %
# of the copy bandwidth); row_pass="loop" still launches it, for A/B timings.
ROW_BLOCK_D = 1024
ROW_WARPS = 8  # 4+ elements a thread (with 4 warps triton 3.6 put 8 B on the stack for fp16 prep;
# 16 warps for 4096-wide rows: with 8, 8 B of stack for fp32 prep on sm_90 under 3.6)
ROW_ELEMS = 4096
ROW_MAX_ONE_PASS = 4096


def _row_config(d: int, loop: bool = False) -> dict:
    """BLOCK_R rows per program, BLOCK_D features per chunk, ONE_PASS, num_warps."""
    if is_interpreter():  # 64-wide chunks: the test shapes reach both paths, 4-row partial blocks
        bd = min(64, next_pow2(d))
        return dict(BLOCK_R=1 if loop else 4, BLOCK_D=bd, ONE_PASS=d <= bd and not loop,
                    num_warps=4)
    return _row_gpu(d, loop)


def _row_gpu(d: int, loop: bool = False) -> dict:
    if loop or d > ROW_MAX_ONE_PASS:
        return dict(BLOCK_R=1, BLOCK_D=ROW_BLOCK_D, ONE_PASS=False, num_warps=ROW_WARPS)
    bd = next_pow2(d)
    return dict(BLOCK_R=max(1, min(8, ROW_ELEMS // bd)), BLOCK_D=bd, ONE_PASS=True,
                num_warps=16 if bd >= 4096 else ROW_WARPS)


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _dot_flags(dtype: torch.dtype) -> dict:
    work = _working_dtype(dtype)
    return dict(UPCAST=is_interpreter() and work != torch.float32, IEEE=work == torch.float32)


def _rne_fix(dtype: torch.dtype) -> bool:
    return is_interpreter() and dtype == torch.bfloat16


def _pp_config(pe: int, d: int, work: torch.dtype, clamp: int, bwd: bool = False,
               arch: int = 90) -> dict:
    if not is_interpreter():
        return _pp_gpu(work, clamp, bwd, arch)
    # interpreter: big tiles = few programs (it runs programs one by one)
    cfg = dict(BLOCK_M=min(64, max(16, next_pow2(pe))), BLOCK_D=min(128, max(16, next_pow2(d))))
    if bwd:
        cfg["BLOCK_N"] = cfg["BLOCK_D"]
    return cfg


def _dd_config(pe: int, d: int, work: torch.dtype, bwd: bool = False, arch: int = 90) -> dict:
    if not is_interpreter():
        return _dd_bwd_gpu(work, arch) if bwd else _dd_fwd_gpu(work, arch)
    block_d = min(64, max(16, next_pow2(d)))
    if bwd:
        return dict(BLOCK_M=min(64, max(16, next_pow2(pe))), BLOCK_N=block_d, BLOCK_K=block_d)
    return dict(BLOCK_K=block_d, BLOCK_P=min(128, max(16, next_pow2(pe))))


DD_FINISH_WARPS = 8  # four 64×64 fp32 blocks: 64 registers a thread for them
DD_SPLIT_MIN_ROWS = 1024  # a row split streams at least this many rows (its scratch is 64 KB)
DD_MAX_SPLITS = 4


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dd_splits(programs: int, pe: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows_per_split) of the D×D forward's rows. A grid of block pairs × images under
    two waves leaves SMs idle (ViT-L flattened: 136 pairs on 132 SMs is one full wave and 4
    programs), so there the rows are split and the raw blocks summed by a finish launch: the
    split count minimises waves × rows per program, at most DD_MAX_SPLITS and each split
    DD_SPLIT_MIN_ROWS rows or more. One split off CUDA (the interpreter runs programs one by one;
    tests force splits through this function)."""
    if device.type != "cuda":
        return 1, pe
    sms = _sm_count(device)
    if programs >= 2 * sms:
        return 1, pe
    best = (cdiv(programs, sms) * pe, 1)
    for s in range(2, DD_MAX_SPLITS + 1):
        rows = cdiv(pe, s)
        if rows < DD_SPLIT_MIN_ROWS:
            break
        best = min(best, (cdiv(programs * s, sms) * rows, s))
    if best[1] == 1:
        return 1, pe
    rows = cdiv(cdiv(pe, best[1]), 64) * 64  # whole row steps of every tile set
    return cdiv(pe, rows), rows


def stores_w(pe: int, d: int) -> bool:
    """The P×P form's default backward (`gram_loss(pp_backward="auto")`): W stored by the
    forward when it is no larger than F or E (Pe <= D: ViT-L 224 px, 196 × 1024; 7B 256 px),
    so a batched GEMM replaces the recomputation of S (6·Pe²·D backward FLOPs on chained tiles,
    0.50 ms at ViT-L 224 px on the H200 in check5) without leaving O(P·D) memory."""
    return pe <= d


def choose_form(pe: int, d: int, clamp: int) -> int:
    """P×P (fwd+bwd 8·Pe²·D) unless a clamp is off and D×D (8·Pe·D²) is no dearer: Pe >= D (at
    the tie D×D, whose big square GEMM tiles ran ~4x the P×P form's TFLOP/s on the H200)."""
    return FORM_DD if clamp == CLAMP_NONE and pe >= d else FORM_PP


_PAIRS: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _tile_pairs(num_blocks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-block pairs (i, j) with i <= j, as two int32 tensors [num_blocks·(num_blocks+1)/2]."""
    key = (num_blocks, str(device))
    if key not in _PAIRS:
        ij = torch.triu_indices(num_blocks, num_blocks)
        _PAIRS[key] = (ij[0].to(device, torch.int32).contiguous(),
                       ij[1].to(device, torch.int32).contiguous())
    return _PAIRS[key]


def _views(student: torch.Tensor, img_level: bool) -> tuple[int, int, int]:
    b, p, d = student.shape
    return (b, p, d) if img_level else (1, b * p, d)


def _needs_lo(dtype: torch.dtype, clamp: int) -> bool:
    return clamp != CLAMP_NONE and _working_dtype(dtype) != torch.float32


def _fe_views(fe: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """F and E of the D×D form's [..., 2D] buffer FE = [F | E] (rows 2D apart)."""
    return fe[..., :d], fe[..., d:]


def gram_prep(student: torch.Tensor, teacher: torch.Tensor, write_lo: bool,
              write_a: bool = True, row_loop: bool = False):
    """[..., D] rows -> ŝ (empty unless write_a), lo(ŝ) (empty unless write_lo), F = ŝ + t̂,
    E = ŝ - t̂ in the working dtype. The P×P form (write_a) gets F and E as two [..., D]
    tensors; the D×D form one [..., 2D] buffer FE = [F | E] returned as F (E empty), so that
    its backward is one GEMM FE·[M1; M2] with K = 2D."""
    s, t = student.contiguous(), teacher.contiguous().to(student.dtype)
    d = s.shape[-1]
    work = _working_dtype(s.dtype)
    if write_a:
        f, e = (torch.empty(s.shape, dtype=work, device=s.device) for _ in range(2))
        f_arg, e_arg, stride_fe = f, e, d
    else:
        f = torch.empty(*s.shape[:-1], 2 * d, dtype=work, device=s.device)
        e = torch.empty(0, dtype=work, device=s.device)
        (f_arg, e_arg), stride_fe = _fe_views(f, d), 2 * d
    a = torch.empty(s.shape if write_a else (0,), dtype=work, device=s.device)
    lo = torch.empty(s.shape if write_lo else (0,), dtype=work, device=s.device)
    rows = s.numel() // max(d, 1)
    if rows:
        cfg = _row_config(d, row_loop)
        _gram_prep_kernel[(cdiv(rows, cfg["BLOCK_R"]),)](
            a if write_a else f_arg, lo if write_lo else f_arg, f_arg, e_arg, s, t, rows, d,
            stride_fe, NORM_EPS, **cfg, RNE_FIX=_rne_fix(work), WRITE_LO=write_lo,
            WRITE_A=write_a)
    return a, lo, f, e


def gram_fwd(student: torch.Tensor, teacher: torch.Tensor, img_level: bool, clamp: int, form: int,
             arch: int = 0, store_w: bool = False, row_loop: bool = False):
    """-> loss (fp32 scalar), ŝ, lo(ŝ), F, E ([NB, Pe, D] working dtype; lo empty unless a clamp
    runs on bf16/fp16; the D×D form returns FE = [F | E] [NB, Pe, 2D] as F, E empty, and no ŝ),
    mats: for the D×D form [NB, 2, D, D] (M1, M2), for P×P with store_w [NB, Pe, Pe] (W), else
    empty; working dtype."""
    nb, pe, d = _views(student, img_level)
    write_lo = _needs_lo(student.dtype, clamp)
    a, lo, f, e = gram_prep(student, teacher, write_lo, write_a=form == FORM_PP,
                            row_loop=row_loop)
    if form == FORM_PP:
        f, e, a = (x.view(nb, pe, d) for x in (f, e, a))
    else:
        f = f.view(nb, pe, 2 * d)
    lo = lo.view(nb, pe, d) if write_lo else lo
    flags = _dot_flags(student.dtype)
    n = float(nb) * pe * pe
    if form == FORM_PP:
        cfg = _pp_config(pe, d, a.dtype, clamp, arch=arch or auto_tiles(student.device))
        pi, pj = _tile_pairs(cdiv(pe, cfg["BLOCK_M"]), student.device)
        partial = torch.empty(nb, pi.numel(), dtype=torch.float32, device=student.device)
        mats = torch.empty((nb, pe, pe) if store_w else (0,), dtype=a.dtype,
                           device=student.device)
        _gram_pp_fwd_kernel[(pi.numel(), nb)](partial, a, lo if write_lo else a, f, e, pi, pj,
                                              pe, d, pi.numel(), CLAMP=clamp, **cfg, **flags,
                                              W_ptr=mats if store_w else partial,
                                              STORE_W=store_w, RNE_FIX=_rne_fix(a.dtype))
        loss = partial.sum() / n  # fixed-order sum of per-tile partials: deterministic
    else:
        cfg = _dd_config(pe, d, a.dtype, arch=arch or auto_tiles(student.device))
        bk = cfg["BLOCK_K"]
        pi, pj = _tile_pairs(cdiv(d, bk), student.device)
        pairs = pi.numel()
        splits, rows_per_split = _dd_splits(nb * pairs, pe, student.device)
        mats = torch.empty(nb, 2, d, d, dtype=a.dtype, device=student.device)  # M1, M2
        partial = torch.empty(nb, pairs, dtype=torch.float32, device=student.device)
        rne = _rne_fix(a.dtype)
        fv, ev = _fe_views(f, d)
        if splits == 1:
            _gram_dd_fwd_kernel[(pairs, nb, 1)](mats, partial, fv, ev, pi, pj, pe, d, 2 * d,
                                                pairs, pe, SPLIT=False, **cfg, **flags,
                                                RNE_FIX=rne)
        else:
            scratch = torch.empty(nb, splits, pairs, 4, bk, bk, dtype=torch.float32,
                                  device=student.device)
            _gram_dd_fwd_kernel[(pairs, nb, splits)](scratch, partial, fv, ev, pi, pj, pe, d,
                                                     2 * d, pairs, rows_per_split, SPLIT=True,
                                                     **cfg, **flags, RNE_FIX=rne)
            _gram_dd_finish_kernel[(pairs, nb)](mats, partial, scratch, pi, pj, d, pairs, splits,
                                                BLOCK_K=bk, RNE_FIX=rne,
                                                num_warps=DD_FINISH_WARPS)
        loss = 0.5 * partial.sum() / n  # fixed-order sum of per-pair partials: deterministic
    return loss, a, lo, f, e, mats


@functools.cache
def bmm_f32_available() -> bool:
    """torch.bmm(..., out_dtype=torch.float32) on bf16/fp16 (aten::bmm.dtype, torch >= 2.8)."""
    return hasattr(torch.ops.aten.bmm, "dtype")


def _bmm_f32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [B, M, K] @ y [B, K, N], half precision in, fp32 out: exact products accumulated in
    fp32, as the Triton GEMMs. cuBLAS on CUDA; elsewhere (CPU tests) the same in fp32 math."""
    if x.is_cuda:
        return torch.bmm(x, y, out_dtype=torch.float32)
    return torch.bmm(x.float(), y.float())


def gram_bwd(grad: torch.Tensor, student: torch.Tensor, a: torch.Tensor, lo: torch.Tensor,
             f: torch.Tensor, e: torch.Tensor, mats: torch.Tensor, img_level: bool, clamp: int,
             form: int, arch: int = 0, row_loop: bool = False, gemm_bmm: bool = False):
    """dL/dstudent [B, P, D] in the student's dtype. gemm_bmm (bf16/fp16): the backwards that
    are one batched GEMM (D×D: FE·[M1; M2]; P×P with a stored W: W ŝ) run torch.bmm (cuBLAS,
    fp32 out) instead of the Triton kernels; see `gram_loss(backward_gemm=...)`."""
    nb, pe, d = _views(student, img_level)
    flags = _dot_flags(student.dtype)
    if form == FORM_PP and mats.numel() and gemm_bmm:  # W stored by the forward: W ŝ
        da = _bmm_f32(mats, a)
    elif form == FORM_PP and mats.numel():
        cfg = _w_grad_config(pe, d, a.dtype, arch=arch or auto_tiles(student.device))
        da = torch.empty(nb, pe, d, dtype=torch.float32, device=student.device)
        grid = (cdiv(pe, cfg["BLOCK_M"]), cdiv(d, cfg["BLOCK_N"]), nb)
        _gram_w_grad_kernel[grid](da, mats, a, pe, d, **cfg, **flags)
    elif form == FORM_PP:
        cfg = _pp_config(pe, d, a.dtype, clamp, bwd=True,
                         arch=arch or auto_tiles(student.device))
        da = torch.empty(nb, pe, d, dtype=torch.float32, device=student.device)
        lo_arg = lo if _needs_lo(student.dtype, clamp) else a
        grid = (cdiv(pe, cfg["BLOCK_M"]), nb)  # one program per row block of dÂ
        _gram_pp_bwd_kernel[grid](da, a, lo_arg, f, e, pe, d, CLAMP=clamp, **cfg, **flags,
                                  RNE_FIX=_rne_fix(a.dtype))
    if form == FORM_DD and gemm_bmm:  # f is FE [NB, Pe, 2D]; mats [NB, 2D, D] = [M1; M2]
        da = _bmm_f32(f, mats.view(nb, 2 * d, d))
    elif form == FORM_DD:
        cfg = _dd_config(pe, d, f.dtype, bwd=True, arch=arch or auto_tiles(student.device))
        da = torch.empty(nb, pe, d, dtype=torch.float32, device=student.device)
        grid = (cdiv(pe, cfg["BLOCK_M"]), cdiv(d, cfg["BLOCK_N"]), nb)
        _gram_dd_bwd_kernel[grid](da, *_fe_views(f, d), mats, pe, d, 2 * d, **cfg, **flags)
    # dL/dŝ = (4/N) S ŝ; the D×D GEMMs give F M1 + E M2 = 4 S ŝ (exact powers of two)
    scale = (grad.detach().float() * ((1.0 if form == FORM_DD else 4.0) / (float(nb) * pe * pe))
             ).reshape(1)
    s = student.contiguous()
    ds = torch.empty_like(s)
    cfg = _row_config(d, row_loop)
    _gram_norm_bwd_kernel[(cdiv(nb * pe, cfg["BLOCK_R"]),)](ds, da, s, scale, nb * pe, d,
                                                            NORM_EPS, **cfg,
                                                            RNE_FIX=_rne_fix(s.dtype))
    return ds


# ------------------------------------------------------------------------------------------------
# torch.library registration (so torch.compile traces the op), autograd, functional API
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastdino::gram_fwd", mutates_args=())
def _gram_fwd_op(student: torch.Tensor, teacher: torch.Tensor, img_level: bool, clamp: int,
                 form: int, arch: int, store_w: bool = False, row_loop: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    return gram_fwd(student, teacher, img_level, clamp, form, arch, store_w, row_loop)


@_gram_fwd_op.register_fake
def _(student, teacher, img_level, clamp, form, arch, store_w=False, row_loop=False):
    nb, pe, d = _views(student, img_level)
    work = _working_dtype(student.dtype)
    loss = student.new_empty((), dtype=torch.float32)
    f = student.new_empty((nb, pe, d if form == FORM_PP else 2 * d), dtype=work)
    e = student.new_empty((nb, pe, d) if form == FORM_PP else (0,), dtype=work)
    a = student.new_empty((nb, pe, d) if form == FORM_PP else (0,), dtype=work)
    lo = student.new_empty((nb, pe, d) if _needs_lo(student.dtype, clamp) else (0,), dtype=work)
    mats_shape = ((nb, 2, d, d) if form == FORM_DD else (nb, pe, pe) if store_w else (0,))
    mats = student.new_empty(mats_shape, dtype=work)
    return loss, a, lo, f, e, mats


@torch.library.custom_op("fastdino::gram_bwd", mutates_args=())
def _gram_bwd_op(grad: torch.Tensor, student: torch.Tensor, a: torch.Tensor, lo: torch.Tensor,
                 f: torch.Tensor, e: torch.Tensor, mats: torch.Tensor, img_level: bool, clamp: int,
                 form: int, arch: int, row_loop: bool = False, gemm_bmm: bool = False
                 ) -> torch.Tensor:
    return gram_bwd(grad, student, a, lo, f, e, mats, img_level, clamp, form, arch, row_loop,
                    gemm_bmm)


@_gram_bwd_op.register_fake
def _(grad, student, a, lo, f, e, mats, img_level, clamp, form, arch, row_loop=False,
      gemm_bmm=False):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


class GramFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, img_level: bool, clamp: int, form: int, arch: int,
                store_w: bool = False, row_loop: bool = False, gemm_bmm: bool = False):
        fwd = eager_or_op(torch.ops.fastdino.gram_fwd, gram_fwd)
        loss, *saved = fwd(student, teacher, img_level, clamp, form, arch, store_w, row_loop)
        ctx.save_for_backward(student, *saved)  # student, ŝ, lo(ŝ), F, E, mats
        ctx.cfg = (img_level, clamp, form, arch, row_loop, gemm_bmm)
        return loss

    @staticmethod
    def backward(ctx, grad):
        ds = eager_or_op(torch.ops.fastdino.gram_bwd, gram_bwd)(grad, *ctx.saved_tensors, *ctx.cfg)
        return ds, None, None, None, None, None, None, None, None


def gram_loss(student: torch.Tensor, teacher: torch.Tensor, img_level: bool = True,
              remove_neg: bool = False, remove_only_teacher_neg: bool = False,
              form: str = "auto", rows: torch.Tensor | None = None,
              tiles: str = "auto", pp_backward: str = "auto",
              row_pass: str = "auto", backward_gemm: str = "auto") -> torch.Tensor:
    """The Triton Gram loss: student, teacher [B, P, D] -> fp32 scalar (gradient to the student
    only). form: auto (see `choose_form`) | pp (tiled P×P) | dd (D×D, no clamp).
    tiles: auto (`auto_tiles`: the 4-warp sm80 set, the faster one on sm_90 too) | sm90 | sm80:
    which shipped GPU tile set to launch; forcing one is for A/B timings and tests (e.g. the
    8-warp sm90 set on an H100, see `_pp_gpu`). Under the interpreter its own tiles run
    regardless.

    pp_backward (P×P form): stored | recompute | auto. stored: the forward also writes
    W = dL/dĜs ([NB, Pe, Pe] in the working dtype, kept for the backward) and the backward is
    one batched GEMM W ŝ; recompute: the backward recomputes S tile by tile (no P×P in memory,
    6·Pe²·D backward FLOPs). auto: stored when Pe <= D (`stores_w`: then W is no larger than
    F or E, so the memory stays O(P·D) per image), recompute above.

    row_pass: auto | loop: the normalisation pre-pass and its backward as `_row_config` picks
    (rows that fit in registers read once, several per program) or forced to the one-row,
    two-pass kernel (A/B timings and tests).

    backward_gemm: auto | bmm | triton: the backwards that are one batched GEMM with fp32 out
    (D×D: FE·[M1; M2], K = 2D; P×P with a stored W: W ŝ, K = Pe) through torch.bmm (cuBLAS)
    or the Triton kernels. auto: bmm on CUDA for bf16/fp16 inputs where torch has bmm's
    out_dtype (`bmm_f32_available`), triton otherwise (fp32 inputs keep the Triton kernels'
    IEEE fp32 dots: torch.bmm would follow the global TF32 switch). The P×P backward that
    recomputes S is no GEMM and ignores it.

    rows (img_level=False only): [N_sel] flat indices into the B·P patches, as in
    `gram_loss_ref`. The selected rows are gathered into one [1, N_sel, D] image before the
    kernels, so Pe = N_sel and the normaliser is N_sel² (not (B·P)²); the gather's backward
    scatters dŝ back to the selected rows."""
    _check_inputs(student, teacher, remove_neg, remove_only_teacher_neg)
    _check_rows(rows, img_level)
    if tiles not in TILES:
        raise ValueError(f"gram_loss: tiles={tiles!r} is invalid: allowed is auto | sm90 | sm80")
    if rows is not None:
        if rows.numel() == 0:
            return (student.sum() * 0).float()
        student, teacher = select_rows(student, rows), select_rows(teacher, rows)
    clamp = (CLAMP_NEG if remove_neg else CLAMP_TEACHER_NEG if remove_only_teacher_neg
             else CLAMP_NONE)
    nb, pe, d = _views(student, img_level)
    if form == "auto":
        form_id = choose_form(pe, d, clamp)
    elif form in ("pp", "dd"):
        form_id = FORM_PP if form == "pp" else FORM_DD
    else:
        raise ValueError(f"gram_loss: form={form!r} is invalid: allowed is auto | pp | dd")
    if form_id == FORM_DD and clamp != CLAMP_NONE:
        raise ValueError("gram_loss: form='dd' cannot apply remove_neg / remove_only_teacher_neg "
                         "(the clamp needs the P×P entries): use form='pp' or 'auto'")
    if pp_backward not in ("auto", "stored", "recompute"):
        raise ValueError(f"gram_loss: pp_backward={pp_backward!r} is invalid: allowed is auto | "
                         "stored | recompute")
    if row_pass not in ("auto", "loop"):
        raise ValueError(f"gram_loss: row_pass={row_pass!r} is invalid: allowed is auto | loop")
    if backward_gemm not in ("auto", "bmm", "triton"):
        raise ValueError(f"gram_loss: backward_gemm={backward_gemm!r} is invalid: allowed is "
                         "auto | bmm | triton")
    half = student.dtype in (torch.bfloat16, torch.float16)
    if backward_gemm == "bmm" and not (half and bmm_f32_available()):
        raise ValueError(f"gram_loss: backward_gemm='bmm' needs bf16/fp16 inputs (got "
                         f"{student.dtype}) and a torch with bmm's out_dtype (>= 2.8)")
    gemm_bmm = backward_gemm == "bmm" or (backward_gemm == "auto" and half and student.is_cuda
                                          and bmm_f32_available())
    store_w = form_id == FORM_PP and (pp_backward == "stored" or
                                      (pp_backward == "auto" and stores_w(pe, d)))
    return GramFn.apply(student, teacher.detach(), img_level, clamp, form_id, TILES[tiles],
                        store_w, row_pass == "loop", gemm_bmm)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/kernels/test_compile.py: sm_90 and sm_80, no spills)
# ------------------------------------------------------------------------------------------------

_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# Arguments every real launch passes 16-divisible (ints) or 16-byte aligned (pointers), which
# triton's runtime specialises on (tt.divisibility = 16): every tensor is freshly allocated or
# made contiguous by the launchers, and D is a multiple of 16 for every shipped model (384 ...
# 4096). P, Pe and the pair count are not (196 patches at 224 px). Declared on each spec as
# `divisible_by_16`, so a compile report that honours it (ASTSource attrs) compiles the code the
# GPU runs; without it the report compiles the odd-D path (scalar, unpipelined loads).
_DIV16_INTS = ("D", "stride_fe")  # stride_fe: D or 2D; E = F + D elements (D % 8 == 0: aligned)


# the row-kernel configs the GPU launchers pick at the shipped widths (ViT-S 384, ViT-B 768,
# ViT-L 1024, ViT-H+ 1280, 7B 4096), and the two-pass kernel (row_pass="loop", D > 4096)
_ROW_SPECS = list({f"rows={c['BLOCK_R']}x{c['BLOCK_D']}" + ("" if c["ONE_PASS"] else ",loop"): c
                   for c in [_row_gpu(d) for d in (384, 768, 1024, 1280, 4096)]
                   + [_row_gpu(1024, loop=True)]}.items())


def compile_specs() -> list[CompileSpec]:
    """Every jit kernel at each launch configuration the GPU launchers above can pick: the sm_90
    tiles, and the sm_80 tiles where they differ (named `tiles=sm80`)."""
    specs = []

    def add(name, fn, sig, cfg, **constexprs):
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
        spec = CompileSpec(name=name, fn=fn, signature=sig, constexprs={**cfg, **constexprs},
                           num_warps=warps, num_stages=stages)
        # an attribute, not a constructor argument: older CompileSpec records have no such field
        spec.divisible_by_16 = tuple(n for n, ty in sig.items()
                                     if ty.startswith("*") or n in _DIV16_INTS)
        specs.append(spec)

    def per_arch(name, pick, *args):
        """(name, cfg) for the sm_90 tiles, plus the sm_80 tiles when they differ."""
        sm90, sm80 = pick(*args, arch=90), pick(*args, arch=80)
        return [(name, sm90)] + ([(name[:-1] + ",tiles=sm80]", sm80)] if sm80 != sm90 else [])

    for dtype, ty in _TY.items():
        half = dtype != torch.float32
        dots = dict(UPCAST=False, IEEE=not half)
        w = f"*{ty}"
        prep_sig = {"A_ptr": w, "Lo_ptr": w, "F_ptr": w, "E_ptr": w, "S_ptr": w, "T_ptr": w,
                    "R": "i32", "D": "i32", "stride_fe": "i32", "EPS": "fp32"}
        for rows, cfg in _ROW_SPECS:
            for write_lo, write_a in (((False, True), (True, True)) if half else
                                      ((False, True),)) + ((False, False),):
                tag = "dd" if not write_a else f"lo={write_lo}"
                add(f"gram_prep[{ty},{tag},{rows}]", _gram_prep_kernel, prep_sig, cfg,
                    RNE_FIX=False, WRITE_LO=write_lo, WRITE_A=write_a)
            add(f"gram_norm_bwd[{ty},{rows}]", _gram_norm_bwd_kernel,
                {"DS_ptr": w, "DA_ptr": "*fp32", "S_ptr": w, "Scale_ptr": "*fp32", "R": "i32",
                 "D": "i32", "EPS": "fp32"}, cfg, RNE_FIX=False)
        ins = {"A_ptr": w, "Lo_ptr": w, "F_ptr": w, "E_ptr": w}
        for clamp in (CLAMP_NONE, CLAMP_NEG, CLAMP_TEACHER_NEG):
            for store in (False, True):
                tag = ",store_w" if store else ""
                for name, cfg in per_arch(f"gram_pp_fwd[{ty},clamp={clamp}{tag}]", _pp_gpu, dtype,
                                          clamp):
                    add(name, _gram_pp_fwd_kernel,
                        {"Partial_ptr": "*fp32", **ins, "PairI_ptr": "*i32", "PairJ_ptr": "*i32",
                         "P": "i32", "D": "i32", "num_pairs": "i32",
                         "W_ptr": w if store else "*fp32"}, cfg, CLAMP=clamp, **dots,
                        STORE_W=store, RNE_FIX=False)
            for name, cfg in per_arch(f"gram_pp_bwd[{ty},clamp={clamp}]", _pp_gpu, dtype, clamp,
                                      True):
                add(name, _gram_pp_bwd_kernel, {"DA_ptr": "*fp32", **ins, "P": "i32", "D": "i32"},
                    cfg, CLAMP=clamp, **dots, RNE_FIX=False)
        pairs = {"PairI_ptr": "*i32", "PairJ_ptr": "*i32"}
        for split in (False, True):
            for name, cfg in per_arch(f"gram_dd_fwd[{ty},split={split}]", _dd_fwd_gpu, dtype):
                add(name, _gram_dd_fwd_kernel,
                    {"Out_ptr": "*fp32" if split else w, "Partial_ptr": "*fp32", "F_ptr": w,
                     "E_ptr": w, **pairs, "P": "i32", "D": "i32", "stride_fe": "i32",
                     "num_pairs": "i32",
                     "rows_per_split": "i32"}, cfg, SPLIT=split, **dots, RNE_FIX=False)
        add(f"gram_dd_finish[{ty}]", _gram_dd_finish_kernel,
            {"M_ptr": w, "Partial_ptr": "*fp32", "Split_ptr": "*fp32", **pairs, "D": "i32",
             "num_pairs": "i32", "num_splits": "i32"},
            dict(BLOCK_K=_dd_fwd_gpu(dtype)["BLOCK_K"], num_warps=DD_FINISH_WARPS), RNE_FIX=False)
        for name, cfg in per_arch(f"gram_w_grad[{ty}]", _w_grad_gpu, dtype):
            add(name, _gram_w_grad_kernel,
                {"DA_ptr": "*fp32", "W_ptr": w, "A_ptr": w, "P": "i32", "D": "i32"}, cfg, **dots)
        for name, cfg in per_arch(f"gram_dd_bwd[{ty}]", _dd_bwd_gpu, dtype):
            add(name, _gram_dd_bwd_kernel,
                {"DA_ptr": "*fp32", "F_ptr": w, "E_ptr": w, "M_ptr": w, "P": "i32",
                 "D": "i32", "stride_fe": "i32"}, cfg, **dots)
    return specs
