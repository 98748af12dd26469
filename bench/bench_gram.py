"""Gram anchoring loss (kernels/gram.py) against its reference, forward and student backward.

Shapes come from the DINOv3 registry: the student's global crops (2·B per rank) with the patch
grid of the global crop (ViT-L 224: P = 196, D = 1024; 7B 256: P = 256, D = 4096), per image and
batch-flattened (one (2B·P)² Gram), and high-resolution anchoring at ViT-L width (P = 1024 and
4096, i.e. 512 and 1024 px crops) per image, with fewer crops so that the reference's two fp32
P×P Grams per image fit in memory (the kernel itself needs O(P·D)).

Matmul-bound: the metric is TFLOP/s over the FLOPs the kernel's chosen form executes
(`gram.choose_form`): P×P tiles use the symmetry, fwd 2·NB·Pe²·D (two GEMMs on half the tile
pairs), bwd 2·NB·Pe²·D where the forward stores W (Pe <= D: one batched GEMM W ŝ), else
6·NB·Pe²·D (S recomputed on all tile pairs, for a deterministic backward without atomics, +
the gradient GEMM; the `triton_pp_recompute` provider times that path where W is stored;
`triton_row_loop` times the two-pass, one-row-per-program normalisation kernels;
`triton_bwd_gemm_triton` the backward's GEMM (D×D, stored-W P×P) in Triton instead of
torch.bmm / cuBLAS);
D×D: fwd 4·NB·Pe·D² (four GEMMs on the symmetric block pairs), bwd 4·NB·Pe·D².
The fp32 reference computes 4·NB·Pe²·D in the forward on CUDA cores.

Inputs are correlated (t = s + 0.1·noise: the student tracks its Gram teacher), bf16 on GPU; the
truth is the fp64 reference (cancellation), the parity rule DESIGN.md's 2× rule.
"""

from __future__ import annotations

import functools

import torch
from fastdino.kernels.gram import (
    CLAMP_NONE,
    FORM_DD,
    choose_form,
    gram_loss,
    gram_loss_ref,
    stores_w,
)

from bench.harness import BenchCase
from bench.registry import get


def _flops(nb: int, pe: int, d: int) -> tuple[int, int, str]:
    if choose_form(pe, d, CLAMP_NONE) == FORM_DD:
        return 4 * nb * pe * d * d, 4 * nb * pe * d * d, "D×D"
    bwd = 2 if stores_w(pe, d) else 6  # one GEMM from the stored W, or S recomputed + GEMM
    return 2 * nb * pe * pe * d, bwd * nb * pe * pe * d, "P×P"


def _case(name: str, crops: int, p: int, d: int, img_level: bool, dtype: torch.dtype,
          shape_from: str, n_sel: int | None = None, tiles_ab: bool = False) -> BenchCase:
    """n_sel: gram.tokens_used masked | unmasked, i.e. only n_sel of the crops·P patches enter
    the flattened Gram (rows gathered before the kernels; Pe = n_sel)."""
    nb, pe = (crops, p) if img_level else (1, crops * p if n_sel is None else n_sel)
    fwd, bwd, form = _flops(nb, pe, d)

    def make_inputs(device: torch.device, dt: torch.dtype) -> dict:
        g = torch.Generator().manual_seed(0)
        s = torch.randn(crops, p, d, generator=g)
        t = s + 0.1 * torch.randn(crops, p, d, generator=g)
        out = {"student": s.to(device=device, dtype=dt).requires_grad_(),
               "teacher": t.to(device=device, dtype=dt), "img_level": img_level}
        if n_sel is not None:  # which patches does not change the cost: a random sorted subset
            out["rows"] = torch.randperm(crops * p, generator=g)[:n_sel].sort().values.to(device)
        return out

    providers = {"torch": gram_loss_ref, "triton": gram_loss}
    if tiles_ab and dtype != torch.float32:
        # A/B on one card: the 8-warp sm90 tiles next to the 4-warp set the launcher picks (the
        # 8-warp first chained dot repeats its fragments across both warpgroups; gram._pp_gpu);
        # for the D×D backward the sm90 set holds the former 4-warp 64×64 tiles against the
        # launcher's 128×128 GEMM tiles (gram._dd_bwd_gpu)
        providers["triton_sm90_tiles"] = functools.partial(gram_loss, tiles="sm90")
    if tiles_ab and d <= 4096:
        # A/B: the normalisation pre-pass and its backward as one row per program in two passes
        # over D (the only row kernels before 2026-11-26) against the launcher's one-pass,
        # several-rows-per-program kernels (gram._row_config)
        providers["triton_row_loop"] = functools.partial(gram_loss, row_pass="loop")
    if dtype != torch.float32 and (form == "D×D" or stores_w(pe, d)):
        # A/B: the backward's one GEMM (D×D: FE·[M1; M2]; P×P: W ŝ) in the Triton kernels (what
        # ran before) against torch.bmm with fp32 out (cuBLAS), the launcher's default on CUDA
        providers["triton_bwd_gemm_triton"] = functools.partial(gram_loss,
                                                                backward_gemm="triton")
    if form == "P×P" and stores_w(pe, d):
        # A/B: the P×P backward that recomputes S tile by tile (what ran before W was stored)
        providers["triton_pp_recompute"] = functools.partial(gram_loss, pp_backward="recompute")
    return BenchCase(
        op="gram_loss", name=name,
        params={"crops": crops, "P": p, "D": d, "img_level": img_level, "form": form,
                "shape_from": shape_from, "rows": n_sel},
        dtype=dtype, make_inputs=make_inputs,
        providers=providers,
        grad_inputs=["student"],
        flops_fwd=fwd, flops_bwd=bwd,
        formula="P×P: fwd 2·NB·Pe²·D, bwd 2·NB·Pe²·D (W stored, Pe <= D) or 6·NB·Pe²·D; "
                "D×D: fwd 4·NB·Pe·D² (symmetric pairs), bwd 4·NB·Pe·D² "
                "(NB = crops, Pe = P per image; NB = 1, Pe = crops·P flattened, or the "
                "selected rows with tokens_used masked | unmasked)",
        reference_dtype=torch.float64,
        # bf16 operands: the kernel's S carries ~2⁻⁸ relative error, ~1e-7 of a ~3e-4 loss here,
        # while the harness' torch baseline upcasts to fp32 (the official .float()): hence atol
        atol=1e-7 if dtype == torch.float32 else 1e-6,
    )


def cases(quick: bool, on_gpu: bool) -> list[BenchCase]:
    if not on_gpu:  # interpreter-sized: 2 crops of a 6x6 grid, 64 channels
        out = [_case("cpu-tiny-img", 2, 36, 64, True, torch.float32, "tiny"),
               _case("cpu-tiny-flat", 2, 36, 64, False, torch.float32, "tiny"),
               _case("cpu-tiny-masked", 2, 36, 64, False, torch.float32, "tiny", n_sel=20)]
        if not quick:
            out.append(_case("cpu-tiny-img-bf16", 2, 36, 64, True, torch.bfloat16, "tiny"))
        return out
    vitl, v7b = get("vitl16"), get("vit7b16")
    out = []
    for s in ([vitl] if quick else [vitl, v7b]):
        crops = 2 * s.batch_per_gpu
        for img_level in (True, False):
            out.append(_case(f"{s.name}-{s.global_size}-{'img' if img_level else 'flat'}", crops,
                             s.global_patches, s.embed_dim, img_level, torch.bfloat16, s.name,
                             tiles_ab=True))
    # tokens_used: the iBOT-masked patches of the 2B global crops (the v3 collate's exact count)
    # and the rest, flattened (img_level false)
    crops, n_all = 2 * vitl.batch_per_gpu, 2 * vitl.batch_per_gpu * vitl.global_patches
    sel = [("masked", vitl.ibot_rows)] + ([] if quick else [("unmasked", n_all - vitl.ibot_rows)])
    for kind, n_sel in sel:
        out.append(_case(f"vitl16-{vitl.global_size}-{kind}", crops, vitl.global_patches,
                         vitl.embed_dim, False, torch.bfloat16, f"vitl16, tokens_used {kind}",
                         n_sel=n_sel))
    hr = [(512, 32), (1024, 8)]  # both in --quick: the P >= 1024 targets
    for side, crops in hr:  # high-res anchoring at ViT-L width; crops sized for the reference
        out.append(_case(f"vitl16-{side}-img", crops, (side // vitl.patch) ** 2, vitl.embed_dim,
                         True, torch.bfloat16, f"vitl16 at {side} px", tiles_ab=True))
    if not quick:  # batch-flattened at high resolution: 8,192 rows, so that the reference's two
        # fp32 Grams stay at 2 x 268 MB (the kernel's cost is the D×D form's, linear in the rows)
        for side, crops in ((512, 8), (1024, 2)):
            out.append(_case(f"vitl16-{side}-flat", crops, (side // vitl.patch) ** 2,
                             vitl.embed_dim, False, torch.bfloat16, f"vitl16 at {side} px"))
    return out
