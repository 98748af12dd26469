"""Soft-target cross-entropy of the DINO CLS and iBOT patch losses, with the teacher
probabilities formed on the fly (SPEC.md §1.2, §1.4; KERNELS.md §2).

For student row i (logits s_i [K], z_i = s_i/τ_s) compared with the teacher rows J(i) (the DINO
pairing: global crop g against teacher crop 1-g, local crops against both teacher crops; iBOT:
the row's own masked patch), the per-row loss is

    loss_i = Σ_{j∈J(i)} -Σ_k p_jk log softmax(z_i)_k = |J(i)|·LSE(z_i) - Σ_k (Σ_{j∈J(i)} p_jk) z_ik

(Σ_k p_jk = 1), and its gradient is dloss_i/ds_i = (|J(i)|·softmax(z_i) - Σ_j p_j)/τ_s.
Teacher rows are addressed by an index map `teacher_index` [R, J] (-1 = no pair), so no teacher
row is copied. Two forms: `dino_soft_ce` returns the per-row losses [R] (the caller applies the
weights 1/(2B), 1/n_masked, ... and its gradient arrives here as grad_row [R]);
`dino_soft_ce_sum` takes the weights [G, R] and returns the losses themselves, out [G] =
scale · weights @ row_loss (as G 0-d tensors), summed in the merge launch, and its backward forms
each row's gradient scale · Σ_g grad_out[g]·weights[g, row] in-kernel (what the DINO and iBOT
losses use).

Performance model (issue 5; 132 SMs on H100 / H200; e = element size of the logits). HBM bytes:
forward R·K·e (read s) + N·K·e (teacher rows, iBOT; the DINO teacher, 16.8 MB bf16, stays in
L2 and is counted 0); backward 2·R·K·e (read s, write dS) + the same teacher bytes. µs = bytes
at 100 % of 4.2 TB/s (H200) / 3.35 TB/s (H100); the target is >= 80 % of the measured copy.

| bf16 student | R × K (J)          | grid: blocks × splits | fwd MB / µs H200, H100 | bwd MB / µs |
|--------------|--------------------|-----------------------|------------------------|-------------|
| ViT-L DINO g | 128 × 65,536 (1)   | 16 × 64 = 1024 (7.8)  | 16.8 / 4.0, 5.0        | 34 / 8, 10  |
| ViT-L DINO l | 512 × 65,536 (2)   | 128 × 9 = 1152 (8.7)  | 67 / 16, 20            | 134 / 32, 40|
| ViT-L iBOT   | 3,771 × 65,536 (1) | 472 × 3 = 1416 (10.7) | 989 / 235, 295         | 1483/353,443|
| 7B DINO g    | 32 × 262,144 (1)   | 4 × 128 = 512 (3.9)   | 16.8 / 4.0, 5.0        | 34 / 8, 10  |
| 7B DINO l    | 128 × 262,144 (2)  | 32 × 32 = 1024 (7.8)  | 67 / 16, 20            | 134 / 32, 40|
| 7B iBOT      | 1,274 × 98,304 (1) | 160 × 7 = 1120 (8.5)  | 501 / 119, 150         | 751/179, 224|
(programs per SM in brackets) (fp32: 4 × 256 row tiles, twice the bytes, ~2× the programs.)

- Passes over B×K per training step: teacher 6 (kernels/sinkhorn.py) + student forward 2 (s, t)
  + backward 3 (s, t, dS) = 11, against a minimum of 5 student + 5 teacher for this
  factorisation (the last SK row pass could be folded into the forward; not done). ViT-L iBOT
  bf16 at roofline: 5.4 GB -> 1.29 ms (H200) / 1.62 ms (H100); ~1.5 / 1.9 ms at 85 %.
- DINO CLS (all variants) moves < 0.25 GB and is bound by host time, not HBM. Measured (H200,
  triton 3.6, check6, with two soft-CE calls and the means in torch): 2.35 ms median fwd+bwd
  against 0.30 ms of device time (CUDA graph) and 1.24 ms for torch.compile, where a model of
  ~12 µs per Triton launch had said ~0.3 ms; its profile (check6 bench.log, profiler-inflated)
  shows ~22 µs of Python per `JITFunction.run` and the rest spread over torch ops, allocations
  and autograd nodes. So launches and torch ops are what to cut: SK 9 launches, then
  `forward_joint` through `dino_soft_ce_sum` = 2 launches forward (kernel, one-program merge
  that also sums the three losses) and 1 backward, with no torch kernel around them (a test
  counts; the losses are the Function's separate outputs, so no SelectBackward zero-fill);
  before: 2 soft-CE calls (4 + 2 launches), ~5 torch reductions in the forward
  and ~9 small kernels and 6 autograd nodes in the backward. Not timed on a GPU yet. Hence also: no
  custom-op dispatch outside torch.compile, and merges in a fixed-order Triton kernel
  (deterministic, no atomics).
- Launch config: BLOCK_R × BLOCK_K = 8 × 256 (bf16, J=1) / 4 × 256 (bf16 J=2, fp32: 8 rows
  spill on sm_80 / under triton 3.9), num_warps 8, num_stages = STAGES = 4 through `tl.range`
  (3 tiles of s and t in flight per program, 21-27 KB shared bf16), elementwise accumulators
  (m, d, dot, psum) reduced once after the loop. Triton 3.6 sm_90 at the launch
  specialisation: bf16 forward 72 (J=1) / 60 (J=2) registers, backward 40 / 43, no spills
  (3.6 and 3.9, sm_90 and sm_80); PTX: every streamed tile is a 16-byte cp.async.cg, dS a
  16-byte st.global.v4.
  One col_shift tile [BLOCK_K] fp32 serves BLOCK_R rows (at one row per program the col_shift
  reads from L2 would equal the logits' HBM bytes).
- torch.compile of `dino_soft_ce_ref` (not measured): log_softmax over s (1-2 reads), the
  gathered q [R, J, K] and q.sum in fp32 (written, then re-read in the backward), dS: roughly
  8-10 bf16-equivalent passes over R×K for the student alone; eager ~25.

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


def dino_soft_ce_sum_ref(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                         teacher_index: torch.Tensor, student_temp: float,
                         weights: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The losses as weighted sums of the rows [G] fp32: scale · weights [G, R] @ row_loss (the
    DINO CLS loss's global / local means and their weighted total, iBOT's 1/n_masked weights),
    the form `dino_soft_ce_sum` computes without any torch op around the kernels."""
    rows = dino_soft_ce_ref(student_logits, teacher_probs, teacher_index, student_temp)
    return scale * (weights.float() @ rows)


# ------------------------------------------------------------------------------------------------
# Triton kernels. Grid (K splits, student row blocks): one program streams BLOCK_R student rows'
# K slice and the same slice of their (at most 2 each) teacher rows, forming p = exp(t·inv_tt -
# col_shift - row_shift) on the fly (one col_shift tile serves BLOCK_R rows). Accumulators are
# elementwise [BLOCK_R, BLOCK_K] and reduced once after the loop; the loop is a `tl.range` with
# STAGES, so Triton pipelines the loads (cp.async) STAGES-1 tiles ahead. The K splits are merged
# by an LSE merge in _soft_ce_merge_kernel (fixed order, deterministic). fp32 accumulation,
# int64 row offsets. Traffic and launch numbers: see the table in the module header.
# ------------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402

from fastdino.kernels._rounding import to_stored  # noqa: E402
from fastdino.kernels._triton import tl, triton  # noqa: E402
from fastdino.kernels._utils import (  # noqa: E402
    CompileSpec,
    cdiv,
    eager_or_op,
    is_interpreter,
    next_pow2,
)

MAX_SPLITS = 128  # K splits: the merge kernel reads them as one [rows, 128] tile


@triton.jit
def _teacher_row(row_shift_ptr, tidx_ptr, rows, rmask, stride_t, SLOT: tl.constexpr,
                 J: tl.constexpr):
    """For each student row: (int64 offset of teacher row tidx[row, SLOT], its row_shift,
    valid). tidx = -1 (no pair) and rows past R are invalid (p = 0)."""
    ti = tl.load(tidx_ptr + rows.to(tl.int64) * J + SLOT, mask=rmask, other=-1)
    ok = ti >= 0
    tr = tl.maximum(ti, 0).to(tl.int64)
    b = tl.load(row_shift_ptr + tr, mask=ok, other=0.0)
    return tr * stride_t, b, ok


@triton.jit
def _teacher_p(t_ptr, off, b, ok, cols, cmask, a, inv_tt):
    """p [BLOCK_R, BLOCK_K] fp32 of one teacher slot (0 where invalid or masked). The exponent is
    formed in natural units and scaled by log2(e) last: t/τ_t and the shifts are ~100 in size and
    cancel, so pre-scaled terms would each add a rounding the cancellation amplifies."""
    m2d = ok[:, None] & cmask[None, :]
    t = tl.load(t_ptr + off[:, None] + cols[None, :], mask=m2d, other=0.0).to(tl.float32)
    x = (t * inv_tt - a[None, :] - b[:, None]) * 1.4426950408889634
    return tl.where(m2d, tl.exp2(x), 0.0)


@triton.jit(do_not_specialize=['R', 'n_splits'])
def _dino_soft_ce_fwd_kernel(s_ptr, t_ptr, col_shift_ptr, row_shift_ptr, tidx_ptr, part_ptr,
                             R, K, stride_s, stride_t, inv_ts, inv_tt, k_per_split, n_splits,
                             J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                             STAGES: tl.constexpr):
    """Per (row, K split): max m and d = Σ exp(z - m) of z = s·inv_ts, dot = Σ_k p_k·z_k and
    psum = Σ_k p_k, to part [4, R, n_splits] for _soft_ce_merge_kernel (always a merge launch:
    at the issue's shapes the K split is there anyway, for the tail of the last wave)."""
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    s_off = rows.to(tl.int64) * stride_s
    off0, b0, ok0 = _teacher_row(row_shift_ptr, tidx_ptr, rows, rmask, stride_t, 0, J)
    if J == 2:
        off1, b1, ok1 = _teacher_row(row_shift_ptr, tidx_ptr, rows, rmask, stride_t, 1, J)
    # Row statistics as [BLOCK_R] vectors updated once per tile (the FlashAttention softmax
    # recurrence: a max-reduce, one exp2 per element and sum-reduces) rather than elementwise
    # running maxima (`_lse_update`, ~11 ALU operations per element): the same choice as the
    # Sinkhorn-Knopp row pass, whose elementwise version ran at 66 % of HBM on an H200.
    m = tl.full([BLOCK_R], -1.0e30, tl.float32)
    d = tl.zeros([BLOCK_R], tl.float32)
    dot = tl.zeros([BLOCK_R], tl.float32)
    psum = tl.zeros([BLOCK_R], tl.float32)
    k_lo = pid_s * k_per_split
    for k0 in tl.range(k_lo, k_lo + k_per_split, BLOCK_K, num_stages=STAGES):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        z = tl.load(s_ptr + s_off[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32) * inv_ts
        zm = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        d = d * tl.exp2((m - m_new) * 1.4426950408889634) + tl.sum(
            tl.exp2((zm - m_new[:, None]) * 1.4426950408889634), axis=1)
        m = m_new
        a = tl.load(col_shift_ptr + cols, mask=cmask, other=0.0)
        p = _teacher_p(t_ptr, off0, b0, ok0, cols, cmask, a, inv_tt)
        if J == 2:
            p += _teacher_p(t_ptr, off1, b1, ok1, cols, cmask, a, inv_tt)
        dot += tl.sum(p * z, axis=1)
        psum += tl.sum(p, axis=1)
    m_r, d_r, dot_r, psum_r = m, d, dot, psum
    o = rows.to(tl.int64) * n_splits + pid_s
    plane = R * n_splits  # i32: R·n_splits < 2^31 (a [4, R, n_splits] fp32 buffer)
    tl.store(part_ptr + o, m_r, mask=rmask)
    tl.store(part_ptr + plane + o, d_r, mask=rmask)
    tl.store(part_ptr + 2 * plane + o, dot_r, mask=rmask)
    tl.store(part_ptr + 3 * plane + o, psum_r, mask=rmask)


@triton.jit
def _merge_rows(part_ptr, rows, rmask, R, n_splits, BLOCK_S: tl.constexpr):
    """LSE merge of rows' K-split partials [4, R, n_splits] (n_splits <= BLOCK_S) in a fixed
    order: (loss = lse·psum - dot, lse, psum) per row, 0 for rows past R."""
    splits = tl.arange(0, BLOCK_S)
    mask = rmask[:, None] & (splits < n_splits)[None, :]
    offs = rows.to(tl.int64)[:, None] * n_splits + splits[None, :]
    plane = R * n_splits  # i32: R·n_splits < 2^31 (a [4, R, n_splits] fp32 buffer)
    m = tl.load(part_ptr + offs, mask=mask, other=-1.0e30)
    m_r = tl.max(m, axis=1)
    d_r = tl.sum(tl.load(part_ptr + plane + offs, mask=mask, other=0.0)
                 * tl.exp2((m - m_r[:, None]) * 1.4426950408889634), axis=1)
    dot_r = tl.sum(tl.load(part_ptr + 2 * plane + offs, mask=mask, other=0.0), axis=1)
    psum_r = tl.sum(tl.load(part_ptr + 3 * plane + offs, mask=mask, other=0.0), axis=1)
    lse = tl.where(rmask, m_r + tl.log(tl.where(rmask, d_r, 1.0)), 0.0)
    return lse * psum_r - dot_r, lse, psum_r


@triton.jit(do_not_specialize=['R', 'n_splits'])
def _soft_ce_merge_kernel(part_ptr, out_ptr, R, n_splits, BLOCK_R: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    """Per-row merge, one program per BLOCK_R rows: out [3, R] = (loss, lse, psum)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    loss, lse, psum = _merge_rows(part_ptr, rows, rmask, R, n_splits, BLOCK_S)
    tl.store(out_ptr + rows, loss, mask=rmask)
    tl.store(out_ptr + R + rows, lse, mask=rmask)
    tl.store(out_ptr + 2 * R + rows, psum, mask=rmask)


@triton.jit(do_not_specialize=['R', 'n_splits', 'G'])
def _soft_ce_merge_sum_kernel(part_ptr, stats_ptr, w_ptr, out_ptr, R, n_splits, G, scale,
                              BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_S: tl.constexpr):
    """One program: the per-row merge of every row (stats [3, R], as _soft_ce_merge_kernel) and
    the loss itself, out [G] = scale · Σ_r w[g, r]·loss_r (w [G, R] fp32, G <= BLOCK_G), summed
    in a fixed order: the caller's means and weighted sums become no torch op at all, in the
    forward or (through the same w, _dino_soft_ce_bwd_kernel) in the backward."""
    gs = tl.arange(0, BLOCK_G)
    gmask = gs < G
    acc = tl.zeros([BLOCK_G, BLOCK_R], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < R
        loss, lse, psum = _merge_rows(part_ptr, rows, rmask, R, n_splits, BLOCK_S)
        tl.store(stats_ptr + rows, loss, mask=rmask)
        tl.store(stats_ptr + R + rows, lse, mask=rmask)
        tl.store(stats_ptr + 2 * R + rows, psum, mask=rmask)
        w = tl.load(w_ptr + gs[:, None].to(tl.int64) * R + rows[None, :],
                    mask=gmask[:, None] & rmask[None, :], other=0.0)
        acc += w * loss[None, :]
    tl.store(out_ptr + gs, tl.sum(acc, axis=1) * scale, mask=gmask)


@triton.jit(do_not_specialize=['R', 'G'])
def _dino_soft_ce_bwd_kernel(s_ptr, t_ptr, col_shift_ptr, row_shift_ptr, tidx_ptr, stats_ptr,
                             g_ptr, w_ptr, ds_ptr, R, K, stride_s, stride_t, stride_ds, stride_g,
                             G, scale, inv_ts, inv_tt, k_per_split, BLOCK_G: tl.constexpr,
                             J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                             STAGES: tl.constexpr):
    """dS[row, k] = (g·psum·softmax(z)_k - g·Σ_j p_jk)·inv_ts, recomputed in tiles from the saved
    row (lse, psum) = stats[1:3] (natural units): no probability is stored. BLOCK_G = 0: g is the
    per-row gradient g_ptr[row·stride_g] (stride_g = 0: a broadcast); BLOCK_G > 0: the loss was
    _soft_ce_merge_sum_kernel's out [G] and g_ptr holds its gradient, so g_row = scale ·
    Σ_g grad[g]·w[g, row]."""
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    s_off = rows64 * stride_s
    ds_off = rows64 * stride_ds
    if BLOCK_G == 0:
        g = tl.load(g_ptr + rows64 * stride_g, mask=rmask, other=0.0)
    else:
        gs = tl.arange(0, BLOCK_G)
        gmask = gs < G
        gw = tl.load(g_ptr + gs, mask=gmask, other=0.0)
        w = tl.load(w_ptr + gs[:, None].to(tl.int64) * R + rows64[None, :],
                    mask=gmask[:, None] & rmask[None, :], other=0.0)
        g = tl.sum(gw[:, None] * w, axis=0) * scale
    lse = tl.load(stats_ptr + R + rows, mask=rmask, other=0.0)
    coef = g * tl.load(stats_ptr + 2 * R + rows, mask=rmask, other=0.0)
    off0, b0, ok0 = _teacher_row(row_shift_ptr, tidx_ptr, rows, rmask, stride_t, 0, J)
    if J == 2:
        off1, b1, ok1 = _teacher_row(row_shift_ptr, tidx_ptr, rows, rmask, stride_t, 1, J)
    k_lo = pid_s * k_per_split
    for k0 in tl.range(k_lo, k_lo + k_per_split, BLOCK_K, num_stages=STAGES):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        m2d = rmask[:, None] & cmask[None, :]
        z = tl.load(s_ptr + s_off[:, None] + cols[None, :], mask=m2d,
                    other=0.0).to(tl.float32) * inv_ts
        a = tl.load(col_shift_ptr + cols, mask=cmask, other=0.0)
        p = _teacher_p(t_ptr, off0, b0, ok0, cols, cmask, a, inv_tt)
        if J == 2:
            p += _teacher_p(t_ptr, off1, b1, ok1, cols, cmask, a, inv_tt)
        sm = tl.exp2((z - lse[:, None]) * 1.4426950408889634)
        ds = (coef[:, None] * sm - g[:, None] * p) * inv_ts
        tl.store(ds_ptr + ds_off[:, None] + cols[None, :], to_stored(ds, ds_ptr.dtype.element_ty),
                 mask=m2d)


# ------------------------------------------------------------------------------------------------
# Launchers (fixed configs chosen by a heuristic: autotune cannot run under the interpreter)
# ------------------------------------------------------------------------------------------------

_WARPS = 8
_STAGES = 4  # tl.range pipelining depth: 3 tiles in flight per program
_MERGE_WARPS = 4
_MERGE_BLOCK_R = 16
# (BLOCK_R, BLOCK_K) per (logits dtype, teacher slots J): 8 (bf16, J=1) or 4 elements per thread
# at 8 warps (8 rows at bf16 J=2 or fp32 spill on sm_80 / under triton 3.9)
_GPU_BLOCK = {(torch.bfloat16, 1): (8, 256), (torch.bfloat16, 2): (4, 256),
              (torch.float32, 1): (4, 256), (torch.float32, 2): (4, 256)}
_NUM_SMS = 132  # only sets how finely K is split, never correctness
_INTERP_TARGET = 8  # programs per grid under the interpreter (tests raise it)


def _config(r: int, k: int, x: torch.Tensor, j: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_K, k_per_split, n_splits): split K until the grid holds ~8 programs per
    SM (>= 2 resident waves), at most MAX_SPLITS."""
    if is_interpreter():  # the interpreter pays per program: few of them, still some splits
        block_r, block_k, target = min(4, next_pow2(r)), min(1024, next_pow2(k)), _INTERP_TARGET
    else:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda \
            else _NUM_SMS
        (block_r, block_k), target = _GPU_BLOCK[(x.dtype, j)], 8 * sms
    k_blocks = cdiv(k, block_k)
    want = cdiv(target, cdiv(max(r, 1), block_r))
    n_splits = max(1, min(k_blocks, MAX_SPLITS, want))
    k_per_split = cdiv(k_blocks, n_splits) * block_k
    return block_r, block_k, k_per_split, cdiv(k, k_per_split)


def _check_inputs(s, t, col_shift, row_shift, tidx):
    if s.dim() != 2 or t.dim() != 2 or s.shape[1] != t.shape[1]:
        raise ValueError(f"student [R, K] and teacher [N, K] logits expected, got "
                         f"{tuple(s.shape)} and {tuple(t.shape)}")
    for name, x in (("student", s), ("teacher", t)):
        if x.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{name} logits must be fp32 or bf16, got {x.dtype}")
    if col_shift.shape != (t.shape[1],) or row_shift.shape != (t.shape[0],):
        raise ValueError(f"col_shift must be [K={t.shape[1]}] and row_shift [N={t.shape[0]}], "
                         f"got {tuple(col_shift.shape)} and {tuple(row_shift.shape)}")
    if tidx.dim() != 2 or tidx.shape[0] != s.shape[0] or tidx.shape[1] not in (1, 2):
        raise ValueError(f"teacher_index must be [R={s.shape[0]}, J] with J in (1, 2), got "
                         f"{tuple(tidx.shape)}")


def _prep(s, t, col_shift, row_shift, tidx):
    """Contiguous operands, int32 index, fp32 shifts (no copy when already so)."""
    if tidx.dtype != torch.int32:
        tidx = tidx.to(torch.int32)
    return (s.contiguous(), t.contiguous(), col_shift.float().contiguous(),
            row_shift.float().contiguous(), tidx.contiguous())


def _fwd_partials(s, t, col_shift, row_shift, tidx, inv_ts, inv_tt):
    """The soft-CE forward kernel's K-split partials [4, R, n_splits] (operands prepared)."""
    r, k = s.shape
    block_r, block_k, k_per_split, n_splits = _config(r, k, s, tidx.shape[1])
    part = torch.empty(4, r, n_splits, device=s.device, dtype=torch.float32)
    _dino_soft_ce_fwd_kernel[(n_splits, cdiv(r, block_r))](
        s, t, col_shift, row_shift, tidx, part, r, k, s.stride(0), t.stride(0), float(inv_ts),
        float(inv_tt), k_per_split, n_splits, J=tidx.shape[1], BLOCK_R=block_r, BLOCK_K=block_k,
        STAGES=_STAGES, num_warps=_WARPS, num_stages=_STAGES)
    return part


def dino_soft_ce_fwd(s, t, col_shift, row_shift, tidx, inv_ts, inv_tt):
    """-> stats [3, R] fp32: (row_loss, lse (natural units), psum)."""
    _check_inputs(s, t, col_shift, row_shift, tidx)
    s, t, col_shift, row_shift, tidx = _prep(s, t, col_shift, row_shift, tidx)
    r = s.shape[0]
    out = torch.empty(3, r, device=s.device, dtype=torch.float32)
    if not r:
        return out
    part = _fwd_partials(s, t, col_shift, row_shift, tidx, inv_ts, inv_tt)
    _soft_ce_merge_kernel[(cdiv(r, _MERGE_BLOCK_R),)](
        part, out, r, part.shape[2], BLOCK_R=_MERGE_BLOCK_R, BLOCK_S=MAX_SPLITS,
        num_warps=_MERGE_WARPS)
    return out


MAX_SUMS = 4  # outputs G of the weighted-sum form (DINO: dino, global, local; iBOT: 1)
# fp32 elements per partials plane and step of the one-program merge (4096 spilled on sm_80)
_SUM_TILE = 2048
_SUM_WARPS = 8


def _sum_block_r(n_splits: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_S) of _soft_ce_merge_sum_kernel: BLOCK_S the splits' power of two, and
    as many rows per step as fit a _SUM_TILE tile (ViT-L iBOT at 3,771 rows x 3 splits: 8 steps
    of 512 rows; the DINO CLS loss at 640 x 7: 3 of 256)."""
    block_s = next_pow2(n_splits)
    return max(16, min(1024, _SUM_TILE // block_s)), block_s


def _check_weights(weights: torch.Tensor, r: int) -> torch.Tensor:
    if weights.dim() != 2 or weights.shape[1] != r or not 1 <= weights.shape[0] <= MAX_SUMS:
        raise ValueError(f"weights must be [G, R={r}] with 1 <= G <= {MAX_SUMS}, got "
                         f"{tuple(weights.shape)}")
    return weights.float().contiguous()


def dino_soft_ce_sum_fwd(s, t, col_shift, row_shift, tidx, weights, scale, inv_ts, inv_tt):
    """-> (stats [3, R], out [G]) fp32: the per-row stats of dino_soft_ce_fwd and the loss
    sums out = scale · weights @ row_loss, in two launches (kernel + one-program merge)."""
    _check_inputs(s, t, col_shift, row_shift, tidx)
    r = s.shape[0]
    weights = _check_weights(weights, r)
    s, t, col_shift, row_shift, tidx = _prep(s, t, col_shift, row_shift, tidx)
    g = weights.shape[0]
    stats = torch.empty(3, r, device=s.device, dtype=torch.float32)
    out = torch.empty(g, device=s.device, dtype=torch.float32)
    if not r:
        return stats, out.zero_()
    part = _fwd_partials(s, t, col_shift, row_shift, tidx, inv_ts, inv_tt)
    block_r, block_s = _sum_block_r(part.shape[2])
    _soft_ce_merge_sum_kernel[(1,)](
        part, stats, weights, out, r, part.shape[2], g, float(scale), BLOCK_G=MAX_SUMS,
        BLOCK_R=block_r, BLOCK_S=block_s, num_warps=_SUM_WARPS)
    return stats, out


def dino_soft_ce_bwd(grad, s, t, col_shift, row_shift, tidx, stats, inv_ts, inv_tt,
                     weights=None, scale=1.0):
    """-> dS [R, K] in the student's dtype. stats: the forward's [3, R]. weights None: grad is
    the per-row gradient [R] (or a broadcast); else grad [G] is the gradient of
    dino_soft_ce_sum_fwd's out (scale · weights @ row_loss)."""
    s, t, col_shift, row_shift, tidx = _prep(s, t, col_shift, row_shift, tidx)
    r, k = s.shape
    ds = torch.empty_like(s)
    if not r:
        return ds
    g = grad if grad.dtype == torch.float32 else grad.float()
    if weights is None:
        w, n_sums, block_g = g, 0, 0
    else:
        w, n_sums, block_g = _check_weights(weights, r), weights.shape[0], MAX_SUMS
        g = g.contiguous()
    stats = stats.contiguous()
    block_r, block_k, k_per_split, n_splits = _config(r, k, s, tidx.shape[1])
    _dino_soft_ce_bwd_kernel[(n_splits, cdiv(r, block_r))](
        s, t, col_shift, row_shift, tidx, stats, g, w, ds, r, k, s.stride(0), t.stride(0),
        ds.stride(0), g.stride(0), n_sums, float(scale), float(inv_ts), float(inv_tt),
        k_per_split, BLOCK_G=block_g, J=tidx.shape[1], BLOCK_R=block_r, BLOCK_K=block_k,
        STAGES=_STAGES, num_warps=_WARPS, num_stages=_STAGES)
    return ds


# ------------------------------------------------------------------------------------------------
# torch.library registration (fake impls: shapes only, so torch.compile traces through). In eager
# mode the autograd Function calls the launchers directly: a custom-op dispatch costs ~7 µs of
# host time, and the DINO CLS loss is host-bound (see the header table).
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdino::dino_soft_ce_fwd", mutates_args=())
def _dino_soft_ce_fwd_op(s: torch.Tensor, t: torch.Tensor, col_shift: torch.Tensor,
                         row_shift: torch.Tensor, tidx: torch.Tensor, inv_ts: float,
                         inv_tt: float) -> torch.Tensor:
    return dino_soft_ce_fwd(s, t, col_shift, row_shift, tidx, inv_ts, inv_tt)


@_dino_soft_ce_fwd_op.register_fake
def _(s, t, col_shift, row_shift, tidx, inv_ts, inv_tt):
    return s.new_empty(3, s.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastdino::dino_soft_ce_bwd", mutates_args=())
def _dino_soft_ce_bwd_op(grad_row: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                         col_shift: torch.Tensor, row_shift: torch.Tensor, tidx: torch.Tensor,
                         stats: torch.Tensor, inv_ts: float, inv_tt: float) -> torch.Tensor:
    return dino_soft_ce_bwd(grad_row, s, t, col_shift, row_shift, tidx, stats, inv_ts, inv_tt)


@_dino_soft_ce_bwd_op.register_fake
def _(grad_row, s, t, col_shift, row_shift, tidx, stats, inv_ts, inv_tt):
    return torch.empty_like(s, memory_format=torch.contiguous_format)  # as _prep's copy


@torch.library.custom_op("fastdino::dino_soft_ce_sum_fwd", mutates_args=())
def _dino_soft_ce_sum_fwd_op(s: torch.Tensor, t: torch.Tensor, col_shift: torch.Tensor,
                             row_shift: torch.Tensor, tidx: torch.Tensor, weights: torch.Tensor,
                             scale: float, inv_ts: float, inv_tt: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    return dino_soft_ce_sum_fwd(s, t, col_shift, row_shift, tidx, weights, scale, inv_ts, inv_tt)


@_dino_soft_ce_sum_fwd_op.register_fake
def _(s, t, col_shift, row_shift, tidx, weights, scale, inv_ts, inv_tt):
    return (s.new_empty(3, s.shape[0], dtype=torch.float32),
            s.new_empty(weights.shape[0], dtype=torch.float32))


def _dino_soft_ce_sum_bwd(grad, s, t, col_shift, row_shift, tidx, stats, weights, scale, inv_ts,
                          inv_tt):
    return dino_soft_ce_bwd(grad, s, t, col_shift, row_shift, tidx, stats, inv_ts, inv_tt,
                            weights=weights, scale=scale)


@torch.library.custom_op("fastdino::dino_soft_ce_sum_bwd", mutates_args=())
def _dino_soft_ce_sum_bwd_op(grad: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                             col_shift: torch.Tensor, row_shift: torch.Tensor,
                             tidx: torch.Tensor, stats: torch.Tensor, weights: torch.Tensor,
                             scale: float, inv_ts: float, inv_tt: float) -> torch.Tensor:
    return _dino_soft_ce_sum_bwd(grad, s, t, col_shift, row_shift, tidx, stats, weights, scale,
                                 inv_ts, inv_tt)


@_dino_soft_ce_sum_bwd_op.register_fake
def _(grad, s, t, col_shift, row_shift, tidx, stats, weights, scale, inv_ts, inv_tt):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------------------
# Autograd and the functional API
# ------------------------------------------------------------------------------------------------


class DinoSoftCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, col_shift, row_shift, tidx, inv_ts, inv_tt):
        fwd = eager_or_op(torch.ops.fastdino.dino_soft_ce_fwd, dino_soft_ce_fwd)
        stats = fwd(s, t, col_shift, row_shift, tidx, inv_ts, inv_tt)
        ctx.save_for_backward(s, t, col_shift, row_shift, tidx, stats)
        ctx.temps = (inv_ts, inv_tt)
        return stats[0]

    @staticmethod
    def backward(ctx, grad_row):
        bwd = eager_or_op(torch.ops.fastdino.dino_soft_ce_bwd, dino_soft_ce_bwd)
        ds = bwd(grad_row, *ctx.saved_tensors, *ctx.temps)
        return ds, None, None, None, None, None, None


class DinoSoftCESumFn(torch.autograd.Function):
    """-> the G losses as G 0-d outputs (views of one [G] buffer). Separate outputs, not the [G]
    tensor: indexing that would put a SelectBackward (a [G] zero-fill and a copy) in front of
    this backward for each loss used; here an unused loss's gradient stays None (no
    materialised zeros) and the usual single one (the DINO total) reaches the kernel as it is,
    with its row of the weights."""

    @staticmethod
    def forward(ctx, s, t, col_shift, row_shift, tidx, weights, scale, inv_ts, inv_tt):
        fwd = eager_or_op(torch.ops.fastdino.dino_soft_ce_sum_fwd, dino_soft_ce_sum_fwd)
        stats, out = fwd(s, t, col_shift, row_shift, tidx, weights, scale, inv_ts, inv_tt)
        ctx.save_for_backward(s, t, col_shift, row_shift, tidx, stats, weights)
        ctx.consts = (scale, inv_ts, inv_tt)
        ctx.set_materialize_grads(False)
        return out.unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        s, t, col_shift, row_shift, tidx, stats, weights = ctx.saved_tensors
        # autograd calls this only when some loss got a gradient: `used` is never empty
        used = [g for g, grad in enumerate(grads) if grad is not None]
        if len(used) == 1:  # views: no kernel
            grad, weights = grads[used[0]].reshape(1), weights[used[0]:used[0] + 1]
        else:
            zero = grads[used[0]].new_zeros(())
            grad = torch.stack([zero if g is None else g for g in grads])
        bwd = eager_or_op(torch.ops.fastdino.dino_soft_ce_sum_bwd, _dino_soft_ce_sum_bwd)
        ds = bwd(grad, s, t, col_shift, row_shift, tidx, stats, weights, *ctx.consts)
        return ds, None, None, None, None, None, None, None, None


def _saveable(student_logits: torch.Tensor, *saved: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Targets made under torch.inference_mode() cannot be saved for backward: copies of them
    when the loss is to be differentiated (the trainer makes them under no_grad: no copy)."""
    if (torch.compiler.is_compiling()  # dynamo cannot trace is_inference()
            or not (student_logits.requires_grad and torch.is_grad_enabled())):
        return saved
    return tuple(x.clone() if x.is_inference() else x for x in saved)


def dino_soft_ce(student_logits: torch.Tensor, targets: TeacherTargets,
                 teacher_index: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Fused per-row soft cross-entropy [R] fp32, differentiable in `student_logits`; same
    semantics as `dino_soft_ce_ref(student_logits, targets.materialize(), teacher_index, τ_s)`.
    teacher_index entries must lie in [-1, N) (not checked on device: no host sync)."""
    f = targets.factorised()
    t, col_shift, row_shift, tidx = _saveable(student_logits, f.logits.detach(), f.col_shift,
                                              f.row_shift, teacher_index)
    return DinoSoftCEFn.apply(student_logits, t, col_shift, row_shift, tidx, 1.0 / student_temp,
                              f.inv_temp)


def dino_soft_ce_sum(student_logits: torch.Tensor, targets: TeacherTargets,
                     teacher_index: torch.Tensor, student_temp: float, weights: torch.Tensor,
                     scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Fused weighted sums of the per-row soft cross-entropies: a tuple of G 0-d fp32 losses
    (G <= MAX_SUMS), differentiable in `student_logits`; the values of `dino_soft_ce_sum_ref`
    (a [G] tensor). Three launches per forward and backward in all (kernel + one-program merge;
    kernel), where the per-row form needs the caller's torch reductions and their autograd
    nodes besides: the DINO CLS loss is host-bound (module header)."""
    f = targets.factorised()
    t, col_shift, row_shift, tidx, weights = _saveable(
        student_logits, f.logits.detach(), f.col_shift, f.row_shift, teacher_index, weights)
    return DinoSoftCESumFn.apply(student_logits, t, col_shift, row_shift, tidx, weights,
                                 float(scale), 1.0 / student_temp, f.inv_temp)


# ------------------------------------------------------------------------------------------------
# Every jit kernel at its shipped launch configurations (tests/kernels/test_compile.py)
# ------------------------------------------------------------------------------------------------


def _div16(signature: dict[str, str]) -> tuple[str, ...]:
    """Arguments every training launch passes 16-aligned / divisible by 16 (the JIT specialises
    on it: vector loads and the cp.async pipeline): the pointers, K, the row strides and
    k_per_split (a multiple of BLOCK_K). Not R / n_splits (not specialised) nor stride_g (0 or
    1)."""
    return tuple(a for a in signature if a.endswith("_ptr")
                 or a in ("K", "stride_s", "stride_t", "stride_ds", "k_per_split"))


def compile_specs() -> list[CompileSpec]:
    specs = []
    for (torch_dt, j), (br, bk) in _GPU_BLOCK.items():
        dt = {torch.bfloat16: "bf16", torch.float32: "fp32"}[torch_dt]
        base = {"s_ptr": f"*{dt}", "t_ptr": f"*{dt}", "col_shift_ptr": "*fp32",
                "row_shift_ptr": "*fp32", "tidx_ptr": "*i32"}
        specs.append(CompileSpec(
            name=f"dino_soft_ce_fwd[J={j},BLOCK={br}x{bk},{dt}]",
            fn=_dino_soft_ce_fwd_kernel,
            signature={**base, "part_ptr": "*fp32", "R": "i32", "K": "i32", "stride_s": "i32",
                       "stride_t": "i32", "inv_ts": "fp32", "inv_tt": "fp32",
                       "k_per_split": "i32", "n_splits": "i32"},
            constexprs={"J": j, "BLOCK_R": br, "BLOCK_K": bk, "STAGES": _STAGES},
            num_warps=_WARPS, num_stages=_STAGES))
        for block_g in (0, MAX_SUMS):  # per-row gradient / the weighted sums' gradient
            specs.append(CompileSpec(
                name=f"dino_soft_ce_bwd[J={j},BLOCK={br}x{bk},G={block_g},{dt}]",
                fn=_dino_soft_ce_bwd_kernel,
                signature={**base, "stats_ptr": "*fp32", "g_ptr": "*fp32", "w_ptr": "*fp32",
                           "ds_ptr": f"*{dt}", "R": "i32", "K": "i32", "stride_s": "i32",
                           "stride_t": "i32", "stride_ds": "i32", "stride_g": "i32", "G": "i32",
                           "scale": "fp32", "inv_ts": "fp32", "inv_tt": "fp32",
                           "k_per_split": "i32"},
                constexprs={"BLOCK_G": block_g, "J": j, "BLOCK_R": br, "BLOCK_K": bk,
                            "STAGES": _STAGES},
                num_warps=_WARPS, num_stages=_STAGES))
    specs.append(CompileSpec(
        name=f"dino_soft_ce_merge[BLOCK_R={_MERGE_BLOCK_R},BLOCK_S={MAX_SPLITS}]",
        fn=_soft_ce_merge_kernel,
        signature={"part_ptr": "*fp32", "out_ptr": "*fp32", "R": "i32", "n_splits": "i32"},
        constexprs={"BLOCK_R": _MERGE_BLOCK_R, "BLOCK_S": MAX_SPLITS},
        num_warps=_MERGE_WARPS))
    n_splits = 1
    while n_splits <= MAX_SPLITS:  # every power of two the split heuristic can give
        block_r, block_s = _sum_block_r(n_splits)
        specs.append(CompileSpec(
            name=f"dino_soft_ce_merge_sum[BLOCK_R={block_r},BLOCK_S={block_s}]",
            fn=_soft_ce_merge_sum_kernel,
            signature={"part_ptr": "*fp32", "stats_ptr": "*fp32", "w_ptr": "*fp32",
                       "out_ptr": "*fp32", "R": "i32", "n_splits": "i32", "G": "i32",
                       "scale": "fp32"},
            constexprs={"BLOCK_G": MAX_SUMS, "BLOCK_R": block_r, "BLOCK_S": block_s},
            num_warps=_SUM_WARPS))
        n_splits *= 2
    return [dataclasses.replace(sp, divisible_by_16=_div16(sp.signature)) for sp in specs]
