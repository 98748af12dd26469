"""Fused SwiGLU gate of the DINOv3 FFN: silu(x1) * x2.

What it fuses: the elementwise middle of `SwiGLUFFN` (fastdino/layers/ffn_layers.py, SPEC.md §2.2)
    hidden = silu(w1(x)) * w2(x)
into one read of x1, x2 and one write of the hidden tensor (eager: silu then mul, 5 passes over
[T, H]); the backward recomputes silu from x1 (nothing extra saved) and writes dx1, dx2 in one
pass (eager: 3 kernels, ~9 passes).
Derived from: Liger's `ops/swiglu.py` (fp32 registers, silu recomputed in the backward,
KERNELS.md §6.4), no code copied. DINOv3 (unlike DINOv2's packed `w12`) has two separate
Linears w1, w2, so the kernel reads x1 and x2 wherever they are: each with its own row stride and
a contiguous last dim, so the two halves of a packed [T, 2H] projection also work without a
chunk/contiguous copy.
Math (s = sigmoid(x1), computed in fp32, rounded once):
    out = x1 * s * x2
    dx1 = dout * x2 * s * (1 + x1 * (1 - s)),   dx2 = dout * x1 * s
Shapes: x1, x2 [..., H] (flattened to T rows), out [..., H] contiguous. Dtypes: fp32 or bf16
(x1 and x2 the same); out and the gradients in that dtype.
Tested: Triton 3.6 and 3.9 under the CPU interpreter; compiled for sm_90 / sm_80 (no spills).
Not yet timed on a GPU (2026-11-26): kernels.fuse_pointwise stays off until
`python -m bench swiglu` shows a win. The real win (KERNELS.md §6.4) is the gate in the w1/w2
GEMM epilogue (QuACK `gemm_gated`), not done here; under torch.compile Inductor already fuses this
pointwise chain, so the kernel has to beat that, not eager.
"""

from __future__ import annotations

import torch
from fastdino.kernels._rounding import to_stored
from fastdino.kernels._triton import tl, triton
from fastdino.kernels._utils import CompileSpec, cdiv, eager_or_op, is_interpreter, next_pow2

_DTYPES = (torch.float32, torch.bfloat16)


def _check_args(x1: torch.Tensor, x2: torch.Tensor) -> int:
    """H after checking; errors name the bad input and what is allowed."""
    if x1.shape != x2.shape or x1.dim() < 1:
        raise ValueError(f"swiglu: x1 and x2 must have the same shape [..., H], got "
                         f"{tuple(x1.shape)} and {tuple(x2.shape)}")
    if x1.dtype != x2.dtype:
        raise ValueError(f"swiglu: x1 and x2 must have the same dtype, got {x1.dtype} and "
                         f"{x2.dtype}")
    return x1.shape[-1]


def swiglu_ref(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The reference (single source of truth): silu(x1) * x2 computed in fp32, rounded once to
    the inputs' dtype. x1, x2 [..., H] -> [..., H]."""
    _check_args(x1, x2)
    return (torch.nn.functional.silu(x1.float()) * x2.float()).to(x1.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# Tiles are [BLOCK_M rows, BLOCK_N channels]; row strides are arguments, channels contiguous.


@triton.jit
def _swiglu_fwd_kernel(
    Out_ptr,  # [T, H] out, contiguous
    X1_ptr,  # [T, H] in: w1(x), rows strided
    X2_ptr,  # [T, H] in: w2(x)
    T, H,
    stride_x1, stride_x2,  # row strides (the output's is H)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < T)[:, None] & (cols < H)[None, :]
    r = rows.to(tl.int64)[:, None]
    c = cols[None, :]
    a = tl.load(X1_ptr + r * stride_x1 + c, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X2_ptr + r * stride_x2 + c, mask=mask, other=0.0).to(tl.float32)
    out = a * tl.sigmoid(a) * b
    tl.store(Out_ptr + r * H + c, to_stored(out, Out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DX1_ptr,  # [T, H] out, contiguous
    DX2_ptr,  # [T, H] out, contiguous
    DOut_ptr,  # [T, H] in, rows strided
    X1_ptr,  # [T, H] in
    X2_ptr,  # [T, H] in
    T, H,
    stride_do, stride_x1, stride_x2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < T)[:, None] & (cols < H)[None, :]
    r = rows.to(tl.int64)[:, None]
    c = cols[None, :]
    dout = tl.load(DOut_ptr + r * stride_do + c, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(X1_ptr + r * stride_x1 + c, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X2_ptr + r * stride_x2 + c, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    dx1 = dout * b * s * (1.0 + a * (1.0 - s))
    tl.store(DX1_ptr + r * H + c, to_stored(dx1, DX1_ptr.dtype.element_ty), mask=mask)
    tl.store(DX2_ptr + r * H + c, to_stored(dout * silu, DX2_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _gpu_config(H: int) -> dict:
    """GPU launch config: 2048-value tiles on 4 warps (16 values per thread and tensor: two
    16-byte bf16 vectors), up to 1024 channels wide so a row block reads long runs; DINOv3's
    hidden widths (1536, 5120, 8192) are multiples of 512, so no lanes are masked."""
    block_n = min(1024, next_pow2(H))
    return dict(BLOCK_M=max(1, 2048 // block_n), BLOCK_N=block_n, num_warps=4, num_stages=1)


def _config(H: int, T: int) -> dict:
    """Fixed heuristic (no autotune: it cannot run under the interpreter)."""
    cfg = _gpu_config(H)
    if is_interpreter():  # the interpreter pays per op, not per element: few, big programs
        cfg["BLOCK_N"] = next_pow2(H)
        cfg["BLOCK_M"] = max(1, min(next_pow2(T), 16384 // cfg["BLOCK_N"]))
    return cfg


def _rows(t: torch.Tensor, H: int) -> torch.Tensor:
    """[..., H] -> [T, H] with a contiguous last dim (a view when possible: a row-strided slice
    of a packed [T, 2H] projection stays a view)."""
    t = t.reshape(-1, H) if t.dim() != 2 else t
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise ValueError(f"swiglu kernel: tensors must be fp32 or bf16, got {t.dtype}")


def swiglu_fwd(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """x1, x2 [..., H] -> silu(x1) * x2 as a contiguous [T, H]."""
    H = _check_args(x1, x2)
    _check_dtype(x1)
    a, b = _rows(x1, H), _rows(x2, H)
    T = a.shape[0]
    out = torch.empty(T, H, device=x1.device, dtype=x1.dtype)
    if out.numel() == 0:
        return out
    cfg = _config(H, T)
    grid = (cdiv(T, cfg["BLOCK_M"]), cdiv(H, cfg["BLOCK_N"]))
    _swiglu_fwd_kernel[grid](out, a, b, T, H, a.stride(0), b.stride(0), **cfg)
    return out


def swiglu_bwd(dout: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """dout, x1, x2 [..., H] -> (dx1, dx2), each a contiguous [T, H] in x1's dtype."""
    H = _check_args(x1, x2)
    a, b, g = _rows(x1, H), _rows(x2, H), _rows(dout, H)
    _check_dtype(a)
    _check_dtype(g)
    T = a.shape[0]
    dx1 = torch.empty(T, H, device=x1.device, dtype=x1.dtype)
    dx2 = torch.empty_like(dx1)
    if dx1.numel() == 0:
        return dx1, dx2
    cfg = _config(H, T)
    grid = (cdiv(T, cfg["BLOCK_M"]), cdiv(H, cfg["BLOCK_N"]))
    _swiglu_bwd_kernel[grid](dx1, dx2, g, a, b, T, H, g.stride(0), a.stride(0), b.stride(0),
                             **cfg)
    return dx1, dx2


# ----------------------------------------------------------------------------------------------
# torch.library registration (so torch.compile traces through the kernels)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdino::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd(x1, x2)


@_swiglu_fwd_op.register_fake
def _(x1, x2):
    H = _check_args(x1, x2)
    return x1.new_empty(x1.numel() // H if H else 0, H)


@torch.library.custom_op("fastdino::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dout: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_bwd(dout, x1, x2)


@_swiglu_bwd_op.register_fake
def _(dout, x1, x2):
    H = _check_args(x1, x2)
    T = x1.numel() // H if H else 0
    return x1.new_empty(T, H), x1.new_empty(T, H)


# ----------------------------------------------------------------------------------------------
# autograd and the functional API
# ----------------------------------------------------------------------------------------------


class SwiGLUFn(torch.autograd.Function):
    """(x1, x2) -> silu(x1) * x2; saves only the inputs (silu is recomputed)."""

    @staticmethod
    def forward(ctx, x1, x2):
        ctx.save_for_backward(x1, x2)
        return eager_or_op(_swiglu_fwd_op, swiglu_fwd)(x1, x2).view(x1.shape)

    @staticmethod
    def backward(ctx, dout):
        x1, x2 = ctx.saved_tensors
        dx1, dx2 = eager_or_op(_swiglu_bwd_op, swiglu_bwd)(dout, x1, x2)
        return dx1.view(x1.shape), dx2.view(x2.shape)


def swiglu(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The Triton path of `swiglu_ref` (same arguments, same results): x1, x2 [..., H] ->
    silu(x1) * x2, [..., H] contiguous."""
    _check_args(x1, x2)
    return SwiGLUFn.apply(x1, x2)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/kernels/test_compile.py, bench compile-report)
# ----------------------------------------------------------------------------------------------

# SwiGLU hidden widths of the shipped backbones: ViT-S+ (1536), ViT-H+ (5120), 7B (8192); all
# take the same 1024-wide tile, so one config per dtype
_SHIPPED_H = (1536, 5120, 8192)


def _aligned(sig: dict[str, str]) -> tuple[str, ...]:
    """Arguments real launches pass 16-divisible (triton specialises on them, so the compile
    report declares them): pointers (fresh tensors, or x2 at an offset of H elements in the
    packed [T, 2H] projection), H and the row strides (the shipped hidden sizes are multiples of
    64); not the token count T."""
    return tuple(n for n, ty in sig.items() if ty.startswith("*") or n == "H"
                 or n.startswith("stride_"))


def compile_specs() -> list[CompileSpec]:
    specs, seen = [], set()
    for H in _SHIPPED_H:
        for ty in ("bf16", "fp32"):
            cfg = _gpu_config(H)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            tag = f"BLOCK_M={cfg['BLOCK_M']},BLOCK_N={cfg['BLOCK_N']},{ty}"
            if tag in seen:
                continue
            seen.add(tag)
            fwd_sig = {"Out_ptr": f"*{ty}", "X1_ptr": f"*{ty}", "X2_ptr": f"*{ty}", "T": "i32",
                       "H": "i32", "stride_x1": "i32", "stride_x2": "i32"}
            bwd_sig = {"DX1_ptr": f"*{ty}", "DX2_ptr": f"*{ty}", "DOut_ptr": f"*{ty}",
                       "X1_ptr": f"*{ty}", "X2_ptr": f"*{ty}", "T": "i32", "H": "i32",
                       "stride_do": "i32", "stride_x1": "i32", "stride_x2": "i32"}
            for kind, fn, sig in (("fwd", _swiglu_fwd_kernel, fwd_sig),
                                  ("bwd", _swiglu_bwd_kernel, bwd_sig)):
                specs.append(CompileSpec(f"swiglu_{kind}[{tag}]", fn, sig, dict(cfg),
                                         num_warps=warps, num_stages=stages,
                                         divisible_by_16=_aligned(sig)))
    return specs
