"""kernels.fuse_pointwise on a GPU, at DINOv3 scale (skipped without CUDA: tests/gpu/conftest.py):
the fused LayerScale + residual + LayerNorm backward is bit-for-bit deterministic with its real
grid (a few programs per SM, each striding over many row blocks), and both fused ops pass the
DESIGN.md bf16 rule at ViT-B and 7B widths with thousands of rows (the CPU tests use a handful)."""

import pytest
import torch

from bench.parity import judge

BF16 = torch.bfloat16


def _ln_inputs(T, D):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(T, D, generator=g) + torch.randn(D, generator=g),
          torch.randn(T, D, generator=g), 0.1 * torch.randn(D, generator=g),
          1 + 0.1 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)]
    cot = [torch.randn(T, D, generator=g).cuda() for _ in range(2)]
    return [t.to("cuda", BF16) for t in ts], cot


def _ln_run(fn, ts, cot, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]
    y, out = fn(*leaves, 1e-5)
    torch.autograd.backward([y, out], [c.to(y.dtype) for c in cot])
    return [y.detach(), out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("T,D", [(8192, 768), (4096, 4096)])
def test_layernorm_residual_bf16_rule_and_determinism(T, D):
    from fastdino.kernels.layernorm_residual import layernorm_residual, layernorm_residual_ref

    ts, cot = _ln_inputs(T, D)
    truth = _ln_run(layernorm_residual_ref, ts, cot, torch.float32)
    lowp = _ln_run(layernorm_residual_ref, ts, cot)
    got = _ln_run(layernorm_residual, ts, cot)
    again = _ln_run(layernorm_residual, ts, cot)
    names = ("y", "out", "dx", "dh", "dgamma", "dweight", "dbias")
    for name, k, k2, lp, t in zip(names, got, again, lowp, truth, strict=True):
        assert torch.equal(k, k2), f"{name}: two runs differ (non-deterministic reduction)"
        err_k, err_t, _, bound, ok, _ = judge(k, lp, t, BF16, 0.0, 1e-5)
        assert ok, f"{name}: error {err_k:.3g} > bound {bound:.3g} (torch {err_t:.3g})"


@pytest.mark.parametrize("T,H", [(8192, 1536), (4096, 8192)])
def test_swiglu_bf16_rule(T, H):
    from fastdino.kernels.swiglu import swiglu, swiglu_ref

    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(T, H, generator=g).to("cuda", BF16) for _ in range(2))
    cot = torch.randn(T, H, generator=g).cuda()

    def run(fn, dtype=None):
        a, b = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (x1, x2))
        out = fn(a, b)
        out.backward(cot.to(out.dtype))
        return [out.detach(), a.grad, b.grad]

    truth, lowp, got = run(swiglu_ref, torch.float32), run(swiglu_ref), run(swiglu)
    for name, k, lp, t in zip(("out", "dx1", "dx2"), got, lowp, truth, strict=True):
        err_k, err_t, _, bound, ok, _ = judge(k, lp, t, BF16, 0.0, 1e-5)
        assert ok, f"{name}: error {err_k:.3g} > bound {bound:.3g} (torch {err_t:.3g})"
