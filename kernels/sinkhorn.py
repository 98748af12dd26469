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
    # Guard against 0/0 only. After the shift every prototype row holds an exp(0) = 1, so its
    # sum is >= 1/sum_Q > 0, and legitimately tiny (~1/(N·K) for a prototype one sample
    # reaches, below fp32 eps once N·K > 8e6): clamping at eps would skip its normalisation.
    tiny = torch.finfo(Q.dtype).tiny

    sum_Q = dist.all_reduce_sum(torch.sum(Q))  # make the matrix sum to 1 (cancelled below)
    Q /= sum_Q.clamp_min(tiny)
    for _ in range(n_iterations):
        # each prototype's total weight must be 1/K (sums over samples of every rank)
        sum_of_rows = dist.all_reduce_sum(torch.sum(Q, dim=1, keepdim=True))
        Q /= sum_of_rows.clamp_min(tiny)
        Q /= K
        # each sample's total weight must be 1/B (a sample lives on one rank: local sum)
        Q /= torch.sum(Q, dim=0, keepdim=True).clamp_min(tiny)
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


# ------------------------------------------------------------------------------------------------
# Triton kernels. All exponentials are exp2 with log2(e) folded into the scale; accumulation in
# fp32 whatever the logits' dtype; row offsets in int64 (N·K reaches 2^31 at iBOT shapes).
# ------------------------------------------------------------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fastdino.kernels._utils import CompileSpec, is_interpreter, next_pow2  # noqa: E402

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_MODE_MAX = 0  # column pass: max_b t[b, k]·inv_temp
_MODE_SUMEXP = 1  # column pass: Σ_b exp(t[b, k]·inv_temp - col_shift[k] - row_shift[b])


@triton.jit
def _teacher_col_kernel(t_ptr, col_shift_ptr, row_shift_ptr, out_ptr, N, K, stride_t,
                        inv_temp, rows_per_split, MODE: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """One program: BLOCK_K prototypes × one slice of rows; writes a partial [BLOCK_K] of the
    column max (MODE 0) or of the column sum of exp (MODE 1) to out[pid_split, cols]."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    if MODE == 0:
        acc = tl.full([BLOCK_K], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BLOCK_K], tl.float32)
        a2 = tl.load(col_shift_ptr + cols, mask=cmask, other=0.0) * 1.4426950408889634
    scale = inv_temp * 1.4426950408889634
    row_lo = pid_s * rows_per_split
    for r0 in range(row_lo, row_lo + rows_per_split, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        m2d = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
        t = tl.load(t_ptr + offs, mask=m2d, other=0.0).to(tl.float32)
        if MODE == 0:
            acc = tl.maximum(acc, tl.max(tl.where(m2d, t * inv_temp, float("-inf")), axis=0))
        else:
            b2 = tl.load(row_shift_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
            e = tl.exp2(t * scale - a2[None, :] - b2[:, None])
            acc += tl.sum(tl.where(m2d, e, 0.0), axis=0)
    tl.store(out_ptr + pid_s.to(tl.int64) * K + cols, acc, mask=cmask)


@triton.jit
def _teacher_row_kernel(t_ptr, col_shift_ptr, m_ptr, d_ptr, s1_ptr, colsum_ptr, N, K, stride_t,
                        inv_temp, k_per_split, n_splits, WITH_COLSUM: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: BLOCK_N rows × one K slice. Online, in log2 units, over y2 = (t·inv_temp -
    col_shift)·log2(e): running max m, d = Σ exp2(y2 - m) and s1 = Σ exp2(y2 - m)·y2 (the
    entropy's E_p[y]). Partials go to [N, n_splits]; WITH_COLSUM also atomically adds the raw
    column sums of t to colsum[K] (the softmax center's batch statistic, fused in this read)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    row_off = rows.to(tl.int64)[:, None] * stride_t
    scale = inv_temp * 1.4426950408889634
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_N], tl.float32)
    s1 = tl.zeros([BLOCK_N], tl.float32)
    k_lo = pid_s * k_per_split
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        m2d = rmask[:, None] & cmask[None, :]
        t = tl.load(t_ptr + row_off + cols[None, :], mask=m2d, other=0.0).to(tl.float32)
        if WITH_COLSUM:
            tl.atomic_add(colsum_ptr + cols, tl.sum(t, axis=0), mask=cmask)
        a2 = tl.load(col_shift_ptr + cols, mask=cmask, other=0.0) * 1.4426950408889634
        # masked columns -> -inf (weight 0); masked rows stay finite (never stored)
        y2 = tl.where(cmask[None, :], t * scale - a2[None, :], float("-inf"))
        m_new = tl.maximum(m, tl.max(y2, axis=1))
        alpha = tl.exp2(m - m_new)
        e = tl.exp2(y2 - m_new[:, None])
        d = d * alpha + tl.sum(e, axis=1)
        # e·y2 with e = 0 where y2 = -inf (p = 0 targets) must give 0, not nan
        s1 = s1 * alpha + tl.sum(e * tl.where(y2 > float("-inf"), y2, 0.0), axis=1)
        m = m_new
    out = rows.to(tl.int64) * n_splits + pid_s
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(d_ptr + out, d, mask=rmask)
    tl.store(s1_ptr + out, s1, mask=rmask)


# ------------------------------------------------------------------------------------------------
# Launch heuristics (fixed configs: autotune cannot run under the interpreter, and a fixed
# config is what compile_specs() can check for spills).
# ------------------------------------------------------------------------------------------------

_NUM_SMS = 132  # H100 SXM; only sets how finely rows / K are split, never correctness


def _num_sms(x: torch.Tensor) -> int:
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return _NUM_SMS


def _target_programs(x: torch.Tensor) -> int:
    """Programs wanted in a grid: ~4 per SM on a GPU; a handful under the interpreter, which
    pays per program (still > 1 so that the split-and-merge paths are exercised)."""
    return 8 if is_interpreter() else 4 * _num_sms(x)


def _col_config(n: int, k: int, x: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, rows_per_split, n_splits) of the column pass."""
    if is_interpreter():  # few, large programs: the interpreter pays per program
        block_n, block_k = min(16, next_pow2(n)), min(2048, next_pow2(k))
    else:
        block_n, block_k = 16, 256
    col_blocks = triton.cdiv(k, block_k)
    row_blocks = triton.cdiv(n, block_n)
    n_splits = max(1, min(row_blocks, triton.cdiv(_target_programs(x), col_blocks)))
    rows_per_split = triton.cdiv(row_blocks, n_splits) * block_n
    return block_n, block_k, rows_per_split, triton.cdiv(n, rows_per_split)


def _row_config(n: int, k: int, x: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, k_per_split, n_splits) of the row pass: few rows (DINO: 2B) are
    split along K so the grid still fills the GPU; the splits are merged by an LSE merge."""
    if is_interpreter():
        block_n, block_k = min(8, next_pow2(n)), min(2048, next_pow2(k))
    else:
        block_n, block_k = 4, 1024
    k_blocks = triton.cdiv(k, block_k)
    n_splits = max(1, min(k_blocks, triton.cdiv(_target_programs(x), triton.cdiv(n, block_n))))
    k_per_split = triton.cdiv(k_blocks, n_splits) * block_k
    return block_n, block_k, k_per_split, triton.cdiv(k, k_per_split)


_WARPS = 8


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _check_teacher(t: torch.Tensor) -> None:
    if t.dim() != 2 or t.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError("teacher logits must be a 2-D [N, K] fp32 or bf16 tensor, got "
                         f"{tuple(t.shape)} {t.dtype}")


def teacher_col_reduce(t: torch.Tensor, col_shift: torch.Tensor, row_shift: torch.Tensor,
                       inv_temp: float, mode: int) -> torch.Tensor:
    """[K] fp32, this rank's rows only: mode 0 -> max_b t·inv_temp; mode 1 ->
    Σ_b exp(t·inv_temp - col_shift[k] - row_shift[b])."""
    _check_teacher(t)
    t = t.contiguous()
    n, k = t.shape
    block_n, block_k, rows_per_split, n_splits = _col_config(n, k, t)
    part = torch.empty(n_splits, k, device=t.device, dtype=torch.float32)
    grid = (triton.cdiv(k, block_k), n_splits)
    _teacher_col_kernel[grid](t, col_shift, row_shift, part, n, k, t.stride(0), float(inv_temp),
                              rows_per_split, MODE=mode, BLOCK_N=block_n, BLOCK_K=block_k,
                              num_warps=_WARPS)
    return part.amax(dim=0) if mode == _MODE_MAX else part.sum(dim=0)


def teacher_row_lse(t: torch.Tensor, col_shift: torch.Tensor, inv_temp: float,
                    with_colsum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row b: LSE_k(t[b]·inv_temp - col_shift) [N] and the entropy (nats) [N] of the
    softmax it normalises; plus the column sum of t [K] when `with_colsum` (else empty)."""
    _check_teacher(t)
    t = t.contiguous()
    n, k = t.shape
    block_n, block_k, k_per_split, n_splits = _row_config(n, k, t)
    m = torch.empty(n, n_splits, device=t.device, dtype=torch.float32)
    d, s1 = torch.empty_like(m), torch.empty_like(m)
    colsum = torch.zeros(k if with_colsum else 0, device=t.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), n_splits)
    _teacher_row_kernel[grid](t, col_shift, m, d, s1, colsum if with_colsum else m, n, k,
                              t.stride(0), float(inv_temp), k_per_split, n_splits,
                              WITH_COLSUM=with_colsum, BLOCK_N=block_n, BLOCK_K=block_k,
                              num_warps=_WARPS)
    # LSE merge of the K splits, in log2 units
    m_all = m.amax(dim=1, keepdim=True)
    w = torch.exp2(m - m_all)
    d_all = (d * w).sum(dim=1)
    lse2 = m_all.squeeze(1) + torch.log2(d_all)
    entropy = LN2 * (lse2 - (s1 * w).sum(dim=1) / d_all)
    return LN2 * lse2, entropy, colsum


# ------------------------------------------------------------------------------------------------
# torch.library registration (fake impls give shapes, so torch.compile traces through)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdino::teacher_col_reduce", mutates_args=())
def _teacher_col_reduce_op(t: torch.Tensor, col_shift: torch.Tensor, row_shift: torch.Tensor,
                           inv_temp: float, mode: int) -> torch.Tensor:
    return teacher_col_reduce(t, col_shift, row_shift, inv_temp, mode)


@_teacher_col_reduce_op.register_fake
def _(t, col_shift, row_shift, inv_temp, mode):
    return t.new_empty(t.shape[1], dtype=torch.float32)


@torch.library.custom_op("fastdino::teacher_row_lse", mutates_args=())
def _teacher_row_lse_op(t: torch.Tensor, col_shift: torch.Tensor, inv_temp: float,
                        with_colsum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return teacher_row_lse(t, col_shift, inv_temp, with_colsum)


@_teacher_row_lse_op.register_fake
def _(t, col_shift, inv_temp, with_colsum):
    n, k = t.shape
    f = dict(dtype=torch.float32)
    return t.new_empty(n, **f), t.new_empty(n, **f), t.new_empty(k if with_colsum else 0, **f)


# ------------------------------------------------------------------------------------------------
# Functional API (no autograd: the teacher side is under no_grad)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                   n_total: int | float | torch.Tensor | None = None) -> TeacherTargets:
    """Sinkhorn-Knopp in 2·iters + 1 streaming reads of the teacher logits [N, K]; returns the
    factorised targets (the logits are kept by reference, not copied). Collectives: 1 K-vector
    all-reduce MAX + iters K-vector all-reduce SUMs, through fastdino.dist."""
    _check_teacher(teacher_logits)
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    t = teacher_logits.contiguous()
    n, k = t.shape
    inv_temp = 1.0 / teacher_temp
    if n_total is None:
        n_total = float(n * dist.get_world_size())
    elif not torch.is_tensor(n_total):
        n_total = float(n_total)  # a 0-d tensor (iBOT's all-reduced count) is used as is
    ops = torch.ops.fastdino
    zeros_n = torch.zeros(n, device=t.device, dtype=torch.float32)
    # exact overflow guard: per-prototype max over the global batch (SPEC.md §10.2)
    # (the shift vectors are not read in MODE_MAX; real tensors are passed because the CUDA
    # launcher rejects the null data pointer of an empty one)
    col_shift = dist.all_reduce_max(ops.teacher_col_reduce(t, zeros_n, zeros_n, inv_temp,
                                                           _MODE_MAX))
    row_shift = zeros_n
    tiny = torch.finfo(torch.float32).tiny  # a prototype no sample reaches: no log(0)
    for _ in range(n_iterations):
        col_sum = dist.all_reduce_sum(ops.teacher_col_reduce(t, col_shift, row_shift, inv_temp,
                                                             _MODE_SUMEXP))
        col_shift = col_shift + torch.log(col_sum.clamp_min(tiny) * (k / n_total))
        row_shift, entropy, _ = ops.teacher_row_lse(t, col_shift, inv_temp, False)
    return TeacherTargets(logits=t, inv_temp=inv_temp, col_shift=col_shift, row_shift=row_shift,
                          row_entropy=entropy)


@torch.no_grad()
def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor,
                   teacher_temp: float) -> tuple[TeacherTargets, torch.Tensor]:
    """softmax((t - c)/τ_t) as factorised targets, in one read of t that also yields this rank's
    column sum of t [K] fp32 (for the center's EMA; atomics: summation order not fixed)."""
    _check_teacher(teacher_logits)
    t = teacher_logits.contiguous()
    inv_temp = 1.0 / teacher_temp
    col_shift = center.reshape(-1).float() * inv_temp
    row_shift, entropy, col_sum = torch.ops.fastdino.teacher_row_lse(t, col_shift, inv_temp, True)
    targets = TeacherTargets(logits=t, inv_temp=inv_temp, col_shift=col_shift,
                             row_shift=row_shift, row_entropy=entropy)
    return targets, col_sum


# ------------------------------------------------------------------------------------------------
# Every jit kernel at its shipped launch configurations (tests/kernels/test_compile.py)
# ------------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def compile_specs() -> list[CompileSpec]:
    specs = []
    for dt in ("bf16", "fp32"):
        for mode in (_MODE_MAX, _MODE_SUMEXP):
            specs.append(CompileSpec(
                name=f"sk_teacher_col[MODE={mode},BLOCK_N=16,BLOCK_K=256,{dt}]",
                fn=_teacher_col_kernel,
                signature={"t_ptr": f"*{dt}", "col_shift_ptr": "*fp32", "row_shift_ptr": "*fp32",
                           "out_ptr": "*fp32", "N": "i32", "K": "i32", "stride_t": "i32",
                           "inv_temp": "fp32", "rows_per_split": "i32"},
                constexprs={"MODE": mode, "BLOCK_N": 16, "BLOCK_K": 256}, num_warps=_WARPS))
        for colsum in (False, True):
            specs.append(CompileSpec(
                name=f"sk_teacher_row[COLSUM={colsum},BLOCK_N=4,BLOCK_K=1024,{dt}]",
                fn=_teacher_row_kernel,
                signature={"t_ptr": f"*{dt}", "col_shift_ptr": "*fp32", "m_ptr": "*fp32",
                           "d_ptr": "*fp32", "s1_ptr": "*fp32", "colsum_ptr": "*fp32",
                           "N": "i32", "K": "i32", "stride_t": "i32", "inv_temp": "fp32",
                           "k_per_split": "i32", "n_splits": "i32"},
                constexprs={"WITH_COLSUM": colsum, "BLOCK_N": 4, "BLOCK_K": 1024},
                num_warps=_WARPS))
    return specs
