"""The whole student backbone (no DINO / iBOT heads), forward + backward on the multi-crop list
input, per attention backend and kernels.impl: the issue-8 yardstick "whole-student fwd+bwd
>= 1.3x faster than the same model on plain SDPA with per-crop calls".

Shapes (bench/registry.py): B = batch_per_gpu images (64 for ViT-S/B/L), each 2 global crops of
224 px (201 tokens: CLS + 4 registers + 14²) and 8 local crops of 96 px (41 tokens: + 6²), as the
list [global [2B, 3, 224, 224], local [8B, 3, 96, 96]] that the student gets
(vision_transformer.forward_features_list). Built by build_backbone(ModelConfig(arch, ...),
kernels_impl=...), in training mode: RoPE draws its coordinate rescale per block and per crop
type as in training (seeded per call, so every provider sees the same draws), drop path 0 (every
sample in every block; the FLOP model below is then exact), no iBOT masks, LayerScale gamma = 1
(at 1e-5 the blocks would hardly touch the tokens and --check would see nothing), fp32 parameters
under bf16 autocast on the GPU (fp32 without autocast on CPU, where the cases are tiny). The output
is the normed CLS and patch tokens of both crop types, [rows, D] (what the heads read); the
backward also produces the images' gradient (the --check quantity; one conv's input gradient,
< 0.1 % of the FLOPs). No optimizer, no heads, no losses: bench step covers the whole step.

Metric: TFLOP/s by fastdino.profile's model (vit_flops: patch embed + per block qkv, q·kᵀ, P·v,
proj, FFN; 2 FLOPs per multiply-add; backward = 2 × forward); images/s = B / time, printed by
`python -m bench.bench_student --summary FILE.jsonl` with the speedup over `sdpa`.

Providers (attn_impl, kernels_impl):
    torch          torch, torch      the fp32 reference attention (tests; the --check truth)
    sdpa           sdpa, torch       DINOv3's own path: one SDPA call per crop type, eager RoPE
                                     (the baseline of the 1.3x target)
    triton         auto, triton      fastdino's GPU default: flash-attn varlen over all crops when
                                     installed (else SDPA per crop type) + fused Triton RoPE (the
                                     numerator of the target; what the harness's --check judges)
    torch_compile  sdpa, torch       + model.compile (per-block torch.compile), the official
                                     DINOv3 setup
    flash_attn     flash_attn, torch packed varlen (only when flash-attn imports)
    sdpa_triton    sdpa, triton      (full sweep)
    auto           auto, torch       (full sweep)
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

import torch

from bench import results
from bench.harness import BenchCase
from bench.registry import DinoShape, get
from fastdino.config import ModelConfig
from fastdino.layers.attn_backend import flash_attn_available
from fastdino.models.backbones import build_backbone
from fastdino.profile import vit_flops

LOW_PRECISION = (torch.bfloat16, torch.float16)
TARGET_SPEEDUP = 1.3  # issue 8 item 7: triton fwd+bwd >= 1.3x sdpa's
BASELINE, OURS = "sdpa", "triton"

# registry shape -> backbone arch (fastdino/models/backbones.py ARCH_TABLE)
ARCH = {"vits16": "vit_small", "vitb16": "vit_base", "vitl16": "vit_large", "vit7b16": "vit_7b"}

# provider -> (attn_impl, kernels_impl, model.compile)
VARIANTS = {
    "torch": ("torch", "torch", False),
    "sdpa": ("sdpa", "torch", False),
    "triton": ("auto", "triton", False),
    "torch_compile": ("sdpa", "torch", True),
    "flash_attn": ("flash_attn", "torch", False),
    "sdpa_triton": ("sdpa", "triton", False),
    "auto": ("auto", "torch", False),
}
QUICK = ("torch", "sdpa", "triton", "torch_compile", "flash_attn")


def model_config(arch: str, attn_impl: str, compiled: bool) -> ModelConfig:
    # bf16 RoPE: the training default (Config.validate resolves null to it), as the trainer runs
    return ModelConfig(arch=arch, attn_impl=attn_impl, compile=compiled, drop_path_rate=0.0,
                       layerscale_init=1.0, pos_embed_rope_dtype="bf16")


def student_flops(arch: str, images: int, global_size: int, local_size: int, n_local: int
                  ) -> int:
    """Forward FLOPs of the backbone on the student's crops of `images` images."""
    cfg = ModelConfig(arch=arch)
    return (vit_flops(cfg, global_size, 2 * images)
            + vit_flops(cfg, local_size, n_local * images))


def _autocast(x: torch.Tensor):
    if x.dtype in LOW_PRECISION:
        return torch.autocast(x.device.type, dtype=x.dtype)
    return nullcontext()


def provider(name: str):
    def run(images_global, images_local, models) -> torch.Tensor:
        model = models[name]
        model.zero_grad(set_to_none=True)  # a training step starts from empty grads
        torch.manual_seed(0)  # the same RoPE rescale draws for every provider and call
        with _autocast(images_global):
            outs = model.forward_features_list([images_global, images_local], [None, None])
        return torch.cat([t for o in outs for t in
                          (o["x_norm_clstoken"], o["x_norm_patchtokens"].flatten(0, 1))])
    return run


def student_case(name: str, s: DinoShape, arch: str, images: int, global_size: int,
                 local_size: int, dtype: torch.dtype, variants: list[str], shape_from: str
                 ) -> BenchCase:
    unsupported = {}
    if "flash_attn" in variants and not flash_attn_available():
        unsupported["flash_attn"] = "neither flash_attn_interface (FA3) nor flash_attn importable"
    elif "flash_attn" in variants and dtype not in LOW_PRECISION:
        unsupported["flash_attn"] = f"flash-attn needs fp16/bf16, the case is {dtype}"
    variants = [v for v in variants if v not in unsupported]

    def make_inputs(device: torch.device, dt: torch.dtype) -> dict:
        models, ref = {}, None
        for prov in variants:
            attn_impl, kernels_impl, compiled = VARIANTS[prov]
            torch.manual_seed(0)
            m = build_backbone(model_config(arch, attn_impl, compiled), device=device,
                               kernels_impl=kernels_impl)
            if ref is None:
                ref = m.state_dict()
            else:
                m.load_state_dict(ref)
            models[prov] = m.train()
        g = torch.Generator().manual_seed(1)
        ig = torch.randn(2 * images, 3, global_size, global_size, generator=g)
        il = torch.randn(s.n_local * images, 3, local_size, local_size, generator=g)
        return {"images_global": ig.to(device=device, dtype=dt).requires_grad_(),
                "images_local": il.to(device=device, dtype=dt).requires_grad_(),
                "models": models}

    p = s.patch
    prefix = 1 + s.n_storage_tokens
    crops = [[2 * images, prefix + (global_size // p) ** 2],
             [s.n_local * images, prefix + (local_size // p) ** 2]]
    fwd = student_flops(arch, images, global_size, local_size, s.n_local)
    return BenchCase(
        op="student", name=name,
        params={"arch": arch, "images": images, "global_size": global_size,
                "local_size": local_size, "crops": crops,
                "tokens": sum(c * n for c, n in crops), "shape_from": shape_from,
                "variants": {v: dict(zip(("attn_impl", "kernels_impl", "compile"), VARIANTS[v],
                                         strict=True)) for v in variants},
                "unsupported": unsupported, "baseline": BASELINE, "ours": OURS,
                "target_speedup": TARGET_SPEEDUP},
        dtype=dtype, make_inputs=make_inputs, providers={v: provider(v) for v in variants},
        grad_inputs=["images_global", "images_local"],
        flops_fwd=fwd, flops_bwd=2 * fwd,
        formula="fastdino.profile.vit_flops(global, 2B) + vit_flops(local, 8B) "
                "(matmuls incl. q·kᵀ and P·v, 2 FLOPs/MAC); bwd = 2·fwd; img/s = B / time",
        atol=1e-6 if dtype == torch.float32 else 1e-5,
        # fp32 on CPU: SDPA's CPU kernel and the interpreter's RoPE re-associate sums; through
        # 2 blocks + LayerNorm that stays ~1e-6 relative
        rtol=1e-4 if dtype == torch.float32 else 1e-5,
        extra={"check_providers": [v for v in variants if v != "torch"]},
    )


def cases(quick: bool, on_gpu: bool) -> list[BenchCase]:
    if not on_gpu:
        # CPU: vit_test (D 32, 2 blocks, 2 heads), 1 image: 2 global crops of 48 px (3x3 patches,
        # 14 tokens) and 8 local crops of 32 px (2x2, 9 tokens); fp32, Triton RoPE interpreted.
        s = get("vits16")
        variants = ["torch", "sdpa", "triton", "torch_compile"] + (
            [] if quick else ["sdpa_triton", "auto"])
        return [student_case("cpu-vit_test-1img", s, "vit_test", 1, 48, 32, torch.float32,
                             variants, "vit_test, 1 image, 48/32 px crops, registry crop counts")]
    names = ["vits16", "vitb16", "vitl16"]  # smallest first: a time-limited run gets S for sure
    out = []
    for n in names:
        s = get(n)
        variants = [v for v in VARIANTS if v in QUICK or not quick]
        out.append(student_case(f"{n}-student", s, ARCH[n], s.batch_per_gpu, s.global_size,
                                s.local_size, torch.bfloat16, variants,
                                f"{n}, B={s.batch_per_gpu} images"))
    return out


# ------------------------------------------------------------------------------------------------
# Reading a device run: images/s and the speedup over per-crop SDPA.


def summarize(records: list[dict]) -> str:
    rows = [r for r in records if r.get("kind") == "bench" and r.get("op") == "student"
            and r.get("ms")]
    base = {(r["case"], r["mode"]): r["ms"]["median"] for r in rows if r["provider"] == BASELINE}
    lines = [f"{'case':22s} {'provider':14s} {'mode':8s} {'ms':>9s} {'img/s':>8s} {'TFLOP/s':>8s} "
             f"{'x sdpa':>7s}"]
    for r in rows:
        ms = r["ms"]["median"]
        b = base.get((r["case"], r["mode"]))
        sp = b / ms if b else None
        tf = (r.get("metric") or {}).get("value") or 0.0
        mark = ""
        if r["provider"] == OURS and r["mode"] == "fwd+bwd" and sp is not None:
            mark = "  target MET" if sp >= TARGET_SPEEDUP else f"  target {TARGET_SPEEDUP}x missed"
        lines.append(f"{r['case']:22s} {r['provider']:14s} {r['mode']:8s} {ms:9.2f} "
                     f"{r['params']['images'] / (ms * 1e-3):8.1f} {tf:8.1f} "
                     f"{'' if sp is None else f'{sp:7.2f}':>7s}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="summarise student rows of bench results")
    p.add_argument("--summary", required=True, metavar="FILE.jsonl")
    args = p.parse_args(argv)
    print(summarize(results.read_jsonl(args.summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
