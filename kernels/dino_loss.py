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


# ------------------------------------------------------------------------------------------------
# Triton kernels. Grid (student rows R, K splits): one program streams one student row's K slice
# and the same slice of its (at most 2) teacher rows, forming p = exp2(t·inv_tt·log2e -
# col_shift·log2e - row_shift·log2e) on the fly; the splits are merged by an LSE merge, so the
# few-row DINO case still fills the GPU. fp32 accumulation, int64 row offsets.
#
# Bytes (model HBM traffic, e = element size of the logits):
#   forward  R·K·e (student) + R·J·K·e (teacher rows; hits L2 when rows are shared) + 4K (shift)
#   backward R·K·e (read s) + R·J·K·e (teacher) + R·K·e (write dS)
# Nothing N×K or R×K is allocated besides dS; extra memory is O(R·splits + K).
# ------------------------------------------------------------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fastdino.kernels._utils import CompileSpec, is_interpreter, next_pow2  # noqa: E402

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _teacher_probs(t_ptr, col_shift_ptr, row_shift_ptr, tidx_ptr, row, cols, cmask, stride_t,
                   tscale, J: tl.constexpr):
    """Σ_{j<J} p[tidx[row, j], cols] (fp32 [BLOCK_K]); tidx = -1 contributes 0."""
    a2 = tl.load(col_shift_ptr + cols, mask=cmask, other=0.0) * 1.4426950408889634
    ti = tl.load(tidx_ptr + row * J)
    ok = cmask & ((cols * 0 + ti) >= 0)  # broadcast first: scalar & vector trips the interpreter
    tr = tl.maximum(ti, 0).to(tl.int64)
    b2 = tl.load(row_shift_ptr + tr) * 1.4426950408889634
    t = tl.load(t_ptr + tr * stride_t + cols, mask=ok, other=0.0).to(tl.float32)
    p = tl.where(ok, tl.exp2(t * tscale - a2 - b2), 0.0)
    if J == 2:
        ti1 = tl.load(tidx_ptr + row * J + 1)
        ok1 = cmask & ((cols * 0 + ti1) >= 0)
        tr1 = tl.maximum(ti1, 0).to(tl.int64)
        b21 = tl.load(row_shift_ptr + tr1) * 1.4426950408889634
        t1 = tl.load(t_ptr + tr1 * stride_t + cols, mask=ok1, other=0.0).to(tl.float32)
        p += tl.where(ok1, tl.exp2(t1 * tscale - a2 - b21), 0.0)
    return p


@triton.jit
def _dino_soft_ce_fwd_kernel(s_ptr, t_ptr, col_shift_ptr, row_shift_ptr, tidx_ptr, m_ptr, d_ptr,
                             dot_ptr, psum_ptr, K, stride_s, stride_t, inv_ts, inv_tt,
                             k_per_split, n_splits, J: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partials of one (row, K split): online max m and d = Σ exp2(z2 - m) of z2 = s·inv_ts·log2e,
    dot = Σ_k p_k·z_k (natural z = s·inv_ts) and psum = Σ_k p_k."""
    row = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    s_row = s_ptr + row * stride_s
    tscale = inv_tt * 1.4426950408889634
    m = float("-inf")
    d = 0.0
    dot = tl.zeros([BLOCK_K], tl.float32)
    psum = tl.zeros([BLOCK_K], tl.float32)
    k_lo = pid_s * k_per_split
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        z = tl.load(s_row + cols, mask=cmask, other=0.0).to(tl.float32) * inv_ts
        z2 = tl.where(cmask, z * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m, tl.max(z2, axis=0))
        d = d * tl.exp2(m - m_new) + tl.sum(tl.exp2(z2 - m_new), axis=0)
        m = m_new
        p = _teacher_probs(t_ptr, col_shift_ptr, row_shift_ptr, tidx_ptr, row, cols, cmask,
                           stride_t, tscale, J)
        dot += p * z
        psum += p
    out = row * n_splits + pid_s
    tl.store(m_ptr + out, m)
    tl.store(d_ptr + out, d)
    tl.store(dot_ptr + out, tl.sum(dot, axis=0))
    tl.store(psum_ptr + out, tl.sum(psum, axis=0))


@triton.jit
def _dino_soft_ce_bwd_kernel(s_ptr, t_ptr, col_shift_ptr, row_shift_ptr, tidx_ptr, lse2_ptr,
                             coef_ptr, g_ptr, ds_ptr, K, stride_s, stride_t, stride_ds, inv_ts,
                             inv_tt, k_per_split, J: tl.constexpr, BLOCK_K: tl.constexpr):
    """dS[row, k] = (coef·softmax(z)_k - g·Σ_j p_jk)·inv_ts, coef = g·Σ_k Σ_j p_jk, recomputed
    in tiles from the saved row LSE (log2 units): no probability is stored."""
    row = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    s_row = s_ptr + row * stride_s
    zscale = inv_ts * 1.4426950408889634
    tscale = inv_tt * 1.4426950408889634
    lse2 = tl.load(lse2_ptr + row)
    coef = tl.load(coef_ptr + row)
    g = tl.load(g_ptr + row)
    k_lo = pid_s * k_per_split
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        z2 = tl.load(s_row + cols, mask=cmask, other=0.0).to(tl.float32) * zscale
        p = _teacher_probs(t_ptr, col_shift_ptr, row_shift_ptr, tidx_ptr, row, cols, cmask,
                           stride_t, tscale, J)
        ds = (coef * tl.exp2(z2 - lse2) - g * p) * inv_ts
        tl.store(ds_ptr + row * stride_ds + cols, ds.to(ds_ptr.dtype.element_ty), mask=cmask)


# ------------------------------------------------------------------------------------------------
# Launchers (fixed configs chosen by a heuristic: autotune cannot run under the interpreter)
# ------------------------------------------------------------------------------------------------

_WARPS = 8
_GPU_BLOCK_K = 2048
_NUM_SMS = 132  # only sets how finely K is split, never correctness


def _config(r: int, k: int, x: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_K, k_per_split, n_splits): split K until the grid holds ~4 programs per SM."""
    if is_interpreter():  # the interpreter pays per program: few of them, still some splits
        block_k, target = min(2048, next_pow2(k)), 8
    else:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda \
            else _NUM_SMS
        block_k, target = min(_GPU_BLOCK_K, next_pow2(k)), 4 * sms
    k_blocks = triton.cdiv(k, block_k)
    n_splits = max(1, min(k_blocks, triton.cdiv(target, max(r, 1))))
    k_per_split = triton.cdiv(k_blocks, n_splits) * block_k
    return block_k, k_per_split, triton.cdiv(k, k_per_split)


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


def dino_soft_ce_fwd(s, t, col_shift, row_shift, tidx, inv_ts, inv_tt):
    """-> (row_loss [R], lse [R] (natural units), psum [R]) fp32."""
    _check_inputs(s, t, col_shift, row_shift, tidx)
    s, t = s.contiguous(), t.contiguous()
    tidx = tidx.to(torch.int32).contiguous()
    r, k = s.shape
    block_k, k_per_split, n_splits = _config(r, k, s)
    f32 = dict(device=s.device, dtype=torch.float32)
    m, d = torch.empty(r, n_splits, **f32), torch.empty(r, n_splits, **f32)
    dot, psum = torch.empty(r, n_splits, **f32), torch.empty(r, n_splits, **f32)
    if r:
        _dino_soft_ce_fwd_kernel[(r, n_splits)](
            s, t, col_shift.float().contiguous(), row_shift.float().contiguous(), tidx, m, d,
            dot, psum, k, s.stride(0), t.stride(0), float(inv_ts), float(inv_tt), k_per_split,
            n_splits, J=tidx.shape[1], BLOCK_K=block_k, num_warps=_WARPS)
    # LSE merge of the K splits (log2 units), then loss = LSE·Σp - Σ p·z
    m_all = m.amax(dim=1, keepdim=True)
    lse = LN2 * (m_all.squeeze(1) + torch.log2((d * torch.exp2(m - m_all)).sum(dim=1)))
    psum = psum.sum(dim=1)
    return lse * psum - dot.sum(dim=1), lse, psum


def dino_soft_ce_bwd(grad_row, s, t, col_shift, row_shift, tidx, lse, psum, inv_ts, inv_tt):
    """-> dS [R, K] in the student's dtype."""
    s, t = s.contiguous(), t.contiguous()
    tidx = tidx.to(torch.int32).contiguous()
    r, k = s.shape
    block_k, k_per_split, n_splits = _config(r, k, s)
    ds = torch.empty_like(s)
    g = grad_row.float().contiguous()
    if r:
        _dino_soft_ce_bwd_kernel[(r, n_splits)](
            s, t, col_shift.float().contiguous(), row_shift.float().contiguous(), tidx,
            (lse * LOG2E).contiguous(), (g * psum).contiguous(), g, ds, k, s.stride(0),
            t.stride(0), ds.stride(0), float(inv_ts), float(inv_tt), k_per_split, J=tidx.shape[1],
            BLOCK_K=block_k, num_warps=_WARPS)
    return ds


# ------------------------------------------------------------------------------------------------
# torch.library registration (fake impls: shapes only, so torch.compile traces through)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdino::dino_soft_ce_fwd", mutates_args=())
def _dino_soft_ce_fwd_op(s: torch.Tensor, t: torch.Tensor, col_shift: torch.Tensor,
                         row_shift: torch.Tensor, tidx: torch.Tensor, inv_ts: float,
                         inv_tt: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dino_soft_ce_fwd(s, t, col_shift, row_shift, tidx, inv_ts, inv_tt)


@_dino_soft_ce_fwd_op.register_fake
def _(s, t, col_shift, row_shift, tidx, inv_ts, inv_tt):
    r = s.shape[0]
    return tuple(s.new_empty(r, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("fastdino::dino_soft_ce_bwd", mutates_args=())
def _dino_soft_ce_bwd_op(grad_row: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                         col_shift: torch.Tensor, row_shift: torch.Tensor, tidx: torch.Tensor,
                         lse: torch.Tensor, psum: torch.Tensor, inv_ts: float,
                         inv_tt: float) -> torch.Tensor:
    return dino_soft_ce_bwd(grad_row, s, t, col_shift, row_shift, tidx, lse, psum, inv_ts, inv_tt)


@_dino_soft_ce_bwd_op.register_fake
def _(grad_row, s, t, col_shift, row_shift, tidx, lse, psum, inv_ts, inv_tt):
    return torch.empty_like(s)


# ------------------------------------------------------------------------------------------------
# Autograd and the functional API
# ------------------------------------------------------------------------------------------------


class DinoSoftCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, col_shift, row_shift, tidx, inv_ts, inv_tt):
        loss, lse, psum = torch.ops.fastdino.dino_soft_ce_fwd(s, t, col_shift, row_shift, tidx,
                                                              inv_ts, inv_tt)
        ctx.save_for_backward(s, t, col_shift, row_shift, tidx, lse, psum)
        ctx.temps = (inv_ts, inv_tt)
        return loss

    @staticmethod
    def backward(ctx, grad_row):
        s, t, col_shift, row_shift, tidx, lse, psum = ctx.saved_tensors
        ds = torch.ops.fastdino.dino_soft_ce_bwd(grad_row, s, t, col_shift, row_shift, tidx, lse,
                                                 psum, *ctx.temps)
        return ds, None, None, None, None, None, None


def dino_soft_ce(student_logits: torch.Tensor, targets: TeacherTargets,
                 teacher_index: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Fused per-row soft cross-entropy [R] fp32, differentiable in `student_logits`; same
    semantics as `dino_soft_ce_ref(student_logits, targets.materialize(), teacher_index, τ_s)`.
    teacher_index entries must lie in [-1, N) (not checked on device: no host sync)."""
    f = targets.factorised()
    return DinoSoftCEFn.apply(student_logits, f.logits.detach(), f.col_shift, f.row_shift,
                              teacher_index, 1.0 / student_temp, f.inv_temp)


# ------------------------------------------------------------------------------------------------
# Every jit kernel at its shipped launch configurations (tests/kernels/test_compile.py)
# ------------------------------------------------------------------------------------------------


def compile_specs() -> list[CompileSpec]:
    specs = []
    for dt in ("bf16", "fp32"):
        for j in (1, 2):
            base = {"s_ptr": f"*{dt}", "t_ptr": f"*{dt}", "col_shift_ptr": "*fp32",
                    "row_shift_ptr": "*fp32", "tidx_ptr": "*i32"}
            specs.append(CompileSpec(
                name=f"dino_soft_ce_fwd[J={j},BLOCK_K={_GPU_BLOCK_K},{dt}]",
                fn=_dino_soft_ce_fwd_kernel,
                signature={**base, "m_ptr": "*fp32", "d_ptr": "*fp32", "dot_ptr": "*fp32",
                           "psum_ptr": "*fp32", "K": "i32", "stride_s": "i32",
                           "stride_t": "i32", "inv_ts": "fp32", "inv_tt": "fp32",
                           "k_per_split": "i32", "n_splits": "i32"},
                constexprs={"J": j, "BLOCK_K": _GPU_BLOCK_K}, num_warps=_WARPS))
            specs.append(CompileSpec(
                name=f"dino_soft_ce_bwd[J={j},BLOCK_K={_GPU_BLOCK_K},{dt}]",
                fn=_dino_soft_ce_bwd_kernel,
                signature={**base, "lse2_ptr": "*fp32", "coef_ptr": "*fp32", "g_ptr": "*fp32",
                           "ds_ptr": f"*{dt}", "K": "i32", "stride_s": "i32",
                           "stride_t": "i32", "stride_ds": "i32", "inv_ts": "fp32",
                           "inv_tt": "fp32", "k_per_split": "i32"},
                constexprs={"J": j, "BLOCK_K": _GPU_BLOCK_K}, num_warps=_WARPS))
    return specs
