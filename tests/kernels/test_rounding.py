"""kernels/_rounding.py: `to_stored` casts fp32 to bf16 exactly as PyTorch (and the GPU) do,
round to nearest even, under the Triton interpreter too (whose own cast truncates)."""

import pytest
import torch
import triton
import triton.language as tl
from fastdino.kernels._rounding import to_stored
from fastdino.kernels._utils import can_run_triton

pytestmark = pytest.mark.skipif(not (can_run_triton(torch.empty(0)) or torch.cuda.is_available()),
                                reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1)")


@triton.jit
def _store_kernel(X, Y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, to_stored(tl.load(X + i, mask=i < n), Y.dtype.element_ty), mask=i < n)


def _store(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    _store_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


def _hard_values(device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=g) * torch.logspace(-30, 30, 3000)
    # exact ties between two bf16 values (low 16 bits 0x8000), both parities, and the neighbours
    bits = torch.randint(0x0080, 0x7F7F, (1000,), generator=g, dtype=torch.int32) << 16
    ties = torch.cat([bits | 0x8000, bits | 0x7FFF, bits | 0x8001]).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"),
                            torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max,
                            torch.finfo(torch.bfloat16).max])
    # (no subnormals: the interpreter's own cast flushes bf16 subnormals to zero, the GPU keeps
    # them; training never stores values below 1e-38)
    return torch.cat([x, ties, -ties, special]).to(device)


def test_bf16_rounds_to_nearest_even_like_torch():
    x = _hard_values("cuda" if torch.cuda.is_available() else "cpu")
    got, want = _store(x, torch.bfloat16), x.to(torch.bfloat16)
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {x.numel()} differ, e.g. " \
        f"{x[~same][:3].tolist()} -> {got[~same][:3].tolist()} (torch {want[~same][:3].tolist()})"


def test_fp32_stores_are_unchanged():
    x = _hard_values("cuda" if torch.cuda.is_available() else "cpu")
    got = _store(x, torch.float32)
    assert bool(((got == x) | (got.isnan() & x.isnan())).all())
