"""k-means assignment benchmark cases (issue 11, SPEC.md §5): the nearest centroid of N embeddings
among k centroids, the step that dominates every Lloyd iteration of the curation k-means.

    fwd FLOPs = 2·N·k·D (the x·cᵀ tiles; the argmin and norms are O(N·k + N·D))
    bwd: the gradient of dist2 is a gather / index_add, O(N·D): memory-bound, no FLOP metric

Shapes: D from the ViT-L / ViT-S embed dims of the registry; k and N from SPEC.md §5's curation
levels (the web config's level-1 k = 100k over ~1M-point shards, a level-2 k = 16k-style run over
256k points). Inputs are clustered (points scattered around the centroids), so no assignment is a
near-tie and the index-dependent gradient can be judged exactly at every size.

Providers: torch = kmeans_assign_ref (chunked x·cᵀ blocks of 64M distances in the input dtype, as
ssl-data-curation's `assign_clusters`), torch_compile = the same chunk body under torch.compile
(compiling the whole reference would unroll hundreds of chunks), triton = the fused kernel.
"""

from __future__ import annotations

import torch
from fastdino.kernels.kmeans_assign import REF_BLOCK_ELEMS, kmeans_assign, kmeans_assign_ref

from bench.harness import BenchCase
from bench.registry import get

LEVEL1_K = 100_000  # SPEC.md §5 web config: level-1 n_clusters (before the x100 split)
LEVEL1_N = 1 << 20  # ~1M points: one GPU's shard of a curation pool
LEVEL2_K = 16_384
LEVEL2_N = 1 << 18


def _dist2_of(fn):
    def provider(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return fn(x, c)[1]  # dist2 [N]: the differentiable output (the k-means objective)
    return provider


def _chunk_min(xs: torch.Tensor, c: torch.Tensor, cn: torch.Tensor) -> torch.Tensor:
    d = xs.float().square().sum(1, keepdim=True) - 2 * (xs @ c.T).float() + cn  # [n, k]
    return d.min(dim=1).values.clamp_min(0)


_compiled_chunk = torch.compile(_chunk_min, dynamic=False)


def _ref_compiled(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """kmeans_assign_ref's dist2 with its chunk body compiled (one graph, plus one for a ragged
    last chunk)."""
    cn = c.float().square().sum(1)
    rows = max(1, REF_BLOCK_ELEMS // c.shape[0])
    return torch.cat([_compiled_chunk(x[s:s + rows], c, cn) for s in range(0, x.shape[0], rows)])


def _case(name: str, N: int, k: int, D: int, dtype: torch.dtype, shape_from: str) -> BenchCase:
    def make_inputs(device: torch.device, dt: torch.dtype) -> dict:
        g = torch.Generator(device=device).manual_seed(0)
        c = torch.randn(k, D, generator=g, device=device)
        labels = torch.randint(0, k, (N,), generator=g, device=device)
        x = c[labels] + 0.3 * torch.randn(N, D, generator=g, device=device)
        return {"x": x.to(dt).requires_grad_(), "c": c.to(dt).requires_grad_()}

    es = torch.finfo(dtype).bits // 8
    return BenchCase(
        op="kmeans_assign", name=name,
        params={"N": N, "k": k, "D": D, "shape_from": shape_from},
        dtype=dtype, make_inputs=make_inputs,
        providers={"torch": _dist2_of(kmeans_assign_ref), "torch_compile": _ref_compiled,
                   "triton": _dist2_of(kmeans_assign)},
        grad_inputs=["x", "c"],
        bytes_fwd=(N + k) * D * es + N * 12, bytes_bwd=2 * N * D * es + 2 * k * D * 4 + N * 12,
        flops_fwd=2 * N * k * D,
        formula="fwd 2·N·k·D FLOP (x·cᵀ tiles, argmin fused); bwd bytes: read x, gather c_idx, "
                "write dx, index_add dc",
        atol=1e-4)


def cases(quick: bool, on_gpu: bool) -> list[BenchCase]:
    if not on_gpu:  # interpreter-sized: odd N, k, D
        out = [_case("kmeans-cpu-odd", 200, 70, 96, torch.float32, "odd size")]
        if not quick:
            out.append(_case("kmeans-cpu-odd-bf16", 200, 70, 96, torch.bfloat16, "odd size"))
        return out
    d_l, d_s = get("vitl16").embed_dim, get("vits16").embed_dim
    out = [_case(f"kmeans-{LEVEL2_N >> 10}k-k{LEVEL2_K}-D{d_l}", LEVEL2_N, LEVEL2_K, d_l,
                 torch.float16, "level-2-style run, ViT-L embeddings (fp16 as stored)")]
    if quick:
        return out
    out.append(_case(f"kmeans-{LEVEL2_N >> 10}k-k{LEVEL2_K}-D{d_s}-bf16", LEVEL2_N, LEVEL2_K, d_s,
                     torch.bfloat16, "level-2-style run, ViT-S embeddings"))
    out.append(_case(f"kmeans-1M-k100k-D{d_l}", LEVEL1_N, LEVEL1_K, d_l, torch.float16,
                     "SPEC.md §5 level 1 (100k clusters), one ~1M-point shard"))
    return out
