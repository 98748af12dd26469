"""Fused axial RoPE of the DINOv3 attention: qkv projection output -> rotated q, k and v.

What it fuses: the chain between the qkv Linear and the attention core (reshape [B,N,3,H,d_h] ->
unbind -> transpose -> fp32 cast -> slice the patch tokens -> x*cos + rotate_half(x)*sin -> cat
the prefix back -> cast back) into one read of qkv and one write of q, k, v in the layout the
attention backend wants; the backward is the transposed rotation (the sine negated) writing
d(qkv) from dq, dk, dv in one pass.
Derived from: facebookresearch/dinov3 `dinov3/layers/attention.py`, `rope_position_encoding.py`
(SPEC.md §2.3) and fastdino/layers/rope_position_encoding.py; one-pass forward and "backward =
forward with the sine negated" as in Liger's `ops/rope.py` (KERNELS.md §6.2, no code copied).
Math (rotate-half pairing, x_i with x_{i+d_h/2}, per patch token p and head):
    y[:h] = x[:h] * cos[p, :h] - x[h:] * sin[p, :h]        h = d_h / 2
    y[h:] = x[h:] * cos[p, h:] + x[:h] * sin[p, h:]
    dx[:h] = dy[:h] * cos[p, :h] + dy[h:] * sin[p, h:]     (the transpose; for DINOv3's tables,
    dx[h:] = dy[h:] * cos[p, h:] - dy[:h] * sin[p, :h]      whose halves are equal, sine negated)
The first n_prefix = 1 + n_storage tokens (CLS, registers) and all of v pass through unchanged.
Shapes: qkv [B, N, 3*H*d_h] (last dim contiguous; the q | k | v thirds each [H, d_h], as the
official reshape); cos, sin [N - n_prefix, d_h] (the train-time RoPE rescale only changes these
tables, so it needs nothing here; tables are used in fp32). Output layouts:
    "bhnd": q, k, v each [B, H, N, d_h] (SDPA), written as one packed [3, B, H, N, d_h] tensor
    "bnhd": q, k, v each [B, N, H, d_h] (flash-attn; varlen after a reshape), packed
            [3, B, N, H, d_h]
Supports: fp32 and bf16 (computed in fp32, rounded once), d_h a multiple of 4 with d_h/2 a power
of two (16 .. 256), any B, N, H, n_prefix >= 0. No gradient to cos/sin (they carry no weights).
Tested: Triton 3.6 and 3.9 under the CPU interpreter; compiled for sm_90 / sm_80 (no spills); on
H200 (triton 3.6, torch 2.11, 2026-11-26): tests/kernels/test_rope.py and `bench rope --check`
(all 8 shapes), then the launch configs below checked again against rope_ref on the same shapes.
Limits: a standalone pass costs one read + one write of q, k, v; the bigger win (KERNELS.md §6.2)
is fusing the rotation into the qkv GEMM epilogue or the attention prologue, not done here. Host
cost: the custom op + RoPEFn take ~40 us of CPU per direction, the kernels 50-200 us of GPU at
ViT-S..7B shapes, so eager timings with a backward (bench "bwd", "fwd+bwd") are host-bound there.
"""

from __future__ import annotations

import torch
from fastdino.kernels._rounding import to_stored
from fastdino.kernels._triton import tl, triton
from fastdino.kernels._utils import (
    CompileSpec,
    arch_family,
    cdiv,
    eager_or_op,
    is_interpreter,
    next_pow2,
)

LAYOUTS = ("bhnd", "bnhd")
_DTYPES = (torch.float32, torch.bfloat16)


def _check_args(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                n_prefix: int, layout: str) -> tuple[int, int, int]:
    """(B, N, d_h) after checking every argument; errors name the bad input and what is allowed."""
    if layout not in LAYOUTS:
        raise ValueError(f"rope: layout={layout!r} is invalid: allowed is one of "
                         f"{', '.join(LAYOUTS)}")
    if qkv.dim() != 3:
        raise ValueError(f"rope: qkv must be [B, N, 3*H*d_h], got shape {tuple(qkv.shape)}")
    B, N, three_d = qkv.shape
    if num_heads < 1 or three_d % (3 * num_heads) != 0:
        raise ValueError(f"rope: qkv's last dim {three_d} must be 3 * num_heads * d_h with "
                         f"num_heads={num_heads}")
    d_h = three_d // (3 * num_heads)
    if d_h % 4 != 0:
        raise ValueError(f"rope: head dim d_h={d_h} must be divisible by 4 (axial RoPE)")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != d_h:
        raise ValueError(f"rope: cos and sin must both be [N_patch, d_h={d_h}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if n_prefix < 0 or n_prefix + cos.shape[0] != N:
        raise ValueError(f"rope: n_prefix ({n_prefix}) + rope rows ({cos.shape[0]}) must equal the "
                         f"token count N={N} of qkv")
    return B, N, d_h


def _packed_shape(B: int, N: int, H: int, d_h: int, layout: str) -> tuple[int, ...]:
    return (3, B, H, N, d_h) if layout == "bhnd" else (3, B, N, H, d_h)


def rope_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
             n_prefix: int, layout: str = "bhnd", packed: bool = False):
    """The reference (single source of truth): q, k, v from the qkv projection, q and k of the
    patch tokens rotated in fp32, everything cast back to qkv's dtype.

    qkv [B, N, 3*H*d_h], cos/sin [N - n_prefix, d_h] -> (q, k, v) each [B, H, N, d_h] ("bhnd") or
    [B, N, H, d_h] ("bnhd"), contiguous views of one packed [3, ...] tensor (returned itself when
    `packed`)."""
    B, N, d_h = _check_args(qkv, cos, sin, num_heads, n_prefix, layout)
    x = qkv.reshape(B, N, 3, num_heads, d_h).float()  # [B, N, 3, H, d_h]
    qk = x[:, n_prefix:, :2]  # [B, Np, 2, H, d_h] patch tokens of q and k
    c = cos.float()[None, :, None, None, :]  # [1, Np, 1, 1, d_h]
    s = sin.float()[None, :, None, None, :]
    x1, x2 = qk.chunk(2, dim=-1)
    rot = qk * c + torch.cat((-x2, x1), dim=-1) * s  # x*cos + rotate_half(x)*sin
    qk = torch.cat((x[:, :n_prefix, :2], rot), dim=1)  # [B, N, 2, H, d_h]
    out = torch.cat((qk, x[:, :, 2:]), dim=2).to(qkv.dtype)  # [B, N, 3, H, d_h]
    perm = (2, 0, 3, 1, 4) if layout == "bhnd" else (2, 0, 1, 3, 4)
    out = out.permute(*perm).contiguous()  # [3, B, H, N, d_h] or [3, B, N, H, d_h]
    return out if packed else tuple(out.unbind(0))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# Tiles are [BLOCK_T tokens, BLOCK_H heads, HALF]: one half of every head of a few tokens, so a
# program moves whole rows of qkv (all heads) with 16-byte vector accesses along d_h, and the rope
# table row of a token ([HALF] per half) is loaded once and broadcast over the heads.


@triton.jit
def _rope_tables(Cos_ptr, Sin_ptr, n, n_prefix, t_ok, HALF: tl.constexpr):
    """cos/sin halves of each token's table row, [BLOCK_T, 1, HALF] fp32, and the patch mask."""
    p = n - n_prefix  # patch index (< 0 for the prefix tokens)
    is_patch = (p >= 0) & t_ok
    i = tl.arange(0, HALF)
    tab = tl.where(is_patch, p, 0)[:, None, None] * (2 * HALF) + i[None, None, :]
    m = is_patch[:, None, None]
    c1 = tl.load(Cos_ptr + tab, mask=m, other=1.0)
    c2 = tl.load(Cos_ptr + tab + HALF, mask=m, other=1.0)
    s1 = tl.load(Sin_ptr + tab, mask=m, other=0.0)
    s2 = tl.load(Sin_ptr + tab + HALF, mask=m, other=0.0)
    return c1, c2, s1, s2, m


@triton.jit
def _rotate_part(dst, src, mask, c1, c2, s1, s2, keep, HALF: tl.constexpr):
    """dst[:h] = x1*c1 - x2*s1, dst[h:] = x2*c2 + x1*s2 in fp32 (x = src; dst, src: pointer
    tiles of the first half); `keep` rows copied unchanged."""
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = tl.where(keep, x1, x1 * c1 - x2 * s1)
    y2 = tl.where(keep, x2, x2 * c2 + x1 * s2)
    tl.store(dst, to_stored(y1, dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, to_stored(y2, dst.dtype.element_ty), mask=mask)


@triton.jit
def _copy_part(dst, src, mask, HALF: tl.constexpr):
    for j in tl.static_range(2):
        x = tl.load(src + j * HALF, mask=mask, other=0.0)
        tl.store(dst + j * HALF, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_fwd_kernel(
    Out_ptr,  # [3, ...] out, qkv's dtype: q, k, v packed in the layout given by the strides
    QKV_ptr,  # [B, N, 3*H*d_h] in, last dim contiguous
    Cos_ptr,  # [N - n_prefix, d_h] fp32 in, contiguous
    Sin_ptr,  # [N - n_prefix, d_h] fp32 in, contiguous
    num_tokens, N, n_prefix, H,  # num_tokens = B*N
    stride_qkv_b, stride_qkv_n,
    stride_o_part, stride_o_b, stride_o_n, stride_o_h,  # d_h is contiguous
    HALF: tl.constexpr,  # d_h / 2
    BLOCK_T: tl.constexpr,  # tokens per program (flat over B*N: no waste at crop ends)
    BLOCK_H: tl.constexpr,  # heads per program
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = t < num_tokens
    b = (t // N).to(tl.int64)
    n = t % N
    c1, c2, s1, s2, is_patch = _rope_tables(Cos_ptr, Sin_ptr, n, n_prefix, t_ok, HALF)
    keep = is_patch == 0
    i = tl.arange(0, HALF)[None, None, :]
    mask = t_ok[:, None, None] & (h < H)[None, :, None]
    n64 = n.to(tl.int64)
    # pointer tiles [BLOCK_T, BLOCK_H, HALF]: int64 per-token offsets + int32 offsets in a row
    src = QKV_ptr + (b * stride_qkv_b + n64 * stride_qkv_n)[:, None, None] \
        + (h * (2 * HALF))[None, :, None] + i  # q third
    dst = Out_ptr + (b * stride_o_b + n64 * stride_o_n)[:, None, None] \
        + (h * stride_o_h)[None, :, None] + i
    D = H * 2 * HALF
    _rotate_part(dst, src, mask, c1, c2, s1, s2, keep, HALF)  # q
    _rotate_part(dst + stride_o_part, src + D, mask, c1, c2, s1, s2, keep, HALF)  # k
    _copy_part(dst + 2 * stride_o_part, src + 2 * D, mask, HALF)  # v


@triton.jit
def _rope_bwd_kernel(
    DQKV_ptr,  # [B, N, 3*H*d_h] out, contiguous, qkv's dtype
    DQ_ptr,  # q's layout in: gradient of q (last dim contiguous, other strides below)
    DK_ptr,  # gradient of k
    DV_ptr,  # gradient of v
    Cos_ptr,  # [N - n_prefix, d_h] fp32 in
    Sin_ptr,  # [N - n_prefix, d_h] fp32 in
    num_tokens, N, n_prefix, H,
    stride_dq_b, stride_dq_n, stride_dq_h,
    stride_dk_b, stride_dk_n, stride_dk_h,
    stride_dv_b, stride_dv_n, stride_dv_h,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = t < num_tokens
    b = (t // N).to(tl.int64)
    n = t % N
    c1, c2, s1, s2, is_patch = _rope_tables(Cos_ptr, Sin_ptr, n, n_prefix, t_ok, HALF)
    keep = is_patch == 0
    i = tl.arange(0, HALF)[None, None, :]
    mask = t_ok[:, None, None] & (h < H)[None, :, None]
    D = H * 2 * HALF
    n64 = n.to(tl.int64)
    dst = DQKV_ptr + (t.to(tl.int64) * (3 * D))[:, None, None] \
        + (h * (2 * HALF))[None, :, None] + i  # the q third of d(qkv)
    dq = DQ_ptr + (b * stride_dq_b + n64 * stride_dq_n)[:, None, None] \
        + (h * stride_dq_h)[None, :, None] + i
    dk = DK_ptr + (b * stride_dk_b + n64 * stride_dk_n)[:, None, None] \
        + (h * stride_dk_h)[None, :, None] + i
    dv = DV_ptr + (b * stride_dv_b + n64 * stride_dv_n)[:, None, None] \
        + (h * stride_dv_h)[None, :, None] + i
    # the transpose of [[c1, -s1], [s2, c2]] is [[c1, s2], [-s1, c2]]: the forward rotation with
    # (s1, s2) -> (-s2, -s1), i.e. the sine negated (and its halves swapped, equal for DINOv3)
    _rotate_part(dst, dq, mask, c1, c2, -s2, -s1, keep, HALF)
    _rotate_part(dst + D, dk, mask, c1, c2, -s2, -s1, keep, HALF)
    _copy_part(dst + 2 * D, dv, mask, HALF)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _gpu_config(H: int, d_h: int, token_major: bool = False, fp32: bool = False,
                arch: int = 90) -> dict:
    """GPU launch config. A half tile holds 1024 values (8 fp32 values per thread and tensor on 4
    warps): 16 per thread took 160-200 registers on sm_90 (fewer resident programs, fewer loads in
    flight for this memory-bound pass), 8 take 64-140 (cuobjdump, triton 3.9). BLOCK_H is the
    largest power of two dividing H (no masked lanes: ViT-S has 6 heads, ViT-B 12), at most
    512 / d_h (wider head blocks at d_h 128 made ptxas use a small stack); BLOCK_T fills the tile.
    `token_major` (at most 2 heads, more tokens) is for reading tensors whose tokens are adjacent
    within a head ([B, H, N, d_h] memory): each program then reads runs of 1-2 KB per head instead
    of one head row per token. Measured on H200 (launchers alone, bf16, all 8 bench_rope shapes;
    copy roofline 4.24 TB/s): forward 2.9-3.5 TB/s, backward 3.0-3.6 TB/s from either gradient
    memory order. The previous rule (next_pow2(H) heads, masked lanes for ViT-S/B) was within
    +-6% everywhere except ViT-S global, where its backward reached only 1.5-2.2 TB/s.
    Compiled with the runtime's 16-divisibility (16-byte vector loads), ptxas spilled one 64-bit
    register (8 B of stack) in some 4-warp backward configs at 64 registers: bf16 on sm_80 under
    triton 3.6, fp32 on sm_80 under 3.9 (bench compile-report). So the measured sm_90 bf16 tiles
    keep 4 warps; sm_80 runs the same tile on 8 warps (40 registers, no stack, both tritons);
    fp32 (not a speed path) a half-height tile on 8 warps (32 registers)."""
    half = d_h // 2
    block_h = min(H & -H, 2 if token_major else max(1, 512 // d_h))
    block_t = max(1, 1024 // (block_h * half))
    if fp32:
        return dict(HALF=half, BLOCK_T=max(1, block_t // 2), BLOCK_H=block_h, num_warps=8)
    return dict(HALF=half, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4 if arch == 90 else 8)


def _config(H: int, d_h: int, num_tokens: int, token_major: bool = False,
            fp32: bool = False, arch: int = 90) -> dict:
    """Fixed heuristic (no autotune: it cannot run under the interpreter)."""
    cfg = _gpu_config(H, d_h, token_major, fp32, arch)
    if is_interpreter():  # the interpreter pays per op, not per element: few, big programs
        cfg["BLOCK_H"] = next_pow2(H) if H * d_h <= 1024 else cfg["BLOCK_H"]
        tile = cfg["BLOCK_H"] * cfg["HALF"]
        cfg["BLOCK_T"] = max(1, min(next_pow2(num_tokens), 16384 // tile))
    return cfg


def _check_kernel_inputs(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, d_h: int):
    if qkv.dtype not in _DTYPES or qkv.stride(-1) != 1:
        raise ValueError(f"rope kernel: qkv must be fp32/bf16 with a contiguous last dim, got "
                         f"{qkv.dtype}, strides {qkv.stride()}")
    if d_h // 2 != next_pow2(d_h // 2) or not 16 <= d_h <= 256:
        raise ValueError(f"rope kernel: d_h={d_h} must be 16..256 with d_h/2 a power of two "
                         "(use kernels.impl=torch for other head dims)")
    return cos.float().contiguous(), sin.float().contiguous()


def _strides_bnh(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(stride_b, stride_n, stride_h) of a [B, H, N, d_h] ("bhnd") or [B, N, H, d_h] tensor."""
    sb, s1, s2, _ = t.stride()
    return (sb, s2, s1) if layout == "bhnd" else (sb, s1, s2)


def rope_fwd(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
             n_prefix: int, layout: str = "bhnd") -> torch.Tensor:
    """qkv [B, N, 3*H*d_h] -> packed [3, B, H, N, d_h] ("bhnd") or [3, B, N, H, d_h] ("bnhd")."""
    B, N, d_h = _check_args(qkv, cos, sin, num_heads, n_prefix, layout)
    cos, sin = _check_kernel_inputs(qkv, cos, sin, d_h)
    out = torch.empty(_packed_shape(B, N, num_heads, d_h, layout), device=qkv.device,
                      dtype=qkv.dtype)
    if out.numel() == 0:
        return out
    cfg = _config(num_heads, d_h, B * N, fp32=qkv.dtype == torch.float32,
                  arch=arch_family(qkv.device))
    grid = (cdiv(B * N, cfg["BLOCK_T"]), cdiv(num_heads, cfg["BLOCK_H"]))
    _rope_fwd_kernel[grid](
        out, qkv, cos, sin, B * N, N, n_prefix, num_heads, qkv.stride(0), qkv.stride(1),
        out.stride(0), *_strides_bnh(out[0], layout), **cfg)
    return out


def rope_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, n_prefix: int, layout: str = "bhnd") -> torch.Tensor:
    """dq, dk, dv in the output layout -> d(qkv) [B, N, 3*H*d_h] (contiguous, dq's dtype)."""
    if layout not in LAYOUTS:
        raise ValueError(f"rope: layout={layout!r} is invalid: allowed is one of "
                         f"{', '.join(LAYOUTS)}")
    B, H, N, d_h = dq.shape if layout == "bhnd" else (dq.shape[0], dq.shape[2], dq.shape[1],
                                                       dq.shape[3])
    dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
    dqkv = torch.empty(B, N, 3 * H * d_h, device=dq.device, dtype=dq.dtype)
    cos, sin = _check_kernel_inputs(dqkv, cos, sin, d_h)
    if dqkv.numel() == 0:
        return dqkv
    # gradients in [B, H, N, d_h] memory (SDPA's math/efficient paths, the harness): token-major
    # tiles; in [B, N, H, d_h] memory (flash-attn, and SDPA's flash path, which returns
    # transposes): whole token rows, as the forward
    sb, sn, sh = _strides_bnh(dq, layout)
    cfg = _config(H, d_h, B * N, token_major=sn < sh, fp32=dq.dtype == torch.float32,
                  arch=arch_family(dq.device))
    grid = (cdiv(B * N, cfg["BLOCK_T"]), cdiv(H, cfg["BLOCK_H"]))
    _rope_bwd_kernel[grid](
        dqkv, dq, dk, dv, cos, sin, B * N, N, n_prefix, H,
        *_strides_bnh(dq, layout), *_strides_bnh(dk, layout), *_strides_bnh(dv, layout), **cfg)
    return dqkv


# ----------------------------------------------------------------------------------------------
# torch.library registration (so torch.compile traces through the kernels)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdino::rope_fwd", mutates_args=())
def _rope_fwd_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                 n_prefix: int, layout: str) -> torch.Tensor:
    return rope_fwd(qkv, cos, sin, num_heads, n_prefix, layout)


@_rope_fwd_op.register_fake
def _(qkv, cos, sin, num_heads, n_prefix, layout):
    B, N, d_h = _check_args(qkv, cos, sin, num_heads, n_prefix, layout)
    return qkv.new_empty(_packed_shape(B, N, num_heads, d_h, layout))


@torch.library.custom_op("fastdino::rope_bwd", mutates_args=())
def _rope_bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, n_prefix: int, layout: str) -> torch.Tensor:
    return rope_bwd(dq, dk, dv, cos, sin, n_prefix, layout)


@_rope_bwd_op.register_fake
def _(dq, dk, dv, cos, sin, n_prefix, layout):
    B, a, b, d_h = dq.shape
    H, N = (a, b) if layout == "bhnd" else (b, a)
    return dq.new_empty(B, N, 3 * H * d_h)


# ----------------------------------------------------------------------------------------------
# autograd and the functional API
# ----------------------------------------------------------------------------------------------


class RoPEFn(torch.autograd.Function):
    """qkv -> packed q, k, v (`packed`) or the three views; no gradient to cos / sin."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, num_heads, n_prefix, layout, packed):
        out = eager_or_op(_rope_fwd_op, rope_fwd)(qkv, cos, sin, num_heads, n_prefix, layout)
        ctx.save_for_backward(cos, sin)
        ctx.args = (n_prefix, layout, packed)
        return out if packed else out.unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        cos, sin = ctx.saved_tensors
        n_prefix, layout, packed = ctx.args
        dq, dk, dv = grads[0].unbind(0) if packed else grads
        dqkv = eager_or_op(_rope_bwd_op, rope_bwd)(dq, dk, dv, cos, sin, n_prefix, layout)
        return dqkv, None, None, None, None, None, None


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
             n_prefix: int, layout: str = "bhnd", packed: bool = False):
    """The Triton path of `rope_ref` (same arguments, same results): qkv [B, N, 3*H*d_h] ->
    (q, k, v) each [B, H, N, d_h] ("bhnd") or [B, N, H, d_h] ("bnhd"), or the packed [3, ...]."""
    _check_args(qkv, cos, sin, num_heads, n_prefix, layout)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rope_qkv: cos/sin require grad, but the kernel gives them no gradient "
                         "(RoPE has no weights); pass detached tables or use rope_ref")
    return RoPEFn.apply(qkv, cos, sin, num_heads, n_prefix, layout, packed)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/kernels/test_compile.py, bench compile-report)
# ----------------------------------------------------------------------------------------------

_TY = {torch.float32: "fp32", torch.bfloat16: "bf16"}
# (num_heads, d_h) of the shipped backbones: ViT-S/B/L (d_h 64) and 7B (d_h 128)
_SHIPPED_HEADS = ((6, 64), (12, 64), (16, 64), (32, 128))


def _aligned(sig: dict[str, str]) -> tuple[str, ...]:
    """What a real launch passes 16-divisible (triton specialises on it): every pointer (fresh
    allocations, or q/k/v planes of a packed buffer at offsets of B·N·H·d_h elements) and every
    stride (multiples of d_h = 64 for the shipped heads); not the token / prefix / head counts
    (201 tokens, 5 prefix tokens at 224 px)."""
    return tuple(n for n, ty in sig.items() if ty.startswith("*") or n.startswith("stride_"))


def compile_specs() -> list[CompileSpec]:
    """Both kernels at each launch configuration the GPU heuristic picks for the shipped models
    (the forward always takes whole token rows; the backward both tile orders)."""
    ints = {k: "i32" for k in ("num_tokens", "N", "n_prefix", "H")}
    specs, seen = [], set()
    for H, d_h in _SHIPPED_HEADS:
        for ty in _TY.values():
            fwd_sig = {"Out_ptr": f"*{ty}", "QKV_ptr": f"*{ty}", "Cos_ptr": "*fp32",
                       "Sin_ptr": "*fp32", **ints, "stride_qkv_b": "i32", "stride_qkv_n": "i32",
                       "stride_o_part": "i32", "stride_o_b": "i32", "stride_o_n": "i32",
                       "stride_o_h": "i32"}
            bwd_sig = {"DQKV_ptr": f"*{ty}", "DQ_ptr": f"*{ty}", "DK_ptr": f"*{ty}",
                       "DV_ptr": f"*{ty}", "Cos_ptr": "*fp32", "Sin_ptr": "*fp32", **ints,
                       **{f"stride_d{g}_{a}": "i32" for g in "qkv" for a in "bnh"}}
            kernels = [("fwd", _rope_fwd_kernel, fwd_sig, False),
                       ("bwd", _rope_bwd_kernel, bwd_sig, False),
                       ("bwd", _rope_bwd_kernel, bwd_sig, True)]
            for kind, fn, sig, token_major in kernels:
                by_cfg: dict[tuple, list[int]] = {}  # one spec per distinct config, its archs
                for arch in (90, 80):
                    cfg = _gpu_config(H, d_h, token_major, fp32=ty == "fp32", arch=arch)
                    by_cfg.setdefault(tuple(sorted(cfg.items())), []).append(arch)
                for key, archs in by_cfg.items():
                    cfg = dict(key)
                    warps = cfg.pop("num_warps")
                    tag = (f"d_h={d_h},BLOCK_T={cfg['BLOCK_T']},BLOCK_H={cfg['BLOCK_H']},{ty}"
                           f",warps={warps}")
                    if (kind, tag) in seen:
                        continue
                    seen.add((kind, tag))
                    specs.append(CompileSpec(f"rope_{kind}[{tag}]", fn, sig, cfg,
                                             num_warps=warps, num_stages=1,
                                             divisible_by_16=_aligned(sig), archs=tuple(archs)))
    return specs
