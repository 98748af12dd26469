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
SK = iters × (1 column pass + 1 row pass) = 2·iters = 6 reads at 3 iterations: the per-prototype
max is fused into the first column pass (an online column LSE), so no separate max pass.
Softmax centering = 1 read (row LSE with the center's batch column sum fused). The teacher
entropy (a collapse indicator) is accumulated in the last row pass for free. Extra memory:
O(N·splits + K) fp32 vectors.

Performance model (issue 5; 132 SMs on H100 / H200; e = element size; one pass = N·K·e bytes;
times are one pass at 100 % of 4.2 TB/s (H200, measured D2D copy 4244 GB/s) / 3.35 TB/s (H100
peak); the target is >= 80 % of the measured copy bandwidth):

| bf16 teacher | N × K          | pass MB | column grid | row grid (blocks×splits) | µs H200/H100 |
|--------------|----------------|---------|-------------|--------------------------|--------------|
| ViT-L DINO   | 128 × 65,536   | 16.8    | 512 (3.9)   | 16 × 64 = 1024 (7.8)     | 4.0/5.0 (*)  |
| ViT-L iBOT   | 3,771 × 65,536 | 494     | 512 (3.9)   | 472 × 3 = 1416 (10.7) (†)| 118/148      |
| 7B DINO      | 32 × 262,144   | 16.8    | 2048 (15.5) | 4 × 128 = 512 (3.9)      | 4.0/5.0 (*)  |
| 7B iBOT      | 1,274 × 98,304 | 250     | 768 (5.8)   | 160 × 7 = 1120 (8.5)     | 60/75        |
(programs per SM in brackets; (*) L2-resident after the first pass; fp32 logits: twice the
bytes and time, same grids; row grids of tile_8x256; (†) one_wave variants: waves of occupancy
× SMs programs >= 85 % full, e.g. fixed_16x256 236 × 3 = 708 at 6 per SM, one wave.)

- SK total = 6 passes: ViT-L iBOT 2.97 GB -> 0.71 ms (H200) / 0.89 ms (H100) at roofline, ~0.83 /
  1.04 ms at 85 %. Measured on the H200 (2026-11-26, bench profile): column passes 141 µs each
  (83 % of the copy bandwidth; the first, MODE 0 with `_lse_update`, 148 µs), row passes 188 µs
  (62 %) with per-row statistics updated once per tile (tile_8x256 below), 177 µs (66 %) with
  an elementwise running max. The DINO teachers (16.8 MB, L2-resident) are launch-bound: 3
  column launches + 3 × (row + merge) launches; the whole DINO CLS loss forward (SK and the
  student cross-entropy, 22 launches) measured 186 µs of GPU time under ~660 µs of host time
  on the H200 machine (`python -m bench profile dino_loss`).
- Row-pass variants (ROW_VARIANTS, `teacher_row_pass(variant=)`, `sinkhorn_knopp(row_variant=)`;
  the GPU A/B decides, one command: `python -m bench sk_pass --quick --modes fwd` times one row
  pass of each variant and one MODE-1 column pass at 3,771 × 65,536 bf16, GB/s and % of the
  measured copy; `--check` judges each against PyTorch). What the static evidence says (no GPU
  here): the row pass is instruction-bound, not reduction-bound. SASS of the inner loop, sm_90,
  bf16, instructions per element of a thread: column pass MODE 1 12.1 (83 %), row tile_8x256
  17.1 (62 %), the elementwise-state row pass ~16.5 (66 %): the shipped [8, 256] tile gives
  each thread 8 elements per iteration, so the ~35 instructions of pipeline bookkeeping,
  barrier, col_shift reload and 2 row reductions (10 shuffles) per iteration cost ~4.5 per
  element, plus a mask select. And a grid of 1.34 waves (1416 programs at 8 per SM) leaves
  the last wave a third full, where the column pass is one full wave (512 at 4 per SM).
  The variants (registers: triton 3.6, sm_90, bf16, without / with entropy; no spills
  anywhere, 3.6 and 3.9, sm_90 and sm_80):
  | variant               | what changes                                     | instr/elt | regs   |
  |-----------------------|--------------------------------------------------|-----------|--------|
  | tile_8x256            | baseline (as shipped, masked)                    | 17.1      | 30/32  |
  | tile_fast_8x256       | FAST: no masks, exp2 of one FMA; one-wave grid   | 13.8      | 29/32  |
  | tile_fast_16x256      | 2 rows per thread, 1 col_shift load per 16 rows  | 11.8      | 40/40  |
  | tile_fast_32x256      | 4 rows per thread                                | 10.8      | 64/64  |
  | elem_fast_8x256       | elementwise running max (hypothesis 1)           | 16.5      | 44/52  |
  | fixed_16x256          | no max: shift by the exact previous-pass bound   | 8.1       | 40/48  |
  | fixed_32x256 (default)| the same, 4 rows per thread                      | 7.0       | 48/64  |
  | fixed_16x256_many     | the default on the shipped >= 8-per-SM grid      | 8.1       | 40/48  |
  | lockstep_tile_16x256  | chunk-major walk (column-pass locality), max     | 11.2      | 48/64  |
  | lockstep_fixed_16x256 | chunk-major walk, fixed shift                    | 9.8       | 48/64  |
  Fixed-shift variants run SK row passes 2..iters; the first pass and softmax centering (no
  bound) run their fallback (fixed_32x256 -> tile_fast_32x256). Every fast variant needs K a
  multiple of its tile (all DINOv3 K are); other K and the few-row 7B DINO CLS teacher run
  tile_8x256. The GPU A/B (`python -m bench sk_pass --quick`, H200, two runs on two machines,
  bench/results/nvidia-h200-2026-11-26-check{5,6}; one row pass at 3,771 × 65,536 bf16,
  medians / CUDA-graph device times in µs, copy bandwidth 4221-4247 GB/s):
    tile_8x256 (what shipped) 186 / 179-180 (63 %), tile_fast_16x256 165-166 / 154,
    tile_fast_32x256 159-192 / 147-148, elem_fast_8x256 161-178 / 151-170,
    fixed_16x256 132-165 / 119-135 (78-89 %), fixed_32x256 138-178 / 117-126 (84 % by the
    cleaner run's median), lockstep_fixed_16x256 146-176 / 135, column pass 139-141 / 128.
  So the default is fixed_32x256 (the lowest device time in both runs). The first row pass
  has no previous row_shift; teachers of LOOSE_BOUND_MIN_BYTES (64 MiB) or more run it with the
  fixed shift too, at the exact but loose bound -log(K/N_total), plus one `_row_redo_kernel`
  launch that recomputes any row whose sum fell > 55 nats under it (none unless a sample is
  dominated in every column; N two-load programs otherwise, a few µs; not timed on a GPU yet);
  smaller teachers (DINO CLS, launch-bound) and softmax centering run the fallback
  tile_fast_32x256. In the whole iBOT forward (check6 profile, still with fixed_16x256) the
  3 row passes take 415 µs
  (564 µs with tile_8x256-era kernels in check4): SK's 6 passes at 82 % of the copy
  bandwidth on average.
- Column passes with K % BLOCK_K == 0 (every DINOv3 K) launch FAST: their first, possibly
  partial, row block is peeled off with masks and every full block streams without masks or
  selects (added after the H200 runs above, which timed the masked loop: not timed yet; the
  sk_pass providers col_mode0 / col_mode1 time it).
- Launch configs: column pass BLOCK_N × BLOCK_K = 32 × 128 (bf16) / 16 × 128 (fp32), row pass
  per variant (above; the same tiles for fp32, twice the shared memory), merge 16 × 128;
  num_warps 8 (merge 4), num_stages = STAGES = 4 through `tl.range`: cp.async keeps 3 tiles in
  flight per program (bf16: 24 KB for the column pass' 32 × 128, 12 / 24 / 48 KB for 8 / 16 /
  32 × 256 row tiles). Compiled at the launch
  specialisation (K, strides divisible by 16), triton 3.6 sm_90: column 58-64 registers / 25
  KB shared (4 programs per SM), t tiles as 16-byte cp.async.cg (PTX); compile_specs() declare
  every variant's launches (divisible_by_16) and tests/kernels/test_dino_loss_gpu.py checks
  the real launch on a GPU.
- Minimum: with exact SK every column (row) normalisation needs the complete previous row
  (column) normalisation: each is a global barrier over all of t, so 2·iters reads is the floor
  of a streaming SK (the column sums of iteration i+1 weight each sample by its row LSE of
  iteration i, known only once the whole row is read, so they cannot ride in that row pass).
  The one further saving is the last row pass, which could be folded into the student forward
  (iBOT: 1 of 11 passes of the whole loss); not done.
- torch.compile of `sinkhorn_knopp_ref` (not measured): amax + global sum + 3 × (column sum +
  row sum) = 8 reductions over N×K, each a read of t (or of a materialised fp32 Q, 2× the bytes),
  plus the final Q [N, K] fp32 it writes and the loss reads back; eager: ~25 fp32 element-wise
  passes.

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
    # [1, K] per-prototype max; a rank without rows (no masked patches) still joins the
    # collectives, with -inf
    local_max = (x.amax(dim=0, keepdim=True) if x.shape[0] else
                 x.new_full((1, x.shape[1]), float("-inf")))
    shift = dist.all_reduce_max(local_max)
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
#
# Structure (why, see the performance notes in the module header): the column passes keep
# *elementwise* accumulators [BLOCK_N, BLOCK_K] and reduce them across rows once, after the loop:
# no cross-warp reduction (shared memory + barrier) per tile. The row pass comes in variants
# (STATE_* below) that differ exactly in that choice. Online log-sum-exp updates with one exp2 per
# element (`_lse_update`) use a running max starting at the finite _M0, so that no inf - inf is
# formed.
# ------------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402

from fastdino.kernels._triton import tl, triton  # noqa: E402
from fastdino.kernels._utils import CompileSpec, cdiv, is_interpreter, next_pow2  # noqa: E402

_M0 = -1.0e30  # initial running max (the kernels spell it out): finite, below any t/τ
_TINY = 1.1754943508222875e-38  # fp32 tiny: a prototype no sample reaches gets no log(0)
_MODE_LSE = 0  # column pass 1: col_shift = LSE_b(t[b, k]·inv_temp) + log(K/N_total)
_MODE_SUMEXP = 1  # column pass i > 1: col_shift += log Σ_b exp(t·inv_temp - col_shift - row_shift)
MAX_SPLITS = 128  # K splits of a row pass: the merge kernel reads them as one [rows, 128] tile


@triton.jit
def _lse_update(m, d, x):
    """Online Σ exp(x) = d·exp(m), elementwise, one exp2 per element: the larger of (m, x)
    becomes the max and the other side is scaled by exp(-|x - m|). x = -inf adds nothing.
    Natural units: log2(e) multiplies the (small) difference, never a large logit, so no
    rounding of a ~100-magnitude term is amplified by the cancellation t/τ - shift."""
    gt = x > m
    e = tl.exp2(tl.where(gt, m - x, x - m) * 1.4426950408889634)
    return tl.maximum(m, x), tl.where(gt, d * e + 1.0, d + e)


@triton.jit
def _col_step(m, d, t_ptr, row_shift_ptr, a, rows, cols, N, stride_t, inv_temp,
              MODE: tl.constexpr, MASKED: tl.constexpr, cmask):
    """One [BLOCK_N, BLOCK_K] tile of a column pass. MASKED: the tile may hold rows >= N or
    columns >= K (masked loads, -inf / 0 weights); else every element is in bounds and the
    selects go (FAST launches: K % BLOCK_K == 0, every row block but the last full)."""
    ptrs = t_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
    if MASKED:
        rmask = rows < N
        m2d = rmask[:, None] & cmask[None, :]
        t = tl.load(ptrs, mask=m2d, other=0.0).to(tl.float32)
        if MODE == 0:
            m, d = _lse_update(m, d, tl.where(m2d, t * inv_temp, float("-inf")))
        else:
            b = tl.load(row_shift_ptr + rows, mask=rmask, other=0.0)
            x = (t * inv_temp - a[None, :] - b[:, None]) * 1.4426950408889634
            d += tl.where(m2d, tl.exp2(x), 0.0)
    else:
        t = tl.load(ptrs).to(tl.float32)
        if MODE == 0:
            m, d = _lse_update(m, d, t * inv_temp)
        else:
            b = tl.load(row_shift_ptr + rows)
            d += tl.exp2((t * inv_temp - a[None, :] - b[:, None]) * 1.4426950408889634)
    return m, d


@triton.jit(do_not_specialize=['N'])
def _teacher_col_kernel(t_ptr, col_shift_ptr, row_shift_ptr, log_scale_ptr, out_m_ptr, out_d_ptr,
                        N, K, stride_t, inv_temp, MODE: tl.constexpr, FINALIZE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                        FAST: tl.constexpr = False):
    """One program: BLOCK_K prototypes × all N rows (no row split, so FINALIZE can write the new
    col_shift in place when there is nothing to all-reduce).
    MODE 0 (first pass; the per-prototype max is fused in): column LSE of y = t·inv_temp as
    (m, d), LSE = m + log d. MODE 1: s = Σ_b exp(y - col_shift[k] - row_shift[b]).
    FINALIZE: col_shift <- LSE (MODE 0) or col_shift + log(max(s, tiny)) (MODE 1), + log(K/N_tot)
    (read from log_scale_ptr: N_tot may be a device tensor). Else the raw (m, d) / s go to out_*.
    Rows are walked last to first: the row pass before this one ended on the last row blocks,
    so the first tiles read here may still sit in L2. FAST (K % BLOCK_K == 0): that first,
    possibly partial, row block is peeled off with masks and the full ones stream unmasked."""
    pid_k = tl.program_id(0)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    m = tl.full([BLOCK_N, BLOCK_K], -1.0e30, tl.float32)
    d = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if MODE == 1:  # (MODE 0 never reads col_shift: it may be uninitialised)
        a = tl.load(col_shift_ptr + cols, mask=cmask, other=0.0)
    else:
        a = tl.zeros([BLOCK_K], tl.float32)  # unread
    n_blocks = tl.cdiv(N, BLOCK_N)
    if FAST:
        if n_blocks > 0:
            rows = (n_blocks - 1) * BLOCK_N + tl.arange(0, BLOCK_N)
            m, d = _col_step(m, d, t_ptr, row_shift_ptr, a, rows, cols, N, stride_t, inv_temp,
                             MODE, True, cmask)
        for i in tl.range(1, n_blocks, num_stages=STAGES):
            rows = (n_blocks - 1 - i) * BLOCK_N + tl.arange(0, BLOCK_N)
            m, d = _col_step(m, d, t_ptr, row_shift_ptr, a, rows, cols, N, stride_t, inv_temp,
                             MODE, False, cmask)
    else:
        for i in tl.range(0, n_blocks, num_stages=STAGES):
            rows = (n_blocks - 1 - i) * BLOCK_N + tl.arange(0, BLOCK_N)
            m, d = _col_step(m, d, t_ptr, row_shift_ptr, a, rows, cols, N, stride_t, inv_temp,
                             MODE, True, cmask)
    if MODE == 0:
        m_c = tl.max(m, axis=0)
        d_c = tl.sum(d * tl.exp2((m - m_c[None, :]) * 1.4426950408889634), axis=0)
        if FINALIZE:
            res = m_c + tl.log(d_c) + tl.load(log_scale_ptr)
            tl.store(col_shift_ptr + cols, res, mask=cmask)
        else:
            tl.store(out_m_ptr + cols, m_c, mask=cmask)
            tl.store(out_d_ptr + cols, d_c, mask=cmask)
    else:
        s = tl.sum(d, axis=0)
        if FINALIZE:
            res = a + tl.log(tl.maximum(s, 1.1754943508222875e-38)) + tl.load(log_scale_ptr)
            tl.store(col_shift_ptr + cols, res, mask=cmask)
        else:
            tl.store(out_d_ptr + cols, s, mask=cmask)


# Row-pass kernels. Three ways to keep the per-row statistics (constexpr STATE), chosen per launch
# by a RowVariant (see ROW_VARIANTS below; the GPU A/B in bench/bench_sk_pass.py decides):
#   STATE_TILE  running max per row, updated once per tile (FlashAttention recurrence): per tile
#               one cross-thread max and one cross-thread sum per row
#   STATE_ELEM  elementwise running (m, d, s1) [BLOCK_N, BLOCK_K] (`_lse_update`), reduced across
#               threads once after the loop: no per-tile reduction, ~11 ALU operations per element
#   STATE_FIXED no running max at all: a per-row upper bound u[b] of y = t·inv_temp - col_shift,
#               known before the pass, is the shift (as the column passes use row_shift). Exact
#               from the second SK row pass on (see `sinkhorn_knopp`: u = previous row_shift -
#               log(K/N_total), every exp(y - u) <= 1 and their row sum >= 1/N_total, so nothing
#               overflows and the sum never underflows); the first pass and softmax centering have
#               no such bound and use the variant's `fallback`.
# FAST (constexpr): unmasked full tiles when K is a multiple of BLOCK_K (EVEN_K: the launcher only
# sets it then; out-of-range rows are clamped to row N-1, computed and never stored) and exp2 of
# one FMA per element, y·log2(e) - m·log2(e), with the row constant m·log2(e) rounded once and
# carried (m is stored as that rounded value / log2(e), so LSE = m + log d stays consistent).
# FAST = 0 is the row pass as it shipped before the variants (masks, (y - m)·log2(e)).
_STATE_TILE = 0
_STATE_ELEM = 1
_STATE_FIXED = 2


@triton.jit(do_not_specialize=['N', 'n_splits'])
def _teacher_row_kernel(t_ptr, col_shift_ptr, part_ptr, colsum_ptr, N, K, stride_t,
                        inv_temp, k_per_split, n_splits,
                        WITH_COLSUM: tl.constexpr, ENTROPY: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                        bound_ptr=None, log_scale_ptr=None, STATE: tl.constexpr = 0,
                        FAST: tl.constexpr = 0):
    """One program: BLOCK_N rows × one K slice (grid axis 0 = the slice, so consecutive programs
    share rows and the pass ends on the last row blocks). Over y = t·inv_temp - col_shift: shift m
    (STATE_FIXED: m = bound[b] - log_scale[0]), d = Σ exp(y - m) and (ENTROPY) s1 =
    Σ exp(y - m)·y, written as partials part [3, N, n_splits] for _row_merge_kernel (always a
    merge launch: at the issue's shapes the row pass is split anyway). WITH_COLSUM also
    atomically adds the column sums of t to colsum[K] (the softmax center's batch statistic,
    fused in this read; the order of the atomic adds is not fixed). FAST requires K % BLOCK_K ==
    0 (no column mask at all); STATE_ELEM / STATE_FIXED run only FAST (launcher: other K run the
    masked STATE_TILE)."""
    L2E: tl.constexpr = 1.4426950408889634
    tl.static_assert(FAST or STATE == 0)
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    if FAST:  # clamped rows: every load in bounds, no mask in the loop (rmask guards the stores)
        row_off = tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_t
    else:
        row_off = rows.to(tl.int64)[:, None] * stride_t
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if STATE == 1:  # elementwise, reduced after the loop
        m = tl.full([BLOCK_N, BLOCK_K], -1.0e30, tl.float32)
        d = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        s1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    elif STATE == 2:
        d = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
        s1 = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
    else:
        m = tl.full([BLOCK_N], -1.0e30, tl.float32)
        d = tl.zeros([BLOCK_N], tl.float32)
        s1 = tl.zeros([BLOCK_N], tl.float32)
    if STATE == 2:  # the shift, in log2 units, rounded once
        u = (tl.load(bound_ptr + rows, mask=rmask, other=0.0) - tl.load(log_scale_ptr)) * L2E
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        cols = k0 + tl.arange(0, BLOCK_K)
        if FAST:
            t = tl.load(t_ptr + row_off + cols[None, :]).to(tl.float32)
            a = tl.load(col_shift_ptr + cols)
        else:
            cmask = cols < K
            t = tl.load(t_ptr + row_off + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            a = tl.load(col_shift_ptr + cols, mask=cmask, other=0.0)
        if WITH_COLSUM:
            if FAST:
                tl.atomic_add(colsum_ptr + cols, tl.sum(tl.where(rmask[:, None], t, 0.0), axis=0))
            else:
                tl.atomic_add(colsum_ptr + cols, tl.sum(t, axis=0), mask=cmask)
        if FAST:
            y = t * inv_temp - a[None, :]
        else:
            # masked columns -> -inf (weight 0); masked rows stay finite (never stored)
            y = tl.where(cmask[None, :], t * inv_temp - a[None, :], float("-inf"))
        if STATE == 1:
            m, d, e_y = _lse_update_y(m, d, s1, y, ENTROPY)
            s1 = e_y
        elif STATE == 2:  # no max, no cross-thread reduction in the loop (as the column pass)
            e = tl.exp2(y * L2E - u[:, None])
            # each thread's 8 contiguous elements (one 16-byte bf16 vector) summed in registers:
            # [BLOCK_N, BLOCK_K // 8] accumulators, 1/8 of the registers of elementwise ones
            # (16 rows: 40 registers instead of 58) for the same number of additions
            d += tl.sum(tl.reshape(e, [BLOCK_N, BLOCK_K // 8, 8]), axis=2)
            if ENTROPY:
                s1 += tl.sum(tl.reshape(e * y, [BLOCK_N, BLOCK_K // 8, 8]), axis=2)
        elif FAST:
            m_new = tl.maximum(m, tl.max(y, axis=1) * L2E)  # log2 units
            alpha = tl.exp2(m - m_new)
            e = tl.exp2(y * L2E - m_new[:, None])
            d = d * alpha + tl.sum(e, axis=1)
            if ENTROPY:
                s1 = s1 * alpha + tl.sum(e * y, axis=1)
            m = m_new
        else:
            m_new = tl.maximum(m, tl.max(y, axis=1))
            alpha = tl.exp2((m - m_new) * L2E)
            # natural units scaled by log2(e) after the subtraction (y and m are ~100 and cancel)
            e = tl.exp2((y - m_new[:, None]) * L2E)
            d = d * alpha + tl.sum(e, axis=1)
            if ENTROPY:
                # e·y with e = 0 where y = -inf (p = 0 targets) must give 0, not nan
                s1 = s1 * alpha + tl.sum(e * tl.where(cmask[None, :], y, 0.0), axis=1)
            m = m_new
    if STATE == 1:  # one cross-thread reduction per row, after the loop
        m_r = tl.max(m, axis=1)
        w = tl.exp2((m - m_r[:, None]) * L2E)
        d_r = tl.sum(d * w, axis=1)
        s1 = tl.sum(s1 * w, axis=1)
        m = m_r
        d = d_r
    elif STATE == 2:
        d = tl.sum(d, axis=1)
        s1 = tl.sum(s1, axis=1)
        m = u / L2E  # natural units (the merge's): the shift exp2 subtracted, exactly
    elif FAST:
        # back to natural units (the merge's): the shift exp2 subtracted was m/log2(e) exactly
        # (a division, not a product with an fp32 ln 2: 1e-8 relative on |m| ~ 100 would count)
        m = m / L2E
    o = rows.to(tl.int64) * n_splits + pid_s
    plane = N * n_splits  # i32: N·n_splits < 2^31 (a [3, N, n_splits] fp32 buffer)
    tl.store(part_ptr + o, m, mask=rmask)
    tl.store(part_ptr + plane + o, d, mask=rmask)
    if ENTROPY:
        tl.store(part_ptr + 2 * plane + o, s1, mask=rmask)


@triton.jit
def _lse_update_y(m, d, s1, y, ENTROPY: tl.constexpr):
    """`_lse_update` with the entropy sum s1 = Σ exp(y - m)·y carried alongside (rescaled with
    d); y finite (the unmasked FAST path only)."""
    gt = y > m
    e = tl.exp2(tl.where(gt, m - y, y - m) * 1.4426950408889634)
    if ENTROPY:
        s1 = tl.where(gt, s1 * e + y, s1 + e * y)
    return tl.maximum(m, y), tl.where(gt, d * e + 1.0, d + e), s1


@triton.jit(do_not_specialize=['N', 'n_splits', 'n_groups'])
def _teacher_row_lockstep_kernel(t_ptr, col_shift_ptr, bound_ptr, log_scale_ptr, part_ptr,
                                 colsum_ptr, N, K, stride_t, inv_temp, n_splits, n_groups,
                                 WITH_COLSUM: tl.constexpr, ENTROPY: tl.constexpr,
                                 STATE: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """The row pass walked the column pass' way. One program: one K chunk of 2·BLOCK_K columns
    (grid axis 0, n_splits = K / (2·BLOCK_K) <= MAX_SPLITS; the launcher runs it only when K is
    a multiple: no column mask) × the row blocks g, g + n_groups, g + 2·n_groups, ... (grid
    axis 1 = g). The programs of a wave read neighbouring chunks of the same rows at the same
    time, so the memory in flight is a few whole rows (as in the column pass, 83 % of the copy
    bandwidth) instead of thousands of separate 512-byte row streams; the chunk's col_shift is
    loaded once, not once per tile. The chunk is two [BLOCK_N, BLOCK_K] sub-tiles (bf16 BLOCK_K
    = 256 at 8 warps: each warp owns whole rows, so the per-tile row reductions stay warp
    shuffles; one 512-wide tile spreads a row over 2 warps). Each row block's chunk is a whole
    statistic: per row one max (STATE_TILE; STATE_FIXED: the bound, no max) and one sum,
    stored in natural units as part [3, n_splits, N] (split-major: one contiguous store per row
    block). WITH_COLSUM: the chunk's column sums accumulate elementwise and go out with one
    atomic add per column per program."""
    L2E: tl.constexpr = 1.4426950408889634
    tl.static_assert(STATE != 1)  # no elementwise state: every tile is a whole statistic
    pid_s = tl.program_id(0)
    g = tl.program_id(1)
    cols0 = pid_s * (2 * BLOCK_K) + tl.arange(0, BLOCK_K)
    cols1 = cols0 + BLOCK_K
    a0 = tl.load(col_shift_ptr + cols0)
    a1 = tl.load(col_shift_ptr + cols1)
    lsc = 0.0
    if STATE == 2:
        lsc = tl.load(log_scale_ptr)
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    n_blocks = tl.cdiv(N, BLOCK_N)
    plane = N * n_splits  # i32: N·n_splits < 2^31 (a [3, n_splits, N] fp32 buffer)
    for i in tl.range(g, n_blocks, n_groups, num_stages=STAGES):
        rows = i * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        # clamped rows: loads in bounds with no row mask (rmask guards the stores)
        row_off = tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_t
        t0 = tl.load(t_ptr + row_off + cols0[None, :]).to(tl.float32)
        t1 = tl.load(t_ptr + row_off + cols1[None, :]).to(tl.float32)
        y0 = t0 * inv_temp - a0[None, :]
        y1 = t1 * inv_temp - a1[None, :]
        if WITH_COLSUM:
            acc0 += tl.where(rmask[:, None], t0, 0.0)
            acc1 += tl.where(rmask[:, None], t1, 0.0)
        if STATE == 2:
            m2 = (tl.load(bound_ptr + rows, mask=rmask, other=0.0) - lsc) * L2E
        else:
            m2 = tl.maximum(tl.max(y0, axis=1), tl.max(y1, axis=1)) * L2E
        e0 = tl.exp2(y0 * L2E - m2[:, None])
        e1 = tl.exp2(y1 * L2E - m2[:, None])
        o = pid_s * N + rows
        tl.store(part_ptr + o, m2 / L2E, mask=rmask)
        tl.store(part_ptr + plane + o, tl.sum(e0, axis=1) + tl.sum(e1, axis=1), mask=rmask)
        if ENTROPY:
            tl.store(part_ptr + 2 * plane + o, tl.sum(e0 * y0, axis=1) + tl.sum(e1 * y1, axis=1),
                     mask=rmask)
    if WITH_COLSUM:
        tl.atomic_add(colsum_ptr + cols0, tl.sum(acc0, axis=0))
        tl.atomic_add(colsum_ptr + cols1, tl.sum(acc1, axis=0))


@triton.jit(do_not_specialize=['N', 'n_splits', 'stride_r', 'stride_s'])
def _row_merge_kernel(part_ptr, out_ptr, N, n_splits, stride_r, stride_s, ENTROPY: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """LSE merge of the K-split partials (n_splits <= BLOCK_S), fixed order: out [2, N] =
    (row_shift in nats, entropy). part: 3 planes of N·n_splits, element (row r, split s) at
    r·stride_r + s·stride_s ([N, n_splits] from _teacher_row_kernel, [n_splits, N] from the
    lockstep kernel)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    splits = tl.arange(0, BLOCK_S)
    mask = (rows < N)[:, None] & (splits < n_splits)[None, :]
    offs = rows.to(tl.int64)[:, None] * stride_r + splits[None, :].to(tl.int64) * stride_s
    plane = N * n_splits  # i32: N·n_splits < 2^31 (a [3, N, n_splits] fp32 buffer)
    m = tl.load(part_ptr + offs, mask=mask, other=-1.0e30)
    m_r = tl.max(m, axis=1)
    w = tl.exp2((m - m_r[:, None]) * 1.4426950408889634)
    d_r = tl.sum(tl.load(part_ptr + plane + offs, mask=mask, other=0.0) * w, axis=1)
    lse = m_r + tl.log(d_r)
    tl.store(out_ptr + rows, lse, mask=rows < N)
    if ENTROPY:
        s1_r = tl.sum(tl.load(part_ptr + 2 * plane + offs, mask=mask, other=0.0) * w, axis=1)
        tl.store(out_ptr + N + rows, lse - s1_r / d_r, mask=rows < N)


@triton.jit(do_not_specialize=['K'])
def _row_redo_kernel(t_ptr, col_shift_ptr, bound_ptr, log_scale_ptr, out_ptr, K, stride_t,
                     inv_temp, REDO_BELOW: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row, after a fixed-shift pass whose bound may be loose (the first SK
    row pass): a row whose LSE came out more than -REDO_BELOW nats under its shift lost terms
    to the exp2 flush (below 2^-126) or underflowed to -inf, so it is recomputed exactly here
    (running max, one exp2 per element); every other row returns after two loads."""
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(out_ptr + row)
    shift = tl.load(bound_ptr + row) - tl.load(log_scale_ptr)
    if lse - shift < REDO_BELOW:  # also -inf (every term flushed: an empty sum)
        offs = tl.arange(0, BLOCK_K)
        m = tl.full([BLOCK_K], -1.0e30, tl.float32)
        d = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs
            cmask = cols < K
            t = tl.load(t_ptr + row * stride_t + cols, mask=cmask, other=0.0).to(tl.float32)
            a = tl.load(col_shift_ptr + cols, mask=cmask, other=0.0)
            m, d = _lse_update(m, d, tl.where(cmask, t * inv_temp - a, float("-inf")))
        m_r = tl.max(m, axis=0)
        d_r = tl.sum(d * tl.exp2((m - m_r) * 1.4426950408889634), axis=0)
        tl.store(out_ptr + row, m_r + tl.log(d_r))


# ------------------------------------------------------------------------------------------------
# Launch heuristics (fixed configs: autotune cannot run under the interpreter, and a fixed
# config is what compile_specs() can check for spills). See the header table for the numbers.
# ------------------------------------------------------------------------------------------------

_NUM_SMS = 132  # H100 / H200 SXM; only sets how finely rows / K are split, never correctness
_INTERP_TARGET = 8  # programs per split grid under the interpreter (tests raise it)
# (BLOCK_N, BLOCK_K) per logits dtype: 8 fp32 elements per thread at 8 warps (bf16 tiles twice
# as long), 3 tiles in flight per program through the STAGES pipeline (compile-report numbers
# in the header table)
_COL_BLOCK = {torch.bfloat16: (32, 128), torch.float32: (16, 128)}
_ROW_BLOCK = {torch.bfloat16: (8, 256), torch.float32: (8, 256)}  # 16 rows bf16: spills (3.9)
_STAGES = 4
_MERGE_BLOCK_R = 16
# _row_redo_kernel: redo a row whose LSE is more than 55 nats (2^-79) under its fixed shift.
# exp2 flushes terms under 2^-126 to 0; K <= 2^18 of them lose at most 2^-108, i.e. < 2^-29 of
# any sum >= 2^-79: rows above the threshold are exact to fp32 rounding.
REDO_BELOW = -55.0
_REDO_BLOCK_K = 1024
_REDO_WARPS = 4
_WARPS = 8
_MERGE_WARPS = 4


def _num_sms(x: torch.Tensor) -> int:
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return _NUM_SMS


def _target_programs(x: torch.Tensor) -> int:
    """Programs wanted in a split grid: ~8 per SM on a GPU (>= 2 resident waves, so the last
    wave's tail is a small fraction); a handful under the interpreter, which pays per program
    (still > 1 so that the split-and-merge paths are exercised)."""
    return _INTERP_TARGET if is_interpreter() else 8 * _num_sms(x)


def _col_config(t: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of the column pass; grid = cdiv(K, BLOCK_K) programs, each over all N
    rows (K = 65,536 -> 512 programs, 3.9 per SM)."""
    n, k = t.shape
    if is_interpreter():  # few, large programs: the interpreter pays per program
        return min(16, next_pow2(n)), min(2048, next_pow2(k))
    return _COL_BLOCK[t.dtype]


@dataclasses.dataclass(frozen=True)
class RowVariant:
    """One launch configuration of the row pass (the GPU A/B of bench/bench_sk_pass.py picks the
    default, DEFAULT_ROW_VARIANT). state: "tile" | "elem" | "fixed" (the STATE_* comment above
    the kernels); fast: the FAST path, which needs K % block_k == 0 (lockstep: 2·block_k), else
    the masked tile_8x256 runs (every DINOv3 K is a multiple);
    lockstep: _teacher_row_lockstep_kernel (chunk-major) instead of _teacher_row_kernel;
    one_wave: the grid (K splits × row blocks, or chunks × row groups) fills its waves of
    occupancy × SMs resident programs (`_full_waves`: usually one wave), so no partly filled
    last wave runs alone (the column pass' grid is one full wave: 512 programs at 4 per SM);
    the occupancy is read from the compiled kernel (registers, shared memory) after its first
    launch, `programs_per_sm` until then. Not one_wave: programs_per_sm × SMs programs
    or more (the rule the row pass shipped with: 1416 programs = 1.34 waves of 8 per SM at
    the iBOT shape). fallback: the variant run where this one cannot (fixed: no row bound
    given, i.e. the first SK row pass and softmax centering; lockstep: more than MAX_SPLITS
    chunks)."""

    name: str
    block_n: int
    block_k: int
    state: str = "tile"
    fast: bool = True
    lockstep: bool = False
    num_warps: int = 8
    stages: int = 4
    programs_per_sm: int = 4
    one_wave: bool = True
    fallback: str | None = None

    def __post_init__(self):
        if self.state not in ("tile", "elem", "fixed"):
            raise ValueError(f"RowVariant {self.name}: state {self.state!r}, allowed: tile, elem, "
                             "fixed")
        if self.lockstep and self.state == "elem":
            raise ValueError(f"RowVariant {self.name}: lockstep has no elem state (each tile is a "
                             "whole statistic)")
        if self.state == "fixed" and self.fallback is None:
            raise ValueError(f"RowVariant {self.name}: a fixed-shift variant needs a fallback for "
                             "passes without a row bound")


_ROW_STATE_ID = {"tile": _STATE_TILE, "elem": _STATE_ELEM, "fixed": _STATE_FIXED}
# programs_per_sm: the occupancy of the launch without entropy compiled for sm_90 by triton 3.6 (the
# GPU machine's; registers in the header table); the grid uses the measured one after the first
# launch. Instructions per element: SASS of the inner loop, sm_90, bf16, no entropy.
ROW_VARIANTS: dict[str, RowVariant] = {v.name: v for v in (
    # the row pass as shipped before the variants: H200 188 µs per pass (62 % of the copy);
    # 17.1 instructions per element (the MODE-1 column pass: 12.1, 83 %)
    RowVariant("tile_8x256", 8, 256, fast=False, programs_per_sm=8, one_wave=False),
    # hypotheses 3 + 4: no masks on full tiles, exp2 of one FMA per element (13.8 / element)
    RowVariant("tile_fast_8x256", 8, 256, programs_per_sm=8),
    # + 2 or 4 rows per thread: the pipeline bookkeeping, barrier and the 2 row reductions are
    # paid per 16 / 32 elements of a thread instead of per 8, and each col_shift value loaded
    # serves 16 / 32 rows instead of 8 (bf16 [BLOCK_N, 256] at 8 warps: each warp owns whole
    # rows, so the row reductions stay warp shuffles; 1024-wide tiles spread a row over 4 warps
    # and reduce through shared memory). 11.8 / 10.8 per element
    RowVariant("tile_fast_16x256", 16, 256, programs_per_sm=6),
    RowVariant("tile_fast_32x256", 32, 256, programs_per_sm=4),
    # hypothesis 1: elementwise running max, no per-tile cross-thread reduction (H200: the
    # masked version of this measured 177 µs). 16.5 per element
    RowVariant("elem_fast_8x256", 8, 256, state="elem", programs_per_sm=5),
    # no running max (as the column passes): shift = the exact bound from the previous pass,
    # sums reduced within each thread per tile (its 8 contiguous elements) and across threads
    # once after the loop. 8.1 / 7.0 per element
    RowVariant("fixed_16x256", 16, 256, state="fixed", programs_per_sm=6,
               fallback="tile_fast_16x256"),
    RowVariant("fixed_32x256", 32, 256, state="fixed", fallback="tile_fast_32x256"),
    # the default without the one-wave grid (the shipped rule: >= 8 programs per SM, here 2.2
    # waves of 4): isolates the grid's share
    RowVariant("fixed_16x256_many", 16, 256, state="fixed", programs_per_sm=8, one_wave=False,
               fallback="tile_fast_16x256"),
    # the column pass' walk: chunk-major, all programs of a wave on the same few rows. 11.2 / 9.8
    # per element (one max + one sum per row per 512 columns, and the stores of the partials)
    RowVariant("lockstep_tile_16x256", 16, 256, lockstep=True, fallback="tile_fast_16x256"),
    RowVariant("lockstep_fixed_16x256", 16, 256, state="fixed", lockstep=True,
               fallback="lockstep_tile_16x256"),
)}
# every fast variant needs K to be a multiple of its tile (every DINOv3 K is); other K run the
# shipped masked kernel
_MASKED_ROW_VARIANT = "tile_8x256"
DEFAULT_ROW_VARIANT = "fixed_32x256"  # the GPU A/B winner (header)


@dataclasses.dataclass(frozen=True)
class _RowPlan:
    variant: RowVariant  # the one that runs (after fallbacks)
    block_n: int
    block_k: int
    k_per_split: int  # lockstep: the chunk, 2·block_k
    n_splits: int
    n_groups: int  # lockstep: row groups (grid axis 1); else cdiv(N, block_n)
    fast: bool  # FAST (lockstep: always; its chunks are whole)


def row_variant(variant: str | RowVariant | None) -> RowVariant:
    """The RowVariant named (None: DEFAULT_ROW_VARIANT)."""
    if isinstance(variant, RowVariant):
        return variant
    name = DEFAULT_ROW_VARIANT if variant in (None, "") else variant
    if name not in ROW_VARIANTS:
        raise ValueError(f"unknown row-pass variant {name!r}: allowed are "
                         f"{', '.join(ROW_VARIANTS)}")
    return ROW_VARIANTS[name]


def _row_blocks(v: RowVariant, n: int, k: int) -> tuple[int, int]:
    if is_interpreter():  # no more rows than the matrix has (interpreter cost); a fast variant
        # keeps its own BLOCK_K (the GPU's tile, so a K it cannot tile runs the masked kernel)
        return min(v.block_n, next_pow2(n)), (v.block_k if v.fast else min(v.block_k,
                                                                            next_pow2(k)))
    return v.block_n, v.block_k


# programs per SM of a compiled row launch, keyed by _occupancy_key: filled after its first launch
_OCCUPANCY: dict[tuple, int] = {}


def _occupancy_key(v: RowVariant, t: torch.Tensor, flags: tuple[bool, bool]) -> tuple:
    return (v.name, t.dtype, flags, t.device.index if t.device.type == "cuda" else None)


def _programs_per_sm(compiled, num_warps: int, device: torch.device) -> int | None:
    """Resident programs per SM of a compiled kernel (its registers and shared memory against the
    device's), or None when the launch did not return one (interpreter)."""
    n_regs = getattr(compiled, "n_regs", None)
    shared = getattr(getattr(compiled, "metadata", None), "shared", None)
    if not n_regs or shared is None or device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return _occupancy(n_regs, shared, num_warps, getattr(props, "regs_per_multiprocessor", 65536),
                      getattr(props, "max_threads_per_multi_processor", 2048) // 32,
                      getattr(props, "shared_memory_per_multiprocessor", 233472))


def _occupancy(n_regs: int, shared: int, num_warps: int, regs_sm: int = 65536,
               warps_sm: int = 64, smem_sm: int = 233472) -> int:
    """Resident blocks per SM (CUDA occupancy rules of sm_80 / sm_90, at most 32 blocks)."""
    regs_warp = -(-n_regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = regs_sm // regs_warp // num_warps
    by_smem = smem_sm // (shared + 1024)  # 1 KB reserved per block (sm_80+)
    return max(1, min(by_regs, warps_sm // num_warps, by_smem, 32))


@functools.lru_cache(maxsize=256)
def _full_waves(unit: int, slots: int, most: int) -> int:
    """The multiplier s in [1, most] of a grid of unit·s programs: the smallest whose waves over
    `slots` resident programs are >= 85 % full on average (one wave of 472 on 528 slots is 89 %:
    every program streams from start to end; 1416 on 1056 is 67 %: the last wave runs a third
    full), else the fullest."""
    def fill(s: int) -> float:
        w = unit * s / slots
        return w / math.ceil(w)
    best = max(range(1, most + 1), key=lambda s: (fill(s), -s))
    return next((s for s in range(1, most + 1) if fill(s) >= 0.85), best)


def _row_plan(t: torch.Tensor, variant: str | RowVariant | None = None,
              has_bound: bool = False, flags: tuple[bool, bool] = (False, False)) -> _RowPlan:
    """Resolve fallbacks and size the grid: few rows (DINO: 2B) are split along K so the grid
    still fills the GPU; the splits are merged by _row_merge_kernel. flags: (WITH_COLSUM,
    ENTROPY), whose launches differ in registers (one_wave occupancy)."""
    n, k = t.shape
    v = row_variant(variant)
    for _ in range(len(ROW_VARIANTS)):
        block_n, block_k = _row_blocks(v, n, k)
        if v.fast and k % ((2 if v.lockstep else 1) * block_k) != 0:
            v = ROW_VARIANTS[_MASKED_ROW_VARIANT]  # no variant but the baseline has masks
        elif v.state == "fixed" and not has_bound:
            v = ROW_VARIANTS[v.fallback]
        elif v.lockstep and cdiv(k, 2 * block_k) > MAX_SPLITS:
            v = ROW_VARIANTS[v.fallback]
        elif (v.name != _MASKED_ROW_VARIANT and not is_interpreter()
              and cdiv(n, block_n) * min(cdiv(k, block_k), MAX_SPLITS) < 2 * _num_sms(t)):
            # too few rows to fill the GPU with this tile (7B DINO CLS: 32 rows, 16.8 MB,
            # L2-resident and launch-bound): the shipped 8-row kernel splits them finer
            v = ROW_VARIANTS[_MASKED_ROW_VARIANT]
        else:
            break
    n_blocks = max(1, cdiv(n, block_n))
    if is_interpreter():
        target, one_wave = _INTERP_TARGET, False
    else:
        occ = _OCCUPANCY.get(_occupancy_key(v, t, flags), v.programs_per_sm)
        target, one_wave = occ * _num_sms(t), v.one_wave
    if v.lockstep:  # chunks of 2 sub-tiles
        n_splits = cdiv(k, 2 * block_k)
        if one_wave:
            n_groups = _full_waves(n_splits, target, n_blocks)
        else:
            n_groups = max(1, min(n_blocks, cdiv(target, n_splits)))
        return _RowPlan(v, block_n, block_k, 2 * block_k, n_splits, n_groups, True)
    fast = v.fast
    k_blocks = cdiv(k, block_k)
    if one_wave:
        n_splits = _full_waves(n_blocks, target, min(k_blocks, MAX_SPLITS))
    else:
        n_splits = max(1, min(k_blocks, MAX_SPLITS, cdiv(target, n_blocks)))
    k_per_split = cdiv(k_blocks, n_splits) * block_k
    return _RowPlan(v, block_n, block_k, k_per_split, cdiv(k, k_per_split), n_blocks, fast)


def _row_config(t: torch.Tensor, variant: str | RowVariant | None = None
                ) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, k_per_split, n_splits) of the row pass' variant (default:
    DEFAULT_ROW_VARIANT, as run without a row bound)."""
    p = _row_plan(t, variant)
    return p.block_n, p.block_k, p.k_per_split, p.n_splits


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _check_teacher(t: torch.Tensor) -> None:
    if t.dim() != 2 or t.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError("teacher logits must be a 2-D [N, K] fp32 or bf16 tensor, got "
                         f"{tuple(t.shape)} {t.dtype}")


def teacher_col_pass(t: torch.Tensor, col_shift: torch.Tensor, row_shift: torch.Tensor,
                     log_scale: torch.Tensor, inv_temp: float, mode: int, finalize: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Column pass over this rank's rows. finalize: col_shift [K] fp32 is updated in place
    (MODE 0: overwritten with the column LSE + log_scale; MODE 1: += log Σ_b p + log_scale) and
    (None, None) is returned. Else col_shift is read only and the raw statistics [K] are
    returned: MODE 0 (max, Σ exp(y - max)) of y = t·inv_temp, MODE 1 (None, Σ_b exp(...)).
    row_shift [N] is read in MODE 1 only. log_scale: [1] fp32, log(K / N_total)."""
    _check_teacher(t)
    t = t.contiguous()
    n, k = t.shape
    block_n, block_k = _col_config(t)
    out_m = out_d = None
    if not finalize:
        stats = torch.empty(2 if mode == _MODE_LSE else 1, k, device=t.device,
                            dtype=torch.float32)
        out_m, out_d = (stats[0], stats[1]) if mode == _MODE_LSE else (None, stats[0])
    # unread pointer arguments get a real tensor (the launcher rejects a null data pointer)
    _teacher_col_kernel[(cdiv(k, block_k),)](
        t, col_shift, row_shift, log_scale, col_shift if out_m is None else out_m,
        col_shift if out_d is None else out_d, n, k, t.stride(0), float(inv_temp), MODE=mode,
        FINALIZE=finalize, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=_STAGES, num_warps=_WARPS,
        num_stages=_STAGES, FAST=k % block_k == 0)
    return out_m, out_d


def teacher_row_pass(t: torch.Tensor, col_shift: torch.Tensor, inv_temp: float, with_colsum: bool,
                     entropy: bool, variant: str | RowVariant | None = None,
                     row_bound: torch.Tensor | None = None,
                     log_scale: torch.Tensor | None = None, loose_bound: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per row b: LSE_k(t[b]·inv_temp - col_shift) [N] (nats) and, when `entropy`, the entropy
    (nats) [N] of the softmax it normalises (else None); plus the column sum of t [K] when
    `with_colsum` (else None). A (K-split) row launch and a merge launch.

    variant: a ROW_VARIANTS name or RowVariant (None: DEFAULT_ROW_VARIANT). row_bound [N] and
    log_scale [1] (fp32, given together): the fixed-shift variants shift row b by
    row_bound[b] - log_scale[0], which must bound max_k of y = t[b]·inv_temp - col_shift from above
    with Σ_k exp(y - bound) far from underflow: exactly what `sinkhorn_knopp` passes from the
    second row pass on (the previous row_shift and log(K/N_total)); other variants ignore it.
    loose_bound: the bound is exact but the sum may underflow (the first SK row pass, whose
    bound -log(K/N_total) assumes every row dominates some column): a fixed-shift pass is then
    followed by `_row_redo_kernel`, which recomputes exactly the rows that lost terms (none in
    practice, so one launch of N two-load programs). Not with `entropy` or `with_colsum`."""
    _check_teacher(t)
    if loose_bound and (entropy or with_colsum or row_bound is None):
        raise ValueError("loose_bound needs row_bound and log_scale and neither entropy nor "
                         f"with_colsum (got entropy={entropy}, with_colsum={with_colsum}, "
                         f"row_bound {'None' if row_bound is None else 'given'})")
    t = t.contiguous()
    n, k = t.shape
    if (row_bound is None) != (log_scale is None):
        raise ValueError("row_bound and log_scale go together: got row_bound "
                         f"{'None' if row_bound is None else tuple(row_bound.shape)}, log_scale "
                         f"{'None' if log_scale is None else tuple(log_scale.shape)}")
    if row_bound is not None and (row_bound.shape != (n,) or log_scale.numel() != 1):
        raise ValueError(f"row_bound must be [N] = [{n}] and log_scale [1], got "
                         f"{tuple(row_bound.shape)} and {tuple(log_scale.shape)}")
    plan = _row_plan(t, variant, row_bound is not None, (with_colsum, entropy))
    v = plan.variant
    f32 = dict(device=t.device, dtype=torch.float32)
    out = torch.empty(2 if entropy else 1, n, **f32)  # (row_shift, entropy)
    colsum = torch.zeros(k, **f32) if with_colsum else None
    if n == 0:  # nothing to normalise (and no empty grid to launch)
        return out[0], (out[1] if entropy else None), colsum
    part = torch.empty(3 if entropy else 2, n, plan.n_splits, **f32)
    state = _ROW_STATE_ID[v.state]
    # the fixed shift row_bound - log_scale is formed in the kernel (no extra launch: the DINO
    # CLS teacher is launch-bound)
    bound, lsc = (row_bound, log_scale) if state == _STATE_FIXED else (None, None)
    colsum_arg = out if colsum is None else colsum
    if v.lockstep:
        compiled = _teacher_row_lockstep_kernel[(plan.n_splits, plan.n_groups)](
            t, col_shift, col_shift if bound is None else bound,
            col_shift if lsc is None else lsc, part, colsum_arg, n, k,
            t.stride(0), float(inv_temp), plan.n_splits, plan.n_groups,
            WITH_COLSUM=with_colsum, ENTROPY=entropy, STATE=state, BLOCK_N=plan.block_n,
            BLOCK_K=plan.block_k, STAGES=v.stages, num_warps=v.num_warps, num_stages=v.stages)
        strides = (1, n)  # part [P, n_splits, N]: (row, split) strides
    else:
        compiled = _teacher_row_kernel[(plan.n_splits, plan.n_groups)](
            t, col_shift, part, colsum_arg, n, k, t.stride(0), float(inv_temp), plan.k_per_split,
            plan.n_splits, WITH_COLSUM=with_colsum, ENTROPY=entropy, BLOCK_N=plan.block_n,
            BLOCK_K=plan.block_k, STAGES=v.stages, bound_ptr=bound, log_scale_ptr=lsc, STATE=state,
            FAST=plan.fast, num_warps=v.num_warps, num_stages=v.stages)
        strides = (plan.n_splits, 1)  # part [P, N, n_splits]
    key = _occupancy_key(v, t, (with_colsum, entropy))
    if v.one_wave and key not in _OCCUPANCY:  # the next launches size their grid by it
        occ = _programs_per_sm(compiled, v.num_warps, t.device)
        if occ is not None:
            _OCCUPANCY[key] = occ
    _row_merge_kernel[(cdiv(n, _MERGE_BLOCK_R),)](
        part, out, n, plan.n_splits, *strides, ENTROPY=entropy, BLOCK_R=_MERGE_BLOCK_R,
        BLOCK_S=MAX_SPLITS, num_warps=_MERGE_WARPS)
    if loose_bound and state == _STATE_FIXED:
        _row_redo_kernel[(n,)](t, col_shift, bound, lsc, out, k, t.stride(0), float(inv_temp),
                               REDO_BELOW=REDO_BELOW, BLOCK_K=_REDO_BLOCK_K,
                               num_warps=_REDO_WARPS)
    return out[0], (out[1] if entropy else None), colsum


# ------------------------------------------------------------------------------------------------
# torch.library registration (fake impls give shapes, so torch.compile traces through). In eager
# mode the functional API calls the launchers directly: a custom-op dispatch costs ~7 µs of host
# time, and the DINO CLS teacher (L2-resident, ~10 launches) is host-bound.
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdino::teacher_col_pass", mutates_args=("col_shift",))
def _teacher_col_pass_op(t: torch.Tensor, col_shift: torch.Tensor, row_shift: torch.Tensor,
                         log_scale: torch.Tensor, inv_temp: float, col_mode: int,
                         finalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # (`col_mode`, not `mode`: the dispatcher's mode redirection owns a `mode` keyword)
    out = teacher_col_pass(t, col_shift, row_shift, log_scale, inv_temp, col_mode, finalize)
    return tuple(t.new_empty(0, dtype=torch.float32) if x is None else x.clone() for x in out)


@_teacher_col_pass_op.register_fake
def _(t, col_shift, row_shift, log_scale, inv_temp, col_mode, finalize):
    k = t.shape[1]
    f = dict(dtype=torch.float32)
    return (t.new_empty(k if (col_mode == _MODE_LSE and not finalize) else 0, **f),
            t.new_empty(0 if finalize else k, **f))


@torch.library.custom_op("fastdino::teacher_row_pass", mutates_args=())
def _teacher_row_pass_op(t: torch.Tensor, col_shift: torch.Tensor, inv_temp: float,
                         with_colsum: bool, entropy: bool, variant: str = "",
                         row_bound: torch.Tensor | None = None,
                         log_scale: torch.Tensor | None = None, loose_bound: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = teacher_row_pass(t, col_shift, inv_temp, with_colsum, entropy, variant or None,
                           row_bound, log_scale, loose_bound)
    # outputs of a custom op may not alias each other; None (not asked for) -> empty
    return tuple(t.new_empty(0, dtype=torch.float32) if x is None else x.clone() for x in out)


@_teacher_row_pass_op.register_fake
def _(t, col_shift, inv_temp, with_colsum, entropy, variant="", row_bound=None, log_scale=None,
      loose_bound=False):
    n, k = t.shape
    f = dict(dtype=torch.float32)
    return (t.new_empty(n, **f), t.new_empty(n if entropy else 0, **f),
            t.new_empty(k if with_colsum else 0, **f))


def _update_in_kernel(world: int) -> bool:
    """Whether the column passes update col_shift themselves (nothing to all-reduce). A function
    so that the tests can run the multi-rank host path on one process."""
    return world == 1


def _ops():
    """The registered ops while torch.compile traces, the plain launchers otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.fastdino.teacher_col_pass, torch.ops.fastdino.teacher_row_pass
    return teacher_col_pass, teacher_row_pass


# ------------------------------------------------------------------------------------------------
# Functional API (no autograd: the teacher side is under no_grad)
# ------------------------------------------------------------------------------------------------


# The first SK row pass runs the fixed shift with the loose bound -log(K/N_total) (and a redo
# launch for rows it could not resolve) only for teachers that stream from HBM: there it saves
# the running max' ALU work (~20 µs of ~160 at the ViT-L iBOT shape, H200); the DINO CLS teacher
# (16.8 MB, L2-resident, host-bound) would only pay the extra launch.
LOOSE_BOUND_MIN_BYTES = 64 * 2**20
_ZEROS: dict[torch.device, torch.Tensor] = {}


def _zeros(n: int, device: torch.device) -> torch.Tensor:
    """A read-only [n] fp32 zero vector (a view of one buffer per device, grown as needed): no
    memset launch per call."""
    buf = _ZEROS.get(device)
    if buf is None or buf.numel() < n:
        buf = _ZEROS[device] = torch.zeros(max(n, 1024), device=device, dtype=torch.float32)
    return buf[:n]


@functools.lru_cache(maxsize=64)
def _log_scale(value: float, device: torch.device) -> torch.Tensor:
    """log(K / N_total) as the [1] fp32 device tensor the column passes read, made once per value
    and device (read-only): one launch and a host op less per call of the DINO CLS teacher, whose
    ~10 launches are host-bound (bench/results/nvidia-h200-2026-11-26-check2/)."""
    return torch.full((1,), value, device=device, dtype=torch.float32)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                   n_total: int | float | torch.Tensor | None = None,
                   row_variant: str | None = None) -> TeacherTargets:
    """Sinkhorn-Knopp in 2·iters streaming reads of the teacher logits [N, K] (the per-prototype
    max is fused into the first column pass); returns the factorised targets (the logits are kept
    by reference, not copied). Collectives (world > 1): 1 K-vector all-reduce MAX + iters
    K-vector all-reduce SUMs, through fastdino.dist; with one rank each column pass updates
    col_shift in place and nothing is reduced on the host. row_variant: a ROW_VARIANTS name
    (None: DEFAULT_ROW_VARIANT). From the second row pass on, the previous row_shift minus
    log(K/N_total) bounds each row of y = t·inv_temp - col_shift from above, exactly: after the
    column update, exp(y - bound) = p[b, k] / Σ_b' p[b', k] <= 1 (p: the previous pass'
    probabilities, rows summing to 1), and its row sum >= 1/N_total; the fixed-shift variants
    use it as their shift (no running max). The first row pass has the bound -log(K/N_total)
    too (exp(y - bound) is then a softmax over the samples of column k, <= 1), but no lower
    bound on its row sums (a sample every column prefers others to): for teachers of
    LOOSE_BOUND_MIN_BYTES or more it runs the fixed shift with `loose_bound` (an exact redo of
    any row that lost terms), smaller ones run the variant's fallback."""
    _check_teacher(teacher_logits)
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    t = teacher_logits.contiguous()
    n, k = t.shape
    inv_temp = 1.0 / teacher_temp
    world = dist.get_world_size()
    dev = t.device
    if n_total is None:
        n_total = float(n * world)
    if not torch.is_tensor(n_total) and not n_total:
        n_total = 1.0  # no rows on any rank (no masked patches): log(K/N) is never read
    if torch.is_tensor(n_total):  # a 0-d device tensor (iBOT's all-reduced count): no host sync
        log_scale = torch.log(k / n_total.float().reshape(1))
    elif torch.compiler.is_compiling():
        log_scale = torch.full((1,), math.log(k / float(n_total)), device=dev, dtype=torch.float32)
    else:
        log_scale = _log_scale(math.log(k / float(n_total)), dev)
    col_pass, row_pass = _ops()
    finalize = _update_in_kernel(world)
    col_shift = torch.empty(k, device=dev, dtype=torch.float32)
    row_shift = log_scale  # not read by the first (MODE_LSE) pass: any real pointer that is
    # not col_shift (a mutated argument must not alias another one under torch.compile)
    entropy = None
    for it in range(n_iterations):
        mode = _MODE_LSE if it == 0 else _MODE_SUMEXP
        out_m, out_d = col_pass(t, col_shift, row_shift, log_scale, inv_temp, mode, finalize)
        if not finalize:  # the prototype statistics are sums over every rank's samples
            if mode == _MODE_LSE:  # exact overflow guard: global per-prototype max (§10.2)
                m_glob = dist.all_reduce_max(out_m.clone())
                s = dist.all_reduce_sum(out_d * torch.exp(out_m - m_glob))
                col_shift = m_glob + torch.log(s) + log_scale
            else:
                s = dist.all_reduce_sum(out_d)
                col_shift = col_shift + torch.log(s.clamp_min(_TINY)) + log_scale
        last = it == n_iterations - 1
        loose = it == 0 and not last and t.numel() * t.element_size() >= LOOSE_BOUND_MIN_BYTES
        if it > 0:
            bound = (row_shift, log_scale)
        elif loose:  # row_shift 0: the first row pass' bound is -log(K/N_total), exact but loose
            zeros = (t.new_zeros(n, dtype=torch.float32) if torch.compiler.is_compiling()
                     else _zeros(n, dev))
            bound = (zeros, log_scale)
        else:
            bound = (None, None)
        row_shift, entropy, _ = row_pass(t, col_shift, inv_temp, False, last, row_variant or "",
                                         *bound, loose)
    return TeacherTargets(logits=t, inv_temp=inv_temp, col_shift=col_shift, row_shift=row_shift,
                          row_entropy=entropy)


@torch.no_grad()
def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor,
                   teacher_temp: float, row_variant: str | None = None
                   ) -> tuple[TeacherTargets, torch.Tensor]:
    """softmax((t - c)/τ_t) as factorised targets, in one read of t that also yields this rank's
    column sum of t [K] fp32 (for the center's EMA; atomics: summation order not fixed)."""
    _check_teacher(teacher_logits)
    t = teacher_logits.contiguous()
    k = t.shape[1]
    if tuple(center.shape) not in ((k,), (1, k)):  # the kernel reads K entries, unchecked
        raise ValueError(f"softmax_center: center must be [{k}] or [1, {k}] (K of the teacher "
                         f"logits), got shape {tuple(center.shape)}")
    inv_temp = 1.0 / teacher_temp
    col_shift = center.reshape(-1).float() * inv_temp
    row_shift, entropy, col_sum = _ops()[1](t, col_shift, inv_temp, True, True,
                                             row_variant or "")
    targets = TeacherTargets(logits=t, inv_temp=inv_temp, col_shift=col_shift,
                             row_shift=row_shift, row_entropy=entropy)
    return targets, col_sum


# ------------------------------------------------------------------------------------------------
# Every jit kernel at its shipped launch configurations (tests/kernels/test_compile.py)
# ------------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}
# (WITH_COLSUM, ENTROPY) pairs the launchers use: SK inner passes, SK last pass, centering
_ROW_FLAGS = ((False, False), (False, True), (True, True))


def _div16(signature: dict[str, str]) -> tuple[str, ...]:
    """Arguments every training launch passes 16-aligned / divisible by 16 (the JIT specialises
    on it: vector loads and the cp.async pipeline): the pointers, K, stride_t and k_per_split (a
    multiple of BLOCK_K). Not N / n_splits / n_groups / strides of the merge (not specialised)."""
    return tuple(a for a in signature if a.endswith("_ptr") or a in ("K", "stride_t",
                                                                     "k_per_split"))


def _row_specs(v: RowVariant, torch_dt: torch.dtype, fast: bool) -> list[CompileSpec]:
    """The row launches of variant v at one dtype (FAST: its unmasked path); the fixed-shift
    state only where a bound exists (the SK passes after the first: never with the column
    sum)."""
    dt = _TRITON_DTYPE[torch_dt]
    state = _ROW_STATE_ID[v.state]
    specs = []
    for colsum, ent in _ROW_FLAGS:
        if state == _STATE_FIXED and colsum:
            continue
        name = (f"sk_teacher_row[{v.name},FAST={int(fast)},COLSUM={int(colsum)},ENT={int(ent)},"
                f"{dt}]")
        common = {"WITH_COLSUM": colsum, "ENTROPY": ent, "BLOCK_N": v.block_n,
                  "BLOCK_K": v.block_k, "STAGES": v.stages, "STATE": state}
        if v.lockstep:
            specs.append(CompileSpec(
                name=name, fn=_teacher_row_lockstep_kernel,
                signature={"t_ptr": f"*{dt}", "col_shift_ptr": "*fp32", "bound_ptr": "*fp32",
                           "log_scale_ptr": "*fp32", "part_ptr": "*fp32", "colsum_ptr": "*fp32",
                           "N": "i32", "K": "i32", "stride_t": "i32", "inv_temp": "fp32",
                           "n_splits": "i32", "n_groups": "i32"},
                constexprs=common,
                num_warps=v.num_warps, num_stages=v.stages))
            continue
        sig = {"t_ptr": f"*{dt}", "col_shift_ptr": "*fp32", "part_ptr": "*fp32",
               "colsum_ptr": "*fp32", "N": "i32", "K": "i32", "stride_t": "i32",
               "inv_temp": "fp32", "k_per_split": "i32", "n_splits": "i32"}
        consts = {**common, "FAST": fast}
        if state == _STATE_FIXED:
            sig.update(bound_ptr="*fp32", log_scale_ptr="*fp32")
        else:  # launched with None: specialised away, as the JIT does
            consts.update(bound_ptr=None, log_scale_ptr=None)
        specs.append(CompileSpec(name=name, fn=_teacher_row_kernel, signature=sig,
                                 constexprs=consts, num_warps=v.num_warps, num_stages=v.stages))
    return specs


def compile_specs() -> list[CompileSpec]:
    """Column and merge kernels at their configs; every row-pass variant (FAST, except the masked
    tile_8x256 that also runs every K the fast ones cannot)."""
    specs = []
    for torch_dt, dt in _TRITON_DTYPE.items():
        bn, bk = _COL_BLOCK[torch_dt]
        for mode in (_MODE_LSE, _MODE_SUMEXP):
            for fin in (False, True):
                for fast in (False, True):
                    specs.append(CompileSpec(
                        name=f"sk_teacher_col[MODE={mode},FIN={int(fin)},BLOCK={bn}x{bk},{dt}"
                             f"{',FAST' if fast else ''}]",
                        fn=_teacher_col_kernel,
                        signature={"t_ptr": f"*{dt}", "col_shift_ptr": "*fp32",
                                   "row_shift_ptr": "*fp32", "log_scale_ptr": "*fp32",
                                   "out_m_ptr": "*fp32", "out_d_ptr": "*fp32", "N": "i32",
                                   "K": "i32", "stride_t": "i32", "inv_temp": "fp32"},
                        constexprs={"MODE": mode, "FINALIZE": fin, "BLOCK_N": bn, "BLOCK_K": bk,
                                    "STAGES": _STAGES, "FAST": fast},
                        num_warps=_WARPS, num_stages=_STAGES))
        for v in ROW_VARIANTS.values():
            specs += _row_specs(v, torch_dt, v.fast)
        specs.append(CompileSpec(
            name=f"sk_row_redo[BLOCK_K={_REDO_BLOCK_K},{dt}]", fn=_row_redo_kernel,
            signature={"t_ptr": f"*{dt}", "col_shift_ptr": "*fp32", "bound_ptr": "*fp32",
                       "log_scale_ptr": "*fp32", "out_ptr": "*fp32", "K": "i32",
                       "stride_t": "i32", "inv_temp": "fp32"},
            constexprs={"REDO_BELOW": REDO_BELOW, "BLOCK_K": _REDO_BLOCK_K},
            num_warps=_REDO_WARPS))
    for ent in (False, True):
        specs.append(CompileSpec(
            name=f"sk_row_merge[ENT={int(ent)},BLOCK_R={_MERGE_BLOCK_R},BLOCK_S={MAX_SPLITS}]",
            fn=_row_merge_kernel,
            signature={"part_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "n_splits": "i32",
                       "stride_r": "i32", "stride_s": "i32"},
            constexprs={"ENTROPY": ent, "BLOCK_R": _MERGE_BLOCK_R, "BLOCK_S": MAX_SPLITS},
            num_warps=_MERGE_WARPS))
    return [dataclasses.replace(sp, divisible_by_16=_div16(sp.signature)) for sp in specs]
