"""Fused RoPE (kernels/rope.py) against its reference: qkv projection output -> rotated q, k and v
in the SDPA layout [3, B, H, N, d_h], forward and backward, bf16.

Shapes come from the DINOv3 registry: per model, the student's global crops (2·B crops of
1 + n_storage + (224/16)² = 201 tokens) and local crops (n_local·B = 8·B crops of 1 + 4 + 36 = 41
tokens), B = batch_per_gpu. Memory-bound: the metric is GB/s over the minimal traffic (read qkv,
write q, k, v; the backward reads dq, dk, dv and writes d(qkv)); the cos/sin tables
(N_patch·d_h fp32 each) are counted once though they are re-read from L2.

Providers: "torch" = `rope_ref` (the eager chain: reshape, fp32 cast, slice, rotate_half, cat, cast,
permute-copy), "torch_compile" (added by the harness) = the same reference under torch.compile
(Inductor's fused pointwise kernel: the real competitor), "triton" = `rope_qkv`. Both return the
packed [3, ...] tensor, so no provider pays an extra stack.
"""

from __future__ import annotations

import torch
from fastdino.kernels.rope import rope_qkv, rope_ref

from bench.harness import BenchCase
from bench.registry import get
from fastdino.layers.rope_position_encoding import RopePositionEmbedding


def _packed(fn):
    def run(qkv, cos, sin, num_heads, n_prefix):
        return fn(qkv, cos, sin, num_heads, n_prefix, layout="bhnd", packed=True)
    return run


def _case(name: str, crops: int, grid: int, n_prefix: int, num_heads: int, d_h: int,
          dtype: torch.dtype, shape_from: str) -> BenchCase:
    N = n_prefix + grid * grid
    D = num_heads * d_h

    def make_inputs(device: torch.device, dt: torch.dtype) -> dict:
        g = torch.Generator().manual_seed(0)
        qkv = torch.randn(crops, N, 3 * D, generator=g).to(device=device, dtype=dt)
        rope = RopePositionEmbedding(D, num_heads)
        rope.reset_parameters()
        sin, cos = rope(H=grid, W=grid)  # eval mode: no rescale
        return {"qkv": qkv.requires_grad_(), "cos": cos.to(device), "sin": sin.to(device),
                "num_heads": num_heads, "n_prefix": n_prefix}

    es = torch.finfo(dtype).bits // 8
    moved = 2 * 3 * crops * N * D * es + 2 * grid * grid * d_h * 4  # read + write, + tables
    return BenchCase(
        op="rope", name=name,
        params={"crops": crops, "tokens": N, "n_prefix": n_prefix, "num_heads": num_heads,
                "head_dim": d_h, "shape_from": shape_from},
        dtype=dtype, make_inputs=make_inputs,
        providers={"torch": _packed(rope_ref), "triton": _packed(rope_qkv)},
        grad_inputs=["qkv"],
        bytes_fwd=moved, bytes_bwd=moved,
        formula="fwd: read qkv + write q,k,v = 6·crops·N·D·es (+ cos, sin 2·Np·d_h·4) B; "
                "bwd: read dq,dk,dv + write dqkv, the same",
        atol=1e-6 if dtype == torch.float32 else 1e-5,
    )


def cases(quick: bool, on_gpu: bool) -> list[BenchCase]:
    if not on_gpu:  # interpreter-sized: ViT-S heads, a 3x3 grid with 4 registers, 2 crops
        s = get("vits16")
        d_h = s.embed_dim // s.num_heads
        out = [_case("rope-cpu-vits16-tiny", 2, 3, 1 + s.n_storage_tokens, s.num_heads, d_h,
                     torch.float32, "vits16 heads, tiny grid")]
        if not quick:
            out.append(_case("rope-cpu-vits16-tiny-bf16", 2, 3, 1 + s.n_storage_tokens, s.num_heads,
                             d_h, torch.bfloat16, "vits16 heads, tiny grid"))
        return out
    names = ["vitl16"] if quick else ["vits16", "vitb16", "vitl16", "vit7b16"]
    out = []
    for n in names:
        s = get(n)
        d_h = s.embed_dim // s.num_heads
        n_prefix = 1 + s.n_storage_tokens
        for crop, crops, side in (("global", 2 * s.batch_per_gpu, s.global_size),
                                  ("local", s.n_local * s.batch_per_gpu, s.local_size)):
            out.append(_case(f"{n}-{crop}", crops, side // s.patch, n_prefix, s.num_heads, d_h,
                             torch.bfloat16, n))
    return out
