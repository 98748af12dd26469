"""Fused LayerScale + residual add + the next LayerNorm of a DINOv3 block.

What it fuses: inside a pre-norm block (SPEC.md §2.2)
    y   = x + gamma * h            (x the residual stream, h = attn(norm1(x)), gamma = ls1.gamma)
    out = LayerNorm(y) * weight + bias      (norm2, whose output feeds the FFN)
into one read of x and h and one write of y and out (eager PyTorch: 3 kernels, 7 passes over
[T, D]); the backward reads dy, dout, y and h once and writes dx, dh (eager: ~14 passes), with
the parameter gradients dgamma, dweight, dbias reduced deterministically: each program of a fixed
grid sums its rows into an fp32 partial row, and a fixed-order torch sum over the programs
finishes (no float atomics; the same inputs on the same GPU give the same bits).
Derived from: the Triton tutorial `05-layer-norm.py` and Liger's `ops/layer_norm.py` (fp32
statistics, per-program partial dW/dB rows, KERNELS.md §6.3), no code copied; the residual and
LayerScale epilogue is ours.
Math, per token row (D channels, statistics in fp32, y rounded to x's dtype first: the LayerNorm
normalises the residual stream as stored, exactly what the unfused block does):
    mean = sum(y)/D,  rstd = 1/sqrt(sum((y-mean)^2)/D + eps),  xhat = (y-mean)*rstd
    g = dout*weight,  dLN = rstd*(g - mean(g) - xhat*mean(g*xhat))
    dx = dy + dLN,  dh = dx*gamma,  dgamma = sum_rows(dx*h),  dweight = sum_rows(dout*xhat),
    dbias = sum_rows(dout)
Shapes: x, h [..., D] (last dim contiguous; flattened to T rows); gamma, weight, bias [D].
Dtypes: x, h, params fp32 or bf16 in any mix (all computed in fp32); y and out in x's dtype,
written as one packed [2, T, D] tensor (y = [0], out = [1]; returned as two views, or packed);
every gradient in its input's dtype. D up to 4096 (a row lives in registers; wider rows would
need a chunked row loop). Under autocast nn.LayerNorm returns fp32, so the block fuses there only
when its stream is fp32 (fp32 params).
Tested: Triton 3.6 and 3.9 under the CPU interpreter; compiled for sm_90 / sm_80 (no spills) at
the shipped widths. Not yet timed on a GPU (2026-11-26): kernels.fuse_pointwise stays off until
`python -m bench layernorm_residual` shows a win over PyTorch at ViT widths (Liger's LayerNorm
loses to PyTorch's there, KERNELS.md §6.3).
Limits: only where the block's rows line up (eval, or drop path inactive); the sample-subset drop
path adds the branch to a random subset of samples, scaled, so the block falls back there.
"""

from __future__ import annotations

import functools

import torch
from fastdino.kernels._rounding import to_stored
from fastdino.kernels._triton import tl, triton
from fastdino.kernels._utils import CompileSpec, cdiv, eager_or_op, is_interpreter, next_pow2

MAX_D = 4096  # the widest shipped model (7B); wider rows are not compile-checked
_DTYPES = (torch.float32, torch.bfloat16)


def _check_args(x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor) -> int:
    """D after checking every argument; errors name the bad input and what is allowed."""
    if x.shape != h.shape or x.dim() < 1:
        raise ValueError(f"layernorm_residual: x and h must have the same shape [..., D], got "
                         f"{tuple(x.shape)} and {tuple(h.shape)}")
    D = x.shape[-1]
    for name, p in (("gamma", gamma), ("weight", weight), ("bias", bias)):
        if p.shape != (D,):
            raise ValueError(f"layernorm_residual: {name} must be [D={D}], got {tuple(p.shape)}")
    return D


def layernorm_residual_ref(x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor,
                           weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                           packed: bool = False):
    """The reference (single source of truth), computed in fp32:
    y = (x + gamma*h) rounded to x's dtype; out = LayerNorm(y)*weight + bias in x's dtype.
    x, h [..., D]; gamma, weight, bias [D] -> (y, out), both [..., D] (`packed`: stacked,
    [2, ..., D])."""
    _check_args(x, h, gamma, weight, bias)
    y = (x.float() + gamma.float() * h.float()).to(x.dtype)
    out = torch.nn.functional.layer_norm(y.float(), (x.shape[-1],), weight.float(), bias.float(),
                                         eps).to(x.dtype)
    return torch.stack((y, out)) if packed else (y, out)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# A program holds [BLOCK_M rows, BLOCK_D = next_pow2(D) channels] in registers: whole rows, so
# the statistics need no second pass over memory.


@triton.jit
def _layernorm_residual_fwd_kernel(
    Y_ptr,  # [T, D] out, x's dtype: the residual stream x + gamma*h
    Out_ptr,  # [T, D] out, x's dtype: LayerNorm(y)*weight + bias
    Mean_ptr,  # [T] fp32 out
    Rstd_ptr,  # [T] fp32 out
    X_ptr,  # [T, D] in, rows strided, channels contiguous
    H_ptr,  # [T, D] in
    Gamma_ptr,  # [D] in
    W_ptr,  # [D] in
    B_ptr,  # [D] in
    T, D,
    stride_y, stride_o, stride_x, stride_h,  # row strides
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < T)[:, None] & col_ok[None, :]
    r = rows.to(tl.int64)[:, None]
    c = cols[None, :]
    x = tl.load(X_ptr + r * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H_ptr + r * stride_h + c, mask=mask, other=0.0).to(tl.float32)
    gamma = tl.load(Gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = to_stored(x + gamma[None, :] * h, Y_ptr.dtype.element_ty)
    tl.store(Y_ptr + r * stride_y + c, y, mask=mask)
    y = y.to(tl.float32)  # normalise the stream as stored
    mean = tl.sum(y, axis=1) / D
    yc = tl.where(mask, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(yc * yc, axis=1) / D + eps)
    w = tl.load(W_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = yc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Out_ptr + r * stride_o + c, to_stored(out, Out_ptr.dtype.element_ty), mask=mask)
    row_ok = rows < T
    tl.store(Mean_ptr + rows, mean, mask=row_ok)
    tl.store(Rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layernorm_residual_bwd_kernel(
    DX_ptr,  # [T, D] out, x's dtype: dy + d(LayerNorm)
    DH_ptr,  # [T, D] out, h's dtype: dx * gamma
    PGamma_ptr,  # [num_programs, D] fp32 out: this program's partial sum of dx*h
    PW_ptr,  # [num_programs, D] fp32 out: partial sum of dout*xhat
    PB_ptr,  # [num_programs, D] fp32 out: partial sum of dout
    DY_ptr,  # [T, D] in: gradient of y (from the stream)
    DOut_ptr,  # [T, D] in: gradient of out
    Y_ptr,  # [T, D] in (saved by the forward)
    H_ptr,  # [T, D] in
    Gamma_ptr,  # [D] in
    W_ptr,  # [D] in
    Mean_ptr,  # [T] fp32 in
    Rstd_ptr,  # [T] fp32 in
    T, D,
    stride_dx, stride_dh, stride_dy, stride_do, stride_y, stride_h,  # row strides
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # a fixed grid of programs strides over the row blocks (pid, pid + num_programs, ...), so
    # each accumulates its parameter-gradient rows in registers and writes them once
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    c = cols[None, :]
    gamma = tl.load(Gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    w = tl.load(W_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # [BLOCK_M, BLOCK_D] accumulators, reduced over the rows once at the end (a row reduction
    # per iteration re-lays the tile out and cost registers)
    acc_gamma = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(pid * BLOCK_M, T, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        mask = row_ok[:, None] & col_ok[None, :]
        r = rows.to(tl.int64)[:, None]
        mean = tl.load(Mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd_ptr + rows, mask=row_ok, other=0.0)
        y = tl.load(Y_ptr + r * stride_y + c, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOut_ptr + r * stride_do + c, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
        acc_w += dout * xhat
        acc_b += dout
        g = dout * w
        mean_g = tl.sum(g, axis=1) / D
        mean_gx = tl.sum(g * xhat, axis=1) / D
        dln = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        dx = tl.load(DY_ptr + r * stride_dy + c, mask=mask, other=0.0).to(tl.float32) + dln
        dx = tl.where(mask, dx, 0.0)
        tl.store(DX_ptr + r * stride_dx + c, to_stored(dx, DX_ptr.dtype.element_ty), mask=mask)
        tl.store(DH_ptr + r * stride_dh + c, to_stored(dx * gamma, DH_ptr.dtype.element_ty),
                 mask=mask)
        h = tl.load(H_ptr + r * stride_h + c, mask=mask, other=0.0).to(tl.float32)
        acc_gamma += dx * h
    p = pid.to(tl.int64) * D + cols
    tl.store(PGamma_ptr + p, tl.sum(acc_gamma, axis=0), mask=col_ok)
    tl.store(PW_ptr + p, tl.sum(acc_w, axis=0), mask=col_ok)
    tl.store(PB_ptr + p, tl.sum(acc_b, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _gpu_config(D: int, bwd: bool = False) -> dict:
    """GPU launch config: whole rows of BLOCK_D = next_pow2(D) channels. Forward: a tile of ~2048
    values on 4 warps (several rows per program at ViT-S/B widths, so a program moves a few KB;
    8 warps from D > 1024), 16 values per thread and tensor, 45-98 registers on sm_90. Backward:
    a tile of ~1024 values with 4 values per thread and tensor (8-32 warps): it holds 5 row
    tensors and 3 fp32 accumulator rows, 48-75 registers (sm_90 / sm_80, triton 3.6 and 3.9); 8
    and 16 values per thread took 110-255 and spilled at D = 4096 (cuobjdump). One pipeline
    stage: the backward's row loop gains nothing from prefetching whole rows into registers."""
    block_d = next_pow2(D)
    if bwd:
        block_m = max(1, 1024 // block_d)
        warps = min(32, max(4, block_m * block_d // 128))
    else:
        block_m = max(1, 2048 // block_d)
        warps = 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps, num_stages=1)


def _config(D: int, T: int, bwd: bool = False) -> dict:
    """Fixed heuristic (no autotune: it cannot run under the interpreter)."""
    cfg = _gpu_config(D, bwd)
    if is_interpreter():  # the interpreter pays per op, not per element: few, big programs
        cfg["BLOCK_M"] = max(1, min(next_pow2(T), 8192 // cfg["BLOCK_D"]))
    return cfg


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_programs(T: int, device: torch.device, cfg: dict) -> int:
    """Size of the backward's fixed grid: 32 warps' worth of programs per SM (1-4 programs; at
    ~64 registers a thread that is the most an SM holds), each
    striding over the row blocks; each writes 3 partial rows of D fp32 (~2% of the traffic at
    DINOv3 token counts). Under the interpreter 2 programs, so the partial-sum path is exercised.
    The grid depends only on T and the GPU, so the reduction order (and the bits) are fixed."""
    blocks = cdiv(T, cfg["BLOCK_M"])
    if device.type != "cuda":
        return max(1, min(blocks, 2))
    return max(1, min(blocks, _num_sms(device.index or 0) * (32 // cfg["num_warps"])))


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """[..., D] -> [T, D] with a contiguous last dim (a view when possible)."""
    t = t.reshape(-1, D)
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_kernel_inputs(*tensors: torch.Tensor, D: int) -> None:
    for t in tensors:
        if t.dtype not in _DTYPES:
            raise ValueError(f"layernorm_residual kernel: tensors must be fp32 or bf16, got "
                             f"{t.dtype}")
    if D > MAX_D:
        raise ValueError(f"layernorm_residual kernel: D={D} > {MAX_D} (a row must fit in "
                         "registers); set kernels.fuse_pointwise=false")


def layernorm_residual_fwd(x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor,
                           weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """x, h [..., D] -> (packed [2, T, D] in x's dtype: y, out; mean [T], rstd [T] fp32)."""
    D = _check_args(x, h, gamma, weight, bias)
    _check_kernel_inputs(x, h, gamma, weight, bias, D=D)
    x2, h2 = _rows(x, D), _rows(h, D)
    T = x2.shape[0]
    yo = torch.empty(2, T, D, device=x.device, dtype=x.dtype)
    y, out = yo[0], yo[1]
    mean = torch.empty(T, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if T == 0:
        return yo, mean, rstd
    cfg = _config(D, T)
    grid = (cdiv(T, cfg["BLOCK_M"]),)
    _layernorm_residual_fwd_kernel[grid](
        y, out, mean, rstd, x2, h2, gamma.contiguous(), weight.contiguous(), bias.contiguous(),
        T, D, y.stride(0), out.stride(0), x2.stride(0), h2.stride(0), eps, **cfg)
    return yo, mean, rstd


def layernorm_residual_bwd(dy: torch.Tensor, dout: torch.Tensor, y: torch.Tensor,
                           h: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    """Gradients (dx [T, D], dh [T, D], dgamma, dweight, dbias [D]), each in its input's dtype;
    dy, dout [T, D] (any row strides), y [T, D] and mean, rstd [T] from the forward."""
    T, D = y.shape
    dy, dout, h = _rows(dy, D), _rows(dout, D), _rows(h, D)
    _check_kernel_inputs(dy, dout, y, h, gamma, weight, D=D)
    dx = torch.empty(T, D, device=y.device, dtype=y.dtype)
    dh = torch.empty(T, D, device=y.device, dtype=h.dtype)
    cfg = _config(D, T, bwd=True)
    progs = _bwd_programs(T, y.device, cfg) if T else 0
    partial = torch.zeros(3, max(progs, 1), D, device=y.device, dtype=torch.float32)
    if T:
        _layernorm_residual_bwd_kernel[(progs,)](
            dx, dh, partial[0], partial[1], partial[2], dy, dout, y, h, gamma.contiguous(),
            weight.contiguous(), mean, rstd, T, D, dx.stride(0), dh.stride(0), dy.stride(0),
            dout.stride(0), y.stride(0), h.stride(0), **cfg)
    # a fixed-order sum over the programs (deterministic); three separate tensors (custom op
    # outputs may not alias each other)
    return (dx, dh, partial[0].sum(0).to(gamma.dtype), partial[1].sum(0).to(weight.dtype),
            partial[2].sum(0).to(bias.dtype))


# ----------------------------------------------------------------------------------------------
# torch.library registration (so torch.compile traces through the kernels)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdino::layernorm_residual_fwd", mutates_args=())
def _layernorm_residual_fwd_op(x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor,
                               weight: torch.Tensor, bias: torch.Tensor, eps: float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_residual_fwd(x, h, gamma, weight, bias, eps)


@_layernorm_residual_fwd_op.register_fake
def _(x, h, gamma, weight, bias, eps):
    D = _check_args(x, h, gamma, weight, bias)
    T = x.numel() // D if D else 0
    stat = x.new_empty(T, dtype=torch.float32)
    return x.new_empty(2, T, D), stat, torch.empty_like(stat)


@torch.library.custom_op("fastdino::layernorm_residual_bwd", mutates_args=())
def _layernorm_residual_bwd_op(dy: torch.Tensor, dout: torch.Tensor, y: torch.Tensor,
                               h: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    return layernorm_residual_bwd(dy, dout, y, h, gamma, weight, bias, mean, rstd)


@_layernorm_residual_bwd_op.register_fake
def _(dy, dout, y, h, gamma, weight, bias, mean, rstd):
    T, D = y.shape
    return (y.new_empty(T, D), y.new_empty(T, D, dtype=h.dtype), torch.empty_like(gamma),
            torch.empty_like(weight), torch.empty_like(bias))


# ----------------------------------------------------------------------------------------------
# autograd and the functional API
# ----------------------------------------------------------------------------------------------


class LayerNormResidualFn(torch.autograd.Function):
    """(x, h, gamma, weight, bias) [T, D] -> packed [2, T, D] (`packed`) or its two views (y, out);
    gradients to all five tensors."""

    @staticmethod
    def forward(ctx, x, h, gamma, weight, bias, eps, packed):
        fwd = eager_or_op(_layernorm_residual_fwd_op, layernorm_residual_fwd)
        yo, mean, rstd = fwd(x, h, gamma, weight, bias, eps)
        ctx.save_for_backward(yo, h, gamma, weight, bias, mean, rstd)
        ctx.args = (x.shape, packed)
        return yo if packed else yo.unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        yo, h, gamma, weight, bias, mean, rstd = ctx.saved_tensors
        x_shape, packed = ctx.args
        dy, dout = grads[0].unbind(0) if packed else grads
        dx, dh, dgamma, dweight, dbias = eager_or_op(
            _layernorm_residual_bwd_op, layernorm_residual_bwd)(
            dy, dout, yo[0], h, gamma, weight, bias, mean, rstd)
        return dx.view(x_shape), dh.view(x_shape), dgamma, dweight, dbias, None, None


def layernorm_residual(x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor,
                       weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                       packed: bool = False):
    """The Triton path of `layernorm_residual_ref` (same arguments, same results):
    x, h [..., D] -> (y = x + gamma*h, out = LayerNorm(y)*weight + bias), both [..., D] in x's
    dtype, views of one [2, ..., D] tensor (returned itself when `packed`)."""
    _check_args(x, h, gamma, weight, bias)
    yo = LayerNormResidualFn.apply(x, h, gamma, weight, bias, float(eps), packed)
    if packed:
        return yo.view(2, *x.shape)
    return yo[0].view(x.shape), yo[1].view(x.shape)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/kernels/test_compile.py, bench compile-report)
# ----------------------------------------------------------------------------------------------

# ViT-S/B/L, ViT-H+ and 7B widths; SwiGLU and MLP blocks alike
_SHIPPED_D = (384, 768, 1024, 1280, 4096)
_COMBOS = (  # (x, y and out; h; params): bf16 training, autocast (fp32 stream), fp32
    ("bf16", "bf16", "bf16"),
    ("fp32", "bf16", "fp32"),
    ("fp32", "fp32", "fp32"),
)


def _aligned(sig: dict[str, str]) -> tuple[str, ...]:
    """Arguments real launches pass 16-divisible (triton specialises on them, so the compile
    report declares them): pointers (fresh tensors; `out` at an offset of T·D elements in the
    packed [2, T, D] result), D and the row strides (widths 384..4096); not T."""
    return tuple(n for n, ty in sig.items() if ty.startswith("*") or n == "D"
                 or n.startswith("stride_"))


def compile_specs() -> list[CompileSpec]:
    """Both kernels at the GPU launch config of each shipped width and dtype combination."""
    specs, seen = [], set()
    for D in _SHIPPED_D:
        for tx, th, tp in _COMBOS:
            to = tx
            fwd_sig = {"Y_ptr": f"*{tx}", "Out_ptr": f"*{to}", "Mean_ptr": "*fp32",
                       "Rstd_ptr": "*fp32", "X_ptr": f"*{tx}", "H_ptr": f"*{th}",
                       "Gamma_ptr": f"*{tp}", "W_ptr": f"*{tp}", "B_ptr": f"*{tp}", "T": "i32",
                       "D": "i32", "stride_y": "i32", "stride_o": "i32", "stride_x": "i32",
                       "stride_h": "i32", "eps": "fp32"}
            bwd_sig = {"DX_ptr": f"*{tx}", "DH_ptr": f"*{th}", "PGamma_ptr": "*fp32",
                       "PW_ptr": "*fp32", "PB_ptr": "*fp32", "DY_ptr": f"*{tx}",
                       "DOut_ptr": f"*{to}", "Y_ptr": f"*{tx}", "H_ptr": f"*{th}",
                       "Gamma_ptr": f"*{tp}", "W_ptr": f"*{tp}", "Mean_ptr": "*fp32",
                       "Rstd_ptr": "*fp32", "T": "i32", "D": "i32",
                       **{f"stride_{n}": "i32" for n in ("dx", "dh", "dy", "do", "y", "h")}}
            for kind, fn, sig in (("fwd", _layernorm_residual_fwd_kernel, fwd_sig),
                                  ("bwd", _layernorm_residual_bwd_kernel, bwd_sig)):
                cfg = _gpu_config(D, bwd=kind == "bwd")
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                name = (f"layernorm_residual_{kind}[BLOCK_M={cfg['BLOCK_M']},"
                        f"BLOCK_D={cfg['BLOCK_D']},warps={warps},x={tx},h={th},p={tp}]")
                if name not in seen:
                    seen.add(name)
                    specs.append(CompileSpec(name, fn, sig, cfg, num_warps=warps,
                                             num_stages=stages, divisible_by_16=_aligned(sig)))
    return specs
