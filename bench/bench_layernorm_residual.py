"""Fused LayerScale + residual + LayerNorm (kernels/layernorm_residual.py) against PyTorch: the
middle of a DINOv3 block, y = x + gamma * h and out = norm2(y), forward and backward, bf16 (the
DeepSpeed bf16 student: stream, branch and parameters all bf16).

Shapes come from the DINOv3 registry: per model, the block's pointwise ops run on the tokens of
all the student's crop types concatenated, T = 2·B·(1 + n_storage + (224/16)²) global +
n_local·B·(1 + n_storage + (96/16)²) local tokens (B = batch_per_gpu), at the model's width D.
Memory-bound: GB/s over the minimal traffic, fwd reads x, h and writes y, out (4·T·D·es); bwd
reads dy, dout, y, h and writes dx, dh (6·T·D·es); parameter rows and partial sums are ignored.

Providers (every one returns y and out stacked, [2, T, D], so the harness sees one tensor):
"torch" = `layernorm_residual_ref` (fp32 math, then a stack: the eager numbers pay that copy, the
compiled ones do not), "torch_compile" (added by the harness) = the same under torch.compile (the
real competitor when `model.compile` is on: Inductor fuses the chain and the stack), "triton" =
`layernorm_residual(packed=True)` (writes the stacked tensor directly), and "eager_block_out" =
the unfused block ops exactly as the model runs them (x + h * gamma, then F.layer_norm, in bf16)
returning only `out`: y is still written but not stacked and the backward skips adding dy, so it
is a lower bound on the eager block's cost. The decision rule for `kernels.fuse_pointwise`:
keep it only where "triton" beats both "torch_compile" and "eager_block_out" in fwd+bwd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastdino.kernels.layernorm_residual import layernorm_residual, layernorm_residual_ref

from bench.harness import BenchCase
from bench.registry import get


def _packed(fn):
    def run(x, h, gamma, weight, bias):
        return fn(x, h, gamma, weight, bias, 1e-5, packed=True)
    return run


def _eager_block_out(x, h, gamma, weight, bias):
    """The unfused block (fastdino/layers/block.py with fusion off): ls1, residual, norm2."""
    y = x + h * gamma
    return F.layer_norm(y, (y.shape[-1],), weight, bias, 1e-5)


def _case(name: str, T: int, D: int, dtype: torch.dtype, shape_from: str) -> BenchCase:
    def make_inputs(device: torch.device, dt: torch.dtype) -> dict:
        g = torch.Generator().manual_seed(0)
        # a residual stream with per-channel offsets, a branch output, LayerScale ~1e-1 (the
        # trained values; the 1e-5 init would make y == x in bf16), LayerNorm affine near 1 / 0
        x = torch.randn(T, D, generator=g) + torch.randn(D, generator=g)
        h = torch.randn(T, D, generator=g)
        params = (0.1 * torch.randn(D, generator=g), 1 + 0.1 * torch.randn(D, generator=g),
                  0.1 * torch.randn(D, generator=g))
        ts = [t.to(device=device, dtype=dt).requires_grad_() for t in (x, h, *params)]
        return dict(zip(("x", "h", "gamma", "weight", "bias"), ts, strict=True))

    es = torch.finfo(dtype).bits // 8
    return BenchCase(
        op="layernorm_residual", name=name,
        params={"tokens": T, "dim": D, "shape_from": shape_from},
        dtype=dtype, make_inputs=make_inputs,
        providers={"torch": _packed(layernorm_residual_ref),
                   "triton": _packed(layernorm_residual),
                   "eager_block_out": _eager_block_out},
        bytes_fwd=4 * T * D * es, bytes_bwd=6 * T * D * es,
        formula="fwd: read x, h + write y, out = 4·T·D·es B; bwd: read dy, dout, y, h + write "
                "dx, dh = 6·T·D·es B (parameter rows ignored)",
        atol=1e-5,
    )


def student_tokens(name: str) -> int:
    """Tokens of one block call: all the student's global and local crops concatenated."""
    s = get(name)
    prefix = 1 + s.n_storage_tokens
    return (2 * s.batch_per_gpu * (prefix + s.global_patches)
            + s.n_local * s.batch_per_gpu * (prefix + s.local_patches))


def cases(quick: bool, on_gpu: bool) -> list[BenchCase]:
    if not on_gpu:  # interpreter-sized: ViT-S width, 2 crops of 1 + 4 + 3x3 tokens
        s = get("vits16")
        T = 2 * (1 + s.n_storage_tokens + 9)
        out = [_case("layernorm_residual-cpu-vits16-tiny", T, s.embed_dim, torch.float32,
                     "vits16 width, tiny token count")]
        if not quick:
            out.append(_case("layernorm_residual-cpu-vits16-tiny-bf16", T, s.embed_dim,
                             torch.bfloat16, "vits16 width, tiny token count"))
        return out
    # quick: the two ends of the width range (ViT-B, where Liger's LayerNorm loses to PyTorch's,
    # and 7B), one torch.compile each inside device_check's budget; full: every width
    names = ["vitb16", "vit7b16"] if quick else ["vits16", "vitb16", "vitl16", "vit7b16"]
    return [_case(f"{n}-student", student_tokens(n), get(n).embed_dim, torch.bfloat16, n)
            for n in names]
