"""k-means assignment: the nearest centroid of every point, without an N×k distance matrix.

    idx[i]   = argmin_j ‖x_i - c_j‖²          (first index on exact ties, as torch.argmin)
    dist2[i] = ‖x_i - c_idx[i]‖²  = ‖x_i‖² - 2 x_i·c_idx + ‖c_idx‖²   (clamped at 0)

What it fuses: the distance GEMM x·cᵀ, the ‖c‖² epilogue and the argmin over centroids. One
program owns a block of BLOCK_M rows, walks every centroid tile in order and keeps a running
(min, argmin) per row; the [BLOCK_M, BLOCK_N] tile of distances lives in registers only, so memory
is O(N + k) whatever k is (ssl-data-curation instead materialises chunk×k blocks, chunked to 1e8
elements; SPEC.md §5). ‖x‖² does not change the argmin, so it is added once at the end (one more
read of the row block).
Derived from: the assignment step of facebookresearch/ssl-data-curation `src/kmeans_gpu.py`
(`assign_clusters`, `compute_distance`); the running argmin over column tiles is the pattern of
kernels/koleo.py. No code copied.
Legend: N points, k centroids, D features. x [N, D], c [k, D] (same dtype), last dim contiguous.
Dtypes: bf16 / fp16 operands on tensor cores with fp32 accumulation (the embeddings are stored
fp16); fp32 operands with input_precision="ieee" (exact products, CUDA-core speed: TF32 would flip
near-tied assignments). Under the Triton interpreter half-precision tiles are upcast before tl.dot
(upstream bf16 interpreter bug, noted 2026-05; the products of half inputs are exact in fp32, so
the result is unchanged).
Gradient: dist2 is differentiable (the k-means objective, a.e.):
d dist2_i / d x_i = 2 (x_i - c_idx), d / d c_j = -Σ_{i: idx_i = j} 2 (x_i - c_j); computed in
PyTorch (O(N·D) gather / index_add).
Tested: triton 3.6 and 3.9 under the CPU interpreter; every shipped configuration compiles for
sm_90 / sm_80 without spills (`compile_specs()`); not yet timed on a GPU.
Limits: near-ties (two centroids within fp32 rounding of each other) may resolve to a different
index than the reference; the distance is then the same to rounding.

This file: `kmeans_assign_ref` -> `_kmeans_assign_kernel` -> `kmeans_assign_fwd` -> torch.library
op -> `KMeansAssignFn` -> `kmeans_assign`.
"""

from __future__ import annotations

import torch
from fastdino.kernels._triton import tl, triton
from fastdino.kernels._utils import CompileSpec, cdiv, eager_or_op, is_interpreter, next_pow2

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REF_BLOCK_ELEMS = 1 << 26  # reference: rows per chunk so that chunk × k <= 64M distances


def _check(x: torch.Tensor, c: torch.Tensor, who: str) -> None:
    if x.dim() != 2 or c.dim() != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"{who}: x must be [N, D] and c [k, D] with the same D, got x "
                         f"{tuple(x.shape)} and c {tuple(c.shape)}")
    if c.shape[0] < 1:
        raise ValueError(f"{who}: c needs at least one centroid, got shape {tuple(c.shape)}")
    if x.dtype != c.dtype or x.dtype not in _DTYPES:
        raise ValueError(f"{who}: x and c must share one dtype among fp32 / bf16 / fp16, got "
                         f"{x.dtype} and {c.dtype}")


def kmeans_assign_ref(x: torch.Tensor, c: torch.Tensor, block_elems: int = REF_BLOCK_ELEMS
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The truth: x [N, D], c [k, D] -> (idx [N] int64, dist2 [N] fp32).

    The product x·cᵀ runs in the input dtype (PyTorch's own precision at that dtype); norms and the
    distance ‖x‖² - 2 x·c + ‖c‖² in fp32. Rows are processed in chunks of `block_elems` / k so the
    reference, too, runs at curation sizes (each row is independent: chunking changes nothing).
    dist2 carries autograd through x and c.
    """
    _check(x, c, "kmeans_assign_ref")
    cn = c.float().square().sum(1)  # [k]
    rows = max(1, block_elems // c.shape[0])
    idx, dist2 = [], []
    for s in range(0, x.shape[0], rows):
        xs = x[s:s + rows]
        d = xs.float().square().sum(1, keepdim=True) - 2 * (xs @ c.T).float() + cn  # [n, k]
        m, i = d.min(dim=1)
        idx.append(i)
        dist2.append(m.clamp_min(0))
    if not idx:
        return (torch.empty(0, dtype=torch.int64, device=x.device),
                torch.empty(0, dtype=torch.float32, device=x.device))
    return torch.cat(idx), torch.cat(dist2)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _kmeans_assign_kernel(
    Idx_ptr,  # [N] int64 out: index of the nearest centroid
    Dist_ptr,  # [N] fp32 out: ‖x_i - c_idx‖², clamped at 0
    X_ptr,  # [N, D] in, fp32 / bf16 / fp16, last dim contiguous
    C_ptr,  # [K, D] in, x's dtype, last dim contiguous
    Cn_ptr,  # [K] fp32 in: ‖c_j‖²
    N, K, D,
    stride_x_row, stride_c_row,
    BLOCK_M: tl.constexpr,  # points per program
    BLOCK_N: tl.constexpr,  # centroids per tile
    BLOCK_K: tl.constexpr,  # features per step
    UPCAST: tl.constexpr,  # interpreter only: half tiles -> fp32 before tl.dot (bf16 bug)
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products (TF32 would flip near-ties)
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    rows = pid * BLOCK_M + offs_m
    row_ok = rows < N
    # int64 base pointer per block, int32 offsets inside it (N·D may exceed 2³¹; a tile cannot)
    x_blk = X_ptr + pid.to(tl.int64) * BLOCK_M * stride_x_row
    x_off = offs_m[:, None] * stride_x_row  # [BLOCK_M, 1]
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    c_off = offs_n[:, None] * stride_c_row  # [BLOCK_N, 1]
    c_blk = C_ptr  # advanced by one centroid tile per iteration (64-bit pointer arithmetic)

    # running min / argmin of ‖c_j‖² - 2 x_i·c_j over centroid tiles (never an N x k matrix)
    best = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    best_j = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n0 in range(0, K, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            k_ok = (kk < D)[None, :]
            a = tl.load(x_blk + x_off + kk[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
            b = tl.load(c_blk + c_off + kk[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        cn = tl.load(Cn_ptr + cols, mask=col_ok, other=0.0)
        s = tl.where(col_ok[None, :], cn[None, :] - 2.0 * acc, float("inf"))
        tile_min, tile_arg = tl.min(s, axis=1, return_indices=True)  # first index on ties
        upd = tile_min < best  # strict: an earlier tile wins ties, as torch.argmin
        best = tl.where(upd, tile_min, best)
        best_j = tl.where(upd, n0 + tile_arg, best_j)
        c_blk += BLOCK_N * stride_c_row

    # ‖x_i‖² (one more pass over the row block: O(N·D) against the O(N·k·D) above)
    xsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_blk + x_off + kk[None, :], mask=row_ok[:, None] & (kk < D)[None, :],
                    other=0.0)
        a = a.to(tl.float32)
        xsq += tl.sum(a * a, axis=1)
    tl.store(Idx_ptr + rows, best_j.to(tl.int64), mask=row_ok)
    tl.store(Dist_ptr + rows, tl.maximum(best + xsq, 0.0), mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _clamp_pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(v)))


def _gpu_config(dtype: torch.dtype) -> dict:
    """Tile sizes checked spill-free for sm_90 and sm_80 (compile_specs; cuobjdump, triton 3.6
    and 3.9). Half precision: 128 x 128 tiles of a tensor-core GEMM with a 32-wide D step and 8
    warps (a 64-wide step, 128 x 64 tiles with 4 warps or 64 x 128 tiles spill: the running argmin
    and the masked loads compete with the accumulator for registers). fp32: the IEEE dot runs on
    FMA units and needs small tiles without software pipelining."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)


def _config(N: int, K: int, D: int, dtype: torch.dtype) -> dict:
    """Fixed heuristic (autotune cannot run under the interpreter)."""
    if is_interpreter():  # big tiles: the interpreter pays per op, not per element
        return dict(BLOCK_M=_clamp_pow2(N, 16, 64), BLOCK_N=_clamp_pow2(K, 16, 64),
                    BLOCK_K=_clamp_pow2(D, 16, 128), num_warps=4, num_stages=1)
    return _gpu_config(dtype)


def kmeans_assign_fwd(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], c [k, D] (same dtype, last dim contiguous) -> (idx [N] int64, dist2 [N] fp32)."""
    _check(x, c, "kmeans_assign")
    if x.stride(-1) != 1 or c.stride(-1) != 1:
        raise ValueError(f"kmeans_assign: x and c need a contiguous last dim, got strides "
                         f"{x.stride()} and {c.stride()}")
    N, D = x.shape
    K = c.shape[0]
    idx = torch.empty(N, device=x.device, dtype=torch.int64)
    dist2 = torch.empty(N, device=x.device, dtype=torch.float32)
    if N == 0:
        return idx, dist2
    cn = c.float().square().sum(1).contiguous()  # [k] fp32, O(k·D)
    cfg = _config(N, K, D, x.dtype)
    grid = (cdiv(N, cfg["BLOCK_M"]),)
    _kmeans_assign_kernel[grid](
        idx, dist2, x, c, cn, N, K, D, x.stride(0), c.stride(0),
        UPCAST=is_interpreter() and x.dtype != torch.float32, IEEE=x.dtype == torch.float32,
        **cfg)
    return idx, dist2


# ----------------------------------------------------------------------------------------------
# torch.library registration (so torch.compile traces through the kernel)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdino::kmeans_assign", mutates_args=())
def _kmeans_assign_op(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return kmeans_assign_fwd(x, c)


@_kmeans_assign_op.register_fake
def _(x, c):
    N = x.shape[0]
    return x.new_empty(N, dtype=torch.int64), x.new_empty(N, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# autograd and the functional API
# ----------------------------------------------------------------------------------------------


class KMeansAssignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c):
        idx, dist2 = eager_or_op(_kmeans_assign_op, kmeans_assign_fwd)(x, c)
        ctx.save_for_backward(x, c, idx)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # no zero-filled [N] int64 gradient for idx
        return idx, dist2

    @staticmethod
    def backward(ctx, _didx, ddist2):  # ddist2 is never None: idx carries no gradient
        x, c, idx = ctx.saved_tensors
        r = 2 * ddist2[:, None] * (x.float() - c.float()[idx])  # [N, D] fp32: d dist2 / d x
        dc = torch.zeros(c.shape, device=c.device, dtype=torch.float32).index_add_(0, idx, -r)
        return r.to(x.dtype), dc.to(c.dtype)


def kmeans_assign(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid with the Triton kernel; same arguments and results as
    `kmeans_assign_ref`: x [N, D], c [k, D] -> (idx [N] int64, dist2 [N] fp32, differentiable)."""
    _check(x, c, "kmeans_assign")
    return KMeansAssignFn.apply(x.contiguous(), c.contiguous())


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/kernels/test_compile.py, bench compile-report)
# ----------------------------------------------------------------------------------------------

_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_specs() -> list[CompileSpec]:
    """The kernel at the launch configuration `_gpu_config` picks for each dtype."""
    specs = []
    for dtype, ty in _TY.items():
        sig = {"Idx_ptr": "*i64", "Dist_ptr": "*fp32", "X_ptr": f"*{ty}", "C_ptr": f"*{ty}",
               "Cn_ptr": "*fp32", "N": "i32", "K": "i32", "D": "i32", "stride_x_row": "i32",
               "stride_c_row": "i32"}
        cfg = _gpu_config(dtype)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        specs.append(CompileSpec(
            name=f"kmeans_assign[{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']},{ty}]",
            fn=_kmeans_assign_kernel, signature=sig,
            constexprs=dict(**cfg, UPCAST=False, IEEE=dtype == torch.float32),
            num_warps=warps, num_stages=stages,
            # what real launches pass 16-divisible (triton specialises on it): pointers (fresh
            # tensors or row chunks of embeddings), D and the row strides (embedding widths
            # 384..4096); not the point / centroid counts
            divisible_by_16=("Idx_ptr", "Dist_ptr", "X_ptr", "C_ptr", "Cn_ptr", "D",
                             "stride_x_row", "stride_c_row")))
    return specs
