"""KoLeo benchmark cases (KERNELS.md §4, issue 6): the per-rank loss with both global crops batched
into one launch (G = 2 groups of B rows), and one gathered group of W·B rows (the distributed
variant's upper bound, where the op becomes GEMM-bound).

    fwd FLOPs = 2·G·B·B·D (the x·xᵀ tiles; the argmax, distance and log are O(G·B·D))
    bwd bytes = 4·G·B·D·es (the split path's sorted-chooser backward: own rows, their neighbours
                and the chooser rows read, dx written; O(n·D), memory-bound). The fused path's
                masked chooser product at B <= 256 is launch-bound: its time, not a metric, counts.

Providers: `triton` is koleo_loss with path="auto" (groups of <= SMALL_MAX_N rows: the small path,
split-K forward + one-step chooser backward; larger ones: the cost model in kernels/koleo.py picks
fused or split per half; `extra.path_auto` records the choice on this GPU). The per-rank cases also
time `triton_old` (path="fused": the one-program-per-row-block forward and the large-group
backward tiles, what auto ran there before the small path: the A/B) and `triton_ks1` (the small
path with one K split: no split-K ticket), the gathered cases
`triton_fused` (the one-launch kernels forced) so one run compares the paths on the same GPU, and
the 4096-row case the `gemm_bf16` peer (x·xᵀ + sum), the issue's yardstick.
At B <= 256 the op is launch-bound: the harness times it with CUDA graphs (do_bench_cudagraph,
chosen for ops under 50 µs) so that launch overhead counts as in a compiled, graph-captured step.
"""

from __future__ import annotations

import torch
from fastdino.kernels import koleo
from fastdino.kernels.koleo import _pick, koleo_loss, koleo_loss_ref

from bench.harness import BenchCase
from bench.registry import get

GATHER_RANKS = (4, 64)  # W of the gathered batches: 4 x 64 = 256, 64 x 64 = 4096 rows


def _gemm_peer(x: torch.Tensor) -> torch.Tensor:
    """A bf16 GEMM of the same shape (x·xᵀ per group) plus a sum: the issue's B = 4096 yardstick."""
    return torch.bmm(x, x.transpose(1, 2)).float().sum(dim=(1, 2))


def _fused(x: torch.Tensor) -> torch.Tensor:
    return koleo_loss(x, path="fused")


def _small_one_split(x: torch.Tensor) -> torch.Tensor:
    """The small path with one K split (koleo.SMALL_SPLITS = 1): no split-K ticket, one program
    per 16 query rows walks all of D; the A/B of the split-K heuristic at the per-rank shapes."""
    old = koleo.SMALL_SPLITS
    koleo.SMALL_SPLITS = 1
    try:
        return koleo_loss(x, path="small")
    finally:
        koleo.SMALL_SPLITS = old


def _path_auto(G: int, B: int, D: int, dtype: torch.dtype) -> str | None:
    if not torch.cuda.is_available():
        return None
    fwd, bwd = _pick("auto", G, B, B, D, dtype, torch.device("cuda"))
    return f"fwd {fwd}, bwd {bwd}"


def _case(name: str, G: int, B: int, D: int, dtype: torch.dtype, shape_from: str,
          gemm_peer: bool = False, fused_peer: bool = False, old_peer: bool = False
          ) -> BenchCase:
    def make_inputs(device: torch.device, dt: torch.dtype) -> dict:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(G, B, D, generator=g).to(device=device, dtype=dt)  # no ties
        return {"x": x.requires_grad_()}

    providers = {"torch": koleo_loss_ref, "triton": koleo_loss}
    if fused_peer:
        providers["triton_fused"] = _fused
    if old_peer:
        providers["triton_old"] = _fused  # the path auto took at B <= 256 before the small one
        providers["triton_ks1"] = _small_one_split
    if gemm_peer:
        providers["gemm_bf16"] = _gemm_peer
    es = torch.finfo(dtype).bits // 8
    flops = 2 * G * B * B * D
    return BenchCase(
        op="koleo", name=name, params={"G": G, "B": B, "D": D, "shape_from": shape_from},
        dtype=dtype, make_inputs=make_inputs, providers=providers, grad_inputs=["x"],
        bytes_bwd=4 * G * B * D * es, flops_fwd=flops,
        formula="fwd 2·G·B²·D FLOP (x·xᵀ tiles); bwd 4·G·B·D·es bytes (sorted choosers)",
        atol=1e-5,
        extra={"path_auto": _path_auto(G, B, D, dtype),
               "timing": "launch-bound at B <= 256: compare with CUDA graphs (do_bench_cudagraph), "
                         "the harness picks them for ops under 50 µs",
               "gemm_bf16": "peer = one bf16 x·xᵀ GEMM of the same shape (+ sum), the issue's "
                            "B = 4096 yardstick" if gemm_peer else None})


def cases(quick: bool, on_gpu: bool) -> list[BenchCase]:
    if not on_gpu:  # interpreter-sized: odd B and D, both dtypes unless quick
        out = [_case("koleo-cpu-odd", 2, 17, 96, torch.float32, "odd size", old_peer=True)]
        if not quick:
            out.append(_case("koleo-cpu-odd-bf16", 2, 17, 96, torch.bfloat16, "odd size",
                             old_peer=True))
        return out
    # D from the ViT-S / ViT-L / ViT-7B embed dims; per-rank B from the 7B (16) and S/L (64)
    # recipes;
    # gathered B = W x 64 for W in GATHER_RANKS
    dims = [get(m).embed_dim for m in ("vits16", "vitl16", "vit7b16")]
    per_rank = sorted({get("vit7b16").batch_per_gpu, get("vitl16").batch_per_gpu})
    b64 = get("vitl16").batch_per_gpu
    gathered = [w * b64 for w in GATHER_RANKS]
    if quick:
        dims, per_rank, gathered = dims[1:2], per_rank[-1:], gathered[-1:]
    out = []
    for D in dims:
        for B in per_rank:
            out.append(_case(f"koleo-B{B}-D{D}", 2, B, D, torch.bfloat16, "per rank, 2 crops",
                             old_peer=True))
        for B in gathered:
            big = B >= 4096
            out.append(_case(f"koleo-gathered{B}-D{D}", 1 if big else 2, B, D, torch.bfloat16,
                             f"gathered W={B // b64} x {b64}", gemm_peer=big, fused_peer=True))
    return out
