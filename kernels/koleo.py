"""KoLeo (Kozachenko-Leonenko) nearest-neighbour loss for batches of independent groups.

What it fuses: the ~20 small kernels of the reference (normalize, mm, diagonal fill, argmax,
gather, pairwise distance, log, mean and their backwards) into one forward launch and one backward
launch for all groups at once.
Derived from: facebookresearch/dinov3 `dinov3/loss/koleo_loss.py` (SPEC.md §1.5, KERNELS.md §4);
the running max/argmax over column tiles follows the tiled nearest-neighbour pattern of
denix56/pytorch_cluster (no code copied).
Shapes: G groups (crops x groups), n rows per group, D features. The loss is taken over the
"query" rows [q0, q0 + nq) of each group (all rows for KoLeoLoss, the local rank's rows for
KoLeoLossDistributed); the neighbour search runs over all n rows of the group.
Supports: fp32 and bf16 inputs, fp32 accumulation, any n >= 2 and D >= 1 (odd sizes masked).
Tested: Triton 3.6 and 3.9 under the CPU interpreter; compiled for sm_90 / sm_80 (no GPU run yet).
Limits: ties in the argmax (duplicate rows) may pick a different neighbour than torch (the loss is
then the same, the gradient goes to a different copy). fp32 inputs use IEEE fp32 dots (exact
parity, slow on tensor-core GPUs); bf16 inputs use bf16 tensor cores forward and TF32 for the
backward gather.

Forward, per (row block, group) program: 1) (no separate pass: every norm comes from step 2's
column tiles, so x̂_i and x̂_nn share one rounding); 2) for each column tile, tl.dot over D tiles
gives x_i·x_j, scaled by 1/‖x_j‖, diagonal and padding masked with -inf, running max/argmax per
row (never an n x n matrix); 3) one pass over D gives v_i = x̂_i - x̂_nn + eps, d_i = ‖v_i‖ and
the two projections t_i = <x̂_i, v_i>, u_i = <x̂_nn, v_i> the backward needs; 4) the row block's
partial sum of -log(d + eps); when a group spans several row blocks the last program to finish
(atomic counter) sums the partials in block order: deterministic.
Backward, per (row block j, D tile, group) program, each program owning its output rows:
    dx̂_j = s_j v_j - sum_{i: nn(i)=j} s_i v_i,   s_i = dL_g * (-1/nq) / ((d_i + eps) d_i)
    <x̂_j, dx̂_j> = s_j t_j - sum_{i: nn(i)=j} s_i u_i            (no reduction over D needed)
    dx_j = (dx̂_j - x̂_j <x̂_j, dx̂_j>) / max(‖x_j‖, eps)        (projection off when clamped)
The sum over choosers i is a masked [BLOCK_J, BLOCK_I] x [BLOCK_I, BLOCK_D] tl.dot over gathered
v_i tiles: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from fastdino.kernels._utils import CompileSpec, is_interpreter, next_pow2


def _check_query(n: int, query_start: int, query_len: int | None) -> int:
    if n < 2:
        raise ValueError(f"KoLeo needs at least 2 rows per group (a neighbour besides itself), "
                         f"got n={n}")
    nq = n - query_start if query_len is None else query_len
    if query_start < 0 or nq < 1 or query_start + nq > n:
        raise ValueError(f"KoLeo query rows [{query_start}, {query_start}+{nq}) must lie inside "
                         f"the group's {n} rows")
    return nq


def koleo_loss_ref(x: torch.Tensor, eps: float = 1e-8, query_start: int = 0,
                   query_len: int | None = None, fp32_log: bool = False,
                   return_details: bool = False):
    """The official KoLeo math, batched over groups, in the input dtype (the single source of
    truth).

    Naive math, per group and query row i:
        x̂ = x / max(‖x‖, eps)                      (F.normalize)
        nn(i) = argmax_{j != i} <x̂_i, x̂_j>         (no gradient through the index)
        d_i = ‖x̂_i - x̂_nn(i) + eps‖               (PairwiseDistance adds eps to the difference)
        L = -mean_i log(d_i + eps)
    x: [G, n, D] -> loss [G]; or [n, D] -> scalar. `fp32_log` casts d to fp32 before the log
    (KoLeoLossDistributed does). The diagonal is masked with -inf (the official code fills -1 or
    -inf depending on the version: identical unless every other cosine is exactly -1).
    return_details: also return (nn [G, nq] int64 group-local indices, d [G, nq]).
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"koleo_loss_ref: x must be [n, D] or [G, n, D], got shape "
                         f"{tuple(x.shape)}")
    G, n, D = x.shape
    nq = _check_query(n, query_start, query_len)
    xh = F.normalize(x, p=2, dim=-1, eps=eps)  # [G, n, D]
    xq = xh[:, query_start:query_start + nq]  # [G, nq, D]
    with torch.no_grad():
        dots = torch.bmm(xq, xh.transpose(1, 2))  # [G, nq, n]
        rows = torch.arange(nq, device=x.device)
        dots[:, rows, query_start + rows] = -torch.inf
        nn_idx = dots.argmax(dim=-1)  # [G, nq]
    nbr = torch.gather(xh, 1, nn_idx.unsqueeze(-1).expand(G, nq, D))  # [G, nq, D]
    d = F.pairwise_distance(xq, nbr, p=2, eps=eps)  # [G, nq]
    if fp32_log:
        d = d.float()
    loss = -torch.log(d + eps).mean(dim=-1)  # [G]
    if squeeze:
        loss, nn_idx, d = loss[0], nn_idx[0], d[0]
    return (loss, nn_idx, d) if return_details else loss


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _koleo_fwd_kernel(
    Loss_ptr,  # [G] fp32 out: mean of -log(d + eps) over the query rows
    Nn_ptr,  # [G, nq] int64 out: group-local index of each query row's neighbour
    Dist_ptr,  # [G, nq] fp32 out: d_i = ‖x̂_i - x̂_nn + eps‖
    T_ptr,  # [G, nq] fp32 out: <x̂_i, v_i>
    U_ptr,  # [G, nq] fp32 out: <x̂_nn(i), v_i>
    Rinv_ptr,  # [G, n] fp32 out: 1 / max(‖x_j‖, eps) of every row
    Partial_ptr,  # [G, num_blocks] fp32 scratch: per-row-block sums (unused when SINGLE)
    Count_ptr,  # [G] int32 scratch, zero on entry (unused when SINGLE)
    X_ptr,  # [G, n, D] in, fp32 or bf16, last dim contiguous
    stride_x_g, stride_x_row,
    n, D, q0, nq,
    eps,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # candidate columns per tile
    BLOCK_K: tl.constexpr,  # features per tile
    SINGLE: tl.constexpr,  # one row block per group: no counter, the program writes the mean
    UPCAST: tl.constexpr,  # upcast bf16 tiles before tl.dot (interpreter bug, 2026-05)
    IEEE: tl.constexpr,  # fp32 inputs: IEEE fp32 dot (TF32 would flip near-tied argmaxes)
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    num_blocks = tl.num_programs(0)
    x_g = X_ptr + g * stride_x_g
    rows = q0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # group-local row ids
    row_ok = rows < q0 + nq
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)

    # 2) running max / argmax of x_i·x_j / ‖x_j‖ over column tiles
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_j = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n0 in range(0, n, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < n
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        csq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            k_ok = (kk < D)[None, :]
            a = tl.load(x_g + rows[:, None] * stride_x_row + kk[None, :],
                        mask=row_ok[:, None] & k_ok, other=0.0)
            b = tl.load(x_g + cols[:, None] * stride_x_row + kk[None, :],
                        mask=col_ok[:, None] & k_ok, other=0.0)
            b32 = b.to(tl.float32)
            csq += tl.sum(b32 * b32, axis=1)
            if UPCAST:
                a = a.to(tl.float32)
                b = b32
            if IEEE:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        rinv_j = 1.0 / tl.maximum(tl.sqrt(csq), eps)
        # every program computes the same column norms bit for bit and writes them (identical
        # values: a benign race); step 3 reads them back, so x̂_i and x̂_nn use the same rounding
        # and duplicate rows give x̂_i - x̂_nn = 0 exactly, as F.normalize does
        tl.store(Rinv_ptr + g * n + cols, rinv_j, mask=col_ok)
        s = acc * rinv_j[None, :]
        s = tl.where(col_ok[None, :] & (cols[None, :] != rows[:, None]), s, float("-inf"))
        tile_max, tile_arg = tl.max(s, axis=1, return_indices=True)
        upd = tile_max > best  # strict: the first maximum wins, as torch.argmax on CPU
        best = tl.where(upd, tile_max, best)
        best_j = tl.where(upd, n0 + tile_arg, best_j)
    tl.debug_barrier()  # this program's Rinv stores are visible to all its threads

    # 3) v_i = x̂_i - x̂_nn + eps (eps on the difference, as PairwiseDistance), d_i, t_i, u_i
    rinv_i = tl.load(Rinv_ptr + g * n + rows, mask=row_ok, other=0.0)
    best_r = tl.load(Rinv_ptr + g * n + best_j, mask=row_ok, other=0.0)
    dsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    t = tl.zeros([BLOCK_M], dtype=tl.float32)
    u = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        m = row_ok[:, None] & (kk < D)[None, :]
        xi = tl.load(x_g + rows[:, None] * stride_x_row + kk[None, :], mask=m, other=0.0)
        xn = tl.load(x_g + best_j[:, None] * stride_x_row + kk[None, :], mask=m, other=0.0)
        xi = xi.to(tl.float32) * rinv_i[:, None]
        xn = xn.to(tl.float32) * best_r[:, None]
        v = tl.where(m, xi - xn + eps, 0.0)
        dsq += tl.sum(v * v, axis=1)
        t += tl.sum(xi * v, axis=1)
        u += tl.sum(xn * v, axis=1)
    d = tl.sqrt(dsq)
    q = g * nq + (rows - q0)
    tl.store(Nn_ptr + q, best_j.to(tl.int64), mask=row_ok)
    tl.store(Dist_ptr + q, d, mask=row_ok)
    tl.store(T_ptr + q, t, mask=row_ok)
    tl.store(U_ptr + q, u, mask=row_ok)

    # 4) mean over the query rows, summed in a fixed order
    partial = tl.sum(tl.where(row_ok, -tl.log(d + eps), 0.0), axis=0)
    if SINGLE:
        tl.store(Loss_ptr + g, partial / nq)
    else:
        tl.store(Partial_ptr + g * num_blocks + pid_m, partial)
        tl.debug_barrier()  # every thread's store precedes the (acq_rel) counter increment
        done = tl.atomic_add(Count_ptr + g, 1)
        if done == num_blocks - 1:  # last row block of this group: reduce in block order
            acc_p = tl.zeros([BLOCK_M], dtype=tl.float32)
            offs_b = tl.arange(0, BLOCK_M)
            for b0 in range(0, num_blocks, BLOCK_M):
                acc_p += tl.load(Partial_ptr + g * num_blocks + b0 + offs_b,
                                 mask=b0 + offs_b < num_blocks, other=0.0, volatile=True)
            tl.store(Loss_ptr + g, tl.sum(acc_p, axis=0) / nq)


@triton.jit
def _koleo_bwd_kernel(
    DX_ptr,  # [G, n, D] out, x's dtype
    DLoss_ptr,  # [G] fp32 in: upstream gradient of each group's loss
    X_ptr,  # [G, n, D] in
    Rinv_ptr,  # [G, n] fp32 in
    Nn_ptr,  # [G, nq] int64 in
    Dist_ptr,  # [G, nq] fp32 in
    T_ptr,  # [G, nq] fp32 in
    U_ptr,  # [G, nq] fp32 in
    stride_x_g, stride_x_row,
    n, D, q0, nq,
    eps,
    BLOCK_J: tl.constexpr,  # output rows per program
    BLOCK_I: tl.constexpr,  # query rows (potential choosers) per tile
    BLOCK_D: tl.constexpr,  # features per program
    IEEE: tl.constexpr,  # fp32 inputs: IEEE fp32 dot for the chooser sum (else TF32)
):
    pid_j = tl.program_id(0)
    pid_d = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    x_g = X_ptr + g * stride_x_g
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < n
    kk = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = kk < D
    m_j = j_ok[:, None] & k_ok[None, :]
    r_j = tl.load(Rinv_ptr + g * n + j, mask=j_ok, other=0.0)
    xh_j = tl.load(x_g + j[:, None] * stride_x_row + kk[None, :], mask=m_j, other=0.0)
    xh_j = xh_j.to(tl.float32) * r_j[:, None]
    gscale = tl.load(DLoss_ptr + g) * (-1.0 / nq)

    # sum over the query rows i that chose j as their neighbour:
    # acc = sum_i s_i v_i, pu = sum_i s_i u_i
    acc = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float32)
    pu = tl.zeros([BLOCK_J], dtype=tl.float32)
    offs_i = tl.arange(0, BLOCK_I)
    for i0 in range(0, nq, BLOCK_I):
        ii = i0 + offs_i
        i_ok = ii < nq
        nn_i = tl.load(Nn_ptr + g * nq + ii, mask=i_ok, other=-1).to(tl.int32)
        match = (nn_i[None, :] == j[:, None]) & i_ok[None, :]  # [BLOCK_J, BLOCK_I]
        if tl.sum(match.to(tl.int32), axis=None) > 0:  # most tiles have no chooser: skip them
            d_i = tl.load(Dist_ptr + g * nq + ii, mask=i_ok, other=1.0)
            u_i = tl.load(U_ptr + g * nq + ii, mask=i_ok, other=0.0)
            s_i = tl.where(i_ok & (d_i > 0), gscale / ((d_i + eps) * d_i), 0.0)
            w = tl.where(match, s_i[None, :], 0.0)
            nn_c = tl.where(i_ok, nn_i, 0)
            r_i = tl.load(Rinv_ptr + g * n + q0 + ii, mask=i_ok, other=0.0)
            r_n = tl.load(Rinv_ptr + g * n + nn_c, mask=i_ok, other=0.0)
            m_i = i_ok[:, None] & k_ok[None, :]
            xi = tl.load(x_g + (q0 + ii)[:, None] * stride_x_row + kk[None, :], mask=m_i, other=0.0)
            xn = tl.load(x_g + nn_c[:, None] * stride_x_row + kk[None, :], mask=m_i, other=0.0)
            v = tl.where(m_i, xi.to(tl.float32) * r_i[:, None] - xn.to(tl.float32) * r_n[:, None]
                         + eps, 0.0)  # [BLOCK_I, BLOCK_D]
            if IEEE:
                acc = tl.dot(w, v, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, v, acc)
            pu += tl.sum(w * u_i[None, :], axis=1)

    # j's own term when j is a query row
    is_q = j_ok & (j >= q0) & (j < q0 + nq)
    jq = g * nq + (j - q0)
    nn_j = tl.load(Nn_ptr + jq, mask=is_q, other=0).to(tl.int32)
    d_j = tl.load(Dist_ptr + jq, mask=is_q, other=1.0)
    t_j = tl.load(T_ptr + jq, mask=is_q, other=0.0)
    s_j = tl.where(is_q & (d_j > 0), gscale / ((d_j + eps) * d_j), 0.0)
    r_nj = tl.load(Rinv_ptr + g * n + nn_j, mask=is_q, other=0.0)
    m_q = is_q[:, None] & k_ok[None, :]
    xn_j = tl.load(x_g + nn_j[:, None] * stride_x_row + kk[None, :], mask=m_q, other=0.0)
    v_j = tl.where(m_q, xh_j - xn_j.to(tl.float32) * r_nj[:, None] + eps, 0.0)

    dxh = s_j[:, None] * v_j - acc
    proj = tl.where(r_j * eps < 1.0, s_j * t_j - pu, 0.0)  # ‖x‖ <= eps: normalize is linear
    dx = (dxh - xh_j * proj[:, None]) * r_j[:, None]
    tl.store(DX_ptr + g * stride_x_g + j[:, None] * stride_x_row + kk[None, :],
             dx.to(DX_ptr.dtype.element_ty), mask=m_j)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16)


def _clamp_pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(v)))


def _gpu_fwd_config(block_m: int, dtype: torch.dtype) -> dict:
    """Tile sizes checked spill-free for sm_90 and sm_80 (cuobjdump, triton 3.6 and 3.9): 32-wide
    K tiles and 8 warps for bf16 (64-wide K or 4 warps spill); the IEEE fp32 dot runs on FMA
    units and needs small tiles (32 x 16) and no software pipelining (triton 3.6 spills)."""
    if dtype == torch.bfloat16:  # 128-wide column tiles for the 4k group: 1.4x faster on H200
        return dict(BLOCK_M=block_m, BLOCK_N=128 if block_m == 64 else 64, BLOCK_K=32,
                    num_warps=8, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=16, num_warps=4 if block_m == 16 else 8,
                num_stages=1)


# the row-block sizes the GPU heuristic can pick, per dtype (fp32 stops at 32: 64 spills)
_GPU_BLOCK_M = {torch.bfloat16: (16, 32, 64), torch.float32: (16, 32)}


def _fwd_config(nq: int, n: int, D: int, dtype: torch.dtype) -> dict:
    """Fixed heuristic (autotune cannot run under the interpreter). Small groups: one row block
    per group (no counter). Larger ones: 32-row blocks up to 1024 query rows for more programs, 64
    above for bf16 (the gathered 4k batch, where tensor-core efficiency matters more)."""
    if is_interpreter():  # big tiles: the interpreter pays per op, not per element
        return dict(BLOCK_M=_clamp_pow2(nq, 16, 64), BLOCK_N=_clamp_pow2(n, 16, 64),
                    BLOCK_K=_clamp_pow2(D, 16, 128), num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return _gpu_fwd_config(16 if nq <= 16 else 32, dtype)
    block_m = _clamp_pow2(nq, 16, 64) if nq <= 64 else (32 if nq <= 1024 else 64)
    return _gpu_fwd_config(block_m, dtype)


# BLOCK_D 128 (vs 64): 1.7x faster at B=4096 on H200 (fewer programs re-scanning the nn indices);
# BLOCK_I 16: BLOCK_I 32 spills at BLOCK_D 128 under triton 3.6
_GPU_BWD = dict(BLOCK_J=32, BLOCK_I=16, BLOCK_D=128, num_warps=8, num_stages=2)


def _bwd_config(nq: int, n: int, D: int) -> dict:
    if is_interpreter():
        return dict(BLOCK_J=_clamp_pow2(n, 16, 64), BLOCK_I=_clamp_pow2(nq, 16, 64),
                    BLOCK_D=_clamp_pow2(D, 16, 128), num_warps=4, num_stages=1)
    return dict(_GPU_BWD)


# x_i·r_i - x_nn·r_nn must round both products before subtracting, as F.normalize then pdist do:
# with FP fusion the compiler emits fma(x_i, r_i, -(x_nn·r_nn)), which leaves the rounding error of
# one product (~1e-8) where the reference gets exactly 0 for duplicate rows (d = eps·sqrt(D)); seen
# on H200, triton 3.6, 2026-11. The dots run on tensor cores and are unaffected.
def _no_fma() -> dict:
    return {} if is_interpreter() else {"enable_fp_fusion": False}


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 3 or x.dtype not in _DTYPES or x.stride(-1) != 1:
        raise ValueError(f"koleo kernel: x must be a [G, n, D] fp32/bf16 tensor with contiguous "
                         f"last dim, got shape {tuple(x.shape)}, dtype {x.dtype}, "
                         f"strides {x.stride()}")


def koleo_fwd(x: torch.Tensor, eps: float, query_start: int, query_len: int):
    """x [G, n, D] -> (loss [G] fp32, nn [G, nq] int64, d, t, u [G, nq] fp32, rinv [G, n] fp32)."""
    _check_x(x)
    G, n, D = x.shape
    nq = _check_query(n, query_start, query_len)
    cfg = _fwd_config(nq, n, D, x.dtype)
    num_blocks = triton.cdiv(nq, cfg["BLOCK_M"])
    f32 = dict(device=x.device, dtype=torch.float32)
    loss = torch.empty(G, **f32)
    nn_idx = torch.empty(G, nq, device=x.device, dtype=torch.int64)
    d, t, u = (torch.empty(G, nq, **f32) for _ in range(3))
    rinv = torch.empty(G, n, **f32)
    single = num_blocks == 1
    partial = loss if single else torch.empty(G, num_blocks, **f32)
    count = loss if single else torch.zeros(G, device=x.device, dtype=torch.int32)
    _koleo_fwd_kernel[(num_blocks, G)](
        loss, nn_idx, d, t, u, rinv, partial, count, x, x.stride(0), x.stride(1),
        n, D, query_start, nq, eps,
        SINGLE=single, UPCAST=is_interpreter() and x.dtype == torch.bfloat16,
        IEEE=x.dtype == torch.float32, **_no_fma(), **cfg)
    return loss, nn_idx, d, t, u, rinv


def koleo_bwd(dloss: torch.Tensor, x: torch.Tensor, rinv: torch.Tensor, nn_idx: torch.Tensor,
              d: torch.Tensor, t: torch.Tensor, u: torch.Tensor, eps: float, query_start: int,
              query_len: int) -> torch.Tensor:
    """dloss [G] -> dx [G, n, D] in x's dtype."""
    G, n, D = x.shape
    cfg = _bwd_config(query_len, n, D)
    dx = torch.empty_like(x)
    grid = (triton.cdiv(n, cfg["BLOCK_J"]), triton.cdiv(D, cfg["BLOCK_D"]), G)
    _koleo_bwd_kernel[grid](
        dx, dloss.float().contiguous(), x, rinv, nn_idx, d, t, u, x.stride(0), x.stride(1),
        n, D, query_start, query_len, eps, IEEE=x.dtype == torch.float32, **_no_fma(), **cfg)
    return dx


# ----------------------------------------------------------------------------------------------
# torch.library registration (so torch.compile traces through the kernels)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdino::koleo_fwd", mutates_args=())
def _koleo_fwd_op(x: torch.Tensor, eps: float, query_start: int, query_len: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor]:
    return koleo_fwd(x, eps, query_start, query_len)


@_koleo_fwd_op.register_fake
def _(x, eps, query_start, query_len):
    G, n, _ = x.shape
    f32 = dict(device=x.device, dtype=torch.float32)
    return (x.new_empty(G, dtype=torch.float32),
            x.new_empty(G, query_len, dtype=torch.int64),
            *(torch.empty(G, query_len, **f32) for _ in range(3)),
            torch.empty(G, n, **f32))


@torch.library.custom_op("fastdino::koleo_bwd", mutates_args=())
def _koleo_bwd_op(dloss: torch.Tensor, x: torch.Tensor, rinv: torch.Tensor, nn_idx: torch.Tensor,
                  d: torch.Tensor, t: torch.Tensor, u: torch.Tensor, eps: float, query_start: int,
                  query_len: int) -> torch.Tensor:
    return koleo_bwd(dloss, x, rinv, nn_idx, d, t, u, eps, query_start, query_len)


@_koleo_bwd_op.register_fake
def _(dloss, x, rinv, nn_idx, d, t, u, eps, query_start, query_len):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------------------------
# autograd and the functional API
# ----------------------------------------------------------------------------------------------


class KoLeoFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps, query_start, query_len):
        loss, nn_idx, d, t, u, rinv = _koleo_fwd_op(x, eps, query_start, query_len)
        ctx.save_for_backward(x, rinv, nn_idx, d, t, u)
        ctx.args = (eps, query_start, query_len)
        ctx.mark_non_differentiable(nn_idx, d)
        return loss, nn_idx, d

    @staticmethod
    def backward(ctx, dloss, _dnn, _dd):
        x, rinv, nn_idx, d, t, u = ctx.saved_tensors
        return _koleo_bwd_op(dloss, x, rinv, nn_idx, d, t, u, *ctx.args), None, None, None


def koleo_loss(x: torch.Tensor, eps: float = 1e-8, query_start: int = 0,
               query_len: int | None = None, return_details: bool = False):
    """KoLeo with the Triton kernels; same arguments and results as `koleo_loss_ref`, except that
    the loss is fp32 whatever the input dtype, and d (in details) carries no gradient.
    x: [G, n, D] -> loss [G]; [n, D] -> scalar."""
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(0) if squeeze else x
    if x3.dim() != 3:
        raise ValueError(f"koleo_loss: x must be [n, D] or [G, n, D], got shape {tuple(x.shape)}")
    nq = _check_query(x3.shape[1], query_start, query_len)
    loss, nn_idx, d = KoLeoFn.apply(x3.contiguous(), eps, query_start, nq)
    if squeeze:
        loss, nn_idx, d = loss[0], nn_idx[0], d[0]
    return (loss, nn_idx, d) if return_details else loss


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/kernels/test_compile.py, bench compile-report)
# ----------------------------------------------------------------------------------------------

_TY = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def compile_specs() -> list[CompileSpec]:
    """Every jit kernel at each launch configuration the GPU heuristics above can pick."""
    specs = []
    for dtype, ty in _TY.items():
        ieee = dtype == torch.float32
        sig = {"Loss_ptr": "*fp32", "Nn_ptr": "*i64", "Dist_ptr": "*fp32", "T_ptr": "*fp32",
               "U_ptr": "*fp32", "Rinv_ptr": "*fp32", "Partial_ptr": "*fp32", "Count_ptr": "*i32",
               "X_ptr": f"*{ty}", "stride_x_g": "i32", "stride_x_row": "i32", "n": "i32",
               "D": "i32", "q0": "i32", "nq": "i32", "eps": "fp32"}
        for block_m in _GPU_BLOCK_M[dtype]:
            cfg = _gpu_fwd_config(block_m, dtype)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            for single in (True, False):
                specs.append(CompileSpec(
                    name=f"koleo_fwd[BLOCK_M={block_m},{ty},single={single}]",
                    fn=_koleo_fwd_kernel, signature=sig,
                    constexprs=dict(**cfg, SINGLE=single, UPCAST=False, IEEE=ieee),
                    num_warps=warps, num_stages=stages))
        bwd = dict(_GPU_BWD)
        warps, stages = bwd.pop("num_warps"), bwd.pop("num_stages")
        sig = {"DX_ptr": f"*{ty}", "DLoss_ptr": "*fp32", "X_ptr": f"*{ty}", "Rinv_ptr": "*fp32",
               "Nn_ptr": "*i64", "Dist_ptr": "*fp32", "T_ptr": "*fp32", "U_ptr": "*fp32",
               "stride_x_g": "i32", "stride_x_row": "i32", "n": "i32", "D": "i32", "q0": "i32",
               "nq": "i32", "eps": "fp32"}
        specs.append(CompileSpec(name=f"koleo_bwd[{ty}]", fn=_koleo_bwd_kernel, signature=sig,
                                 constexprs=dict(**bwd, IEEE=ieee), num_warps=warps,
                                 num_stages=stages))
    return specs
