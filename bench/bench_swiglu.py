"""Fused SwiGLU gate (kernels/swiglu.py) against PyTorch: hidden = silu(x1) * x2 with x1 = w1(x),
x2 = w2(x) of the DINOv3 SwiGLU FFN, forward and backward, bf16.

Shapes: the block's FFN runs on the tokens of all the student's crop types concatenated (T as in
bench_layernorm_residual.student_tokens, from the registry) at the SwiGLU hidden width of the
shipped arch with that embedding width (fastdino/models/backbones.py ARCH_TABLE and
`swiglu_hidden_dim`): ViT-7B (D 4096, ratio 3, align 64: H = 8192) and ViT-S+ (D 384, ratio 6:
H = 1536, with ViT-S's token counts). ViT-B/L use the GELU MLP, so they have no SwiGLU case.
Memory-bound: GB/s over the minimal traffic, fwd reads x1, x2 and writes the hidden tensor
(3·T·H·es); bwd reads dout, x1, x2 and writes dx1, dx2 (5·T·H·es).

Providers: "torch" = `swiglu_ref` (fp32 math, one rounding), "torch_compile" (added by the
harness) = the same under torch.compile (the real competitor when `model.compile` is on),
"triton" = `swiglu`, and "eager_ffn" = F.silu(x1) * x2 as the FFN runs it today with fusion off.
The decision rule for `kernels.fuse_pointwise`: keep it only where "triton" beats both
"torch_compile" and "eager_ffn" in fwd+bwd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastdino.kernels.swiglu import swiglu, swiglu_ref

from bench.bench_layernorm_residual import student_tokens
from bench.harness import BenchCase
from bench.registry import get
from fastdino.layers.ffn_layers import swiglu_hidden_dim
from fastdino.models.backbones import ARCH_TABLE

# registry shape (token counts) -> the shipped SwiGLU arch of the same width
SWIGLU_ARCH = {"vits16": "vit_small_plus", "vit7b16": "vit_7b"}


def hidden_width(arch: str) -> int:
    D, _, _, ffn, ratio, _ = ARCH_TABLE[arch]
    return swiglu_hidden_dim(int(D * ratio), int(ffn[len("swiglu"):] or 8))


def _eager_ffn(x1, x2):
    return F.silu(x1) * x2


def _case(name: str, T: int, H: int, dtype: torch.dtype, shape_from: str) -> BenchCase:
    def make_inputs(device: torch.device, dt: torch.dtype) -> dict:
        g = torch.Generator().manual_seed(0)
        x1, x2 = (torch.randn(T, H, generator=g).to(device=device, dtype=dt).requires_grad_()
                  for _ in range(2))
        return {"x1": x1, "x2": x2}

    es = torch.finfo(dtype).bits // 8
    return BenchCase(
        op="swiglu", name=name, params={"tokens": T, "hidden": H, "shape_from": shape_from},
        dtype=dtype, make_inputs=make_inputs,
        providers={"torch": swiglu_ref, "triton": swiglu, "eager_ffn": _eager_ffn},
        bytes_fwd=3 * T * H * es, bytes_bwd=5 * T * H * es,
        formula="fwd: read x1, x2 + write silu(x1)*x2 = 3·T·H·es B; bwd: read dout, x1, x2 + "
                "write dx1, dx2 = 5·T·H·es B",
        atol=1e-6 if dtype == torch.float32 else 1e-5,
    )


def cases(quick: bool, on_gpu: bool) -> list[BenchCase]:
    if not on_gpu:  # interpreter-sized: ViT-S+ hidden width, 2 crops of 1 + 4 + 3x3 tokens
        T, H = 2 * (1 + get("vits16").n_storage_tokens + 9), hidden_width("vit_small_plus")
        out = [_case("swiglu-cpu-vits16plus-tiny", T, H, torch.float32,
                     "vit_small_plus hidden, tiny token count")]
        if not quick:
            out.append(_case("swiglu-cpu-vits16plus-tiny-bf16", T, H, torch.bfloat16,
                             "vit_small_plus hidden, tiny token count"))
        return out
    names = ["vit7b16"] if quick else ["vits16", "vit7b16"]
    return [_case(f"{n}-{SWIGLU_ARCH[n]}-student", student_tokens(n),
                  hidden_width(SWIGLU_ARCH[n]), torch.bfloat16, f"{n} tokens, {SWIGLU_ARCH[n]}")
            for n in names]
