"""HARNESS SELF-TEST, not a fastdino kernel: a soft-target softmax cross-entropy with a small Triton
kernel of our own, so the harness (timing, parity, JSON, compile report) can be proven end to end
on CPU before the real kernels land. It is deliberately simple (two passes over each row, no
tuning); its numbers say nothing about fastdino's kernels.

    loss = mean_r  sum_k  -t[r,k] * log_softmax(x[r])_k          x, t: [R, K]
    dx[r] = g / R * (softmax(x[r]) * sum_k t[r,k] - t[r])

Shapes come from the DINOv3 registry (DINO head logits: (2 + n_local)·B rows × K prototypes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastdino.kernels._rounding import to_stored
from fastdino.kernels._utils import CompileSpec, next_pow2

from bench.harness import BenchCase
from bench.registry import get


def softmax_ce_ref(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x, t: [R, K] -> scalar. Computed in fp32 (upcast), result in fp32."""
    return -(t.float() * torch.log_softmax(x.float(), dim=-1)).sum(-1).mean()


@triton.jit
def _softmax_ce_fwd_kernel(x_ptr, t_ptr, loss_ptr, lse_ptr, K, stride, BLOCK_K: tl.constexpr):
    # one program per row; pass 1: online max / sum-exp; pass 2 folded in: sum(t), sum(t*x)
    row = tl.program_id(0).to(tl.int64)
    # running max starts finite (-1e30) so a lane that only sees padding (-inf) keeps s = 0
    # without ever computing inf - inf
    m = tl.full([BLOCK_K], -1e30, tl.float32)
    s = tl.zeros([BLOCK_K], tl.float32)
    ts = tl.zeros([BLOCK_K], tl.float32)
    tx = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + row * stride + offs, mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(t_ptr + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
        ts += t
        tx += tl.where(mask, t * x, 0.0)
    m_row = tl.max(m, 0)
    s_row = tl.sum(s * tl.exp(m - m_row), 0)
    lse = m_row + tl.log(s_row)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, lse * tl.sum(ts, 0) - tl.sum(tx, 0))


@triton.jit
def _softmax_ce_bwd_kernel(x_ptr, t_ptr, lse_ptr, dx_ptr, g_ptr, K, stride, inv_rows,
                           BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(g_ptr).to(tl.float32) * inv_rows
    ts = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        ts += tl.load(t_ptr + row * stride + offs, mask=offs < K, other=0.0).to(tl.float32)
    t_sum = tl.sum(ts, 0)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
        dx = (tl.exp(x - lse) * t_sum - t) * scale
        tl.store(dx_ptr + row * stride + offs, to_stored(dx, dx_ptr.dtype.element_ty), mask=mask)


def _block_k(K: int) -> int:
    return min(4096, next_pow2(K))


class SoftmaxCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, t = x.contiguous(), t.contiguous()
        R, K = x.shape
        loss = torch.empty(R, device=x.device, dtype=torch.float32)
        lse = torch.empty(R, device=x.device, dtype=torch.float32)
        _softmax_ce_fwd_kernel[(R,)](x, t, loss, lse, K, x.stride(0), BLOCK_K=_block_k(K),
                                    num_warps=8)
        ctx.save_for_backward(x, t, lse)
        return loss.mean()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, t, lse = ctx.saved_tensors
        R, K = x.shape
        dx = torch.empty_like(x)
        _softmax_ce_bwd_kernel[(R,)](x, t, lse, dx, g.float().contiguous(), K, x.stride(0),
                                     1.0 / R, BLOCK_K=_block_k(K), num_warps=8)
        return dx, None


def softmax_ce(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return SoftmaxCEFn.apply(x, t)


def compile_specs() -> list[CompileSpec]:
    """Shipped launch configurations (for `bench compile-report --module bench.bench_selftest`)."""
    specs = []
    for ty in ("fp32", "bf16"):
        specs.append(CompileSpec(
            f"selftest_softmax_ce_fwd[{ty},BLOCK_K=4096]", _softmax_ce_fwd_kernel,
            {"x_ptr": f"*{ty}", "t_ptr": f"*{ty}", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
             "K": "i32", "stride": "i32"}, {"BLOCK_K": 4096}, num_warps=8))
        specs.append(CompileSpec(
            f"selftest_softmax_ce_bwd[{ty},BLOCK_K=4096]", _softmax_ce_bwd_kernel,
            {"x_ptr": f"*{ty}", "t_ptr": f"*{ty}", "lse_ptr": "*fp32", "dx_ptr": f"*{ty}",
             "g_ptr": "*fp32", "K": "i32", "stride": "i32", "inv_rows": "fp32"},
            {"BLOCK_K": 4096}, num_warps=8))
    return specs


def _case(name: str, R: int, K: int, dtype: torch.dtype, shape_from: str) -> BenchCase:
    def make_inputs(device: torch.device, dt: torch.dtype) -> dict:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(R, K, generator=g) * 3.0).to(device=device, dtype=dt)
        t = torch.softmax(torch.randn(R, K, generator=g) * 2.0, -1).to(device=device, dtype=dt)
        return {"x": x.requires_grad_(), "t": t}

    es = torch.finfo(dtype).bits // 8
    return BenchCase(
        op="selftest", name=name, params={"R": R, "K": K, "shape_from": shape_from},
        dtype=dtype, make_inputs=make_inputs,
        providers={"torch": softmax_ce_ref, "triton": softmax_ce},
        grad_inputs=["x"],
        bytes_fwd=2 * R * K * es + 8 * R,  # read x, t; write loss, lse
        bytes_bwd=3 * R * K * es + 4 * R,  # read x, t, lse; write dx
        formula="fwd 2·R·K·es + 8R B; bwd 3·R·K·es + 4R B (es = element size)",
        atol=1e-6 if dtype == torch.float32 else 1e-4,
    )


def cases(quick: bool, on_gpu: bool) -> list[BenchCase]:
    if not on_gpu:  # interpreter-sized: odd K, few rows
        out = [_case("selftest-cpu-odd", 6, 1000, torch.float32, "odd size")]
        if not quick:
            out.append(_case("selftest-cpu-odd-bf16", 6, 1000, torch.bfloat16, "odd size"))
        return out
    names = ["vits16"] if quick else ["vits16", "vitl16", "vit7b16"]
    out = []
    for n in names:
        s = get(n)
        for dt in ((torch.bfloat16,) if quick else (torch.float32, torch.bfloat16)):
            out.append(_case(f"{n}-dino", s.dino_student_rows, s.dino_K, dt, n))
    return out
