"""Backbone factories (SPEC.md §2.1) and `build_backbone(cfg.model)`.

| arch           | D    | depth | heads | FFN               | notes                              |
|----------------|------|-------|-------|-------------------|------------------------------------|
| vit_test       | 32   | 2     | 2     | MLP x4            | unit tests only                    |
| vit_tiny       | 192  | 6     | 3     | MLP x4            | CPU smoke runs (~2.8M params)      |
| vit_small      | 384  | 12    | 6     | MLP x4            | 21.6M                              |
| vit_small_plus | 384  | 12    | 6     | SwiGLU r6 align 8 | 28.7M                              |
| vit_base       | 768  | 12    | 12    | MLP x4            | 85.7M                              |
| vit_large      | 1024 | 24    | 16    | MLP x4            | 303M                               |
| vit_large_plus | 1024 | 24    | 16    | SwiGLU r6 align 8 | 404M (hub dinov3_vitl16plus)       |
| vit_huge_plus  | 1280 | 32    | 20    | SwiGLU r6 align 8 | 841M                               |
| vit_7b         | 4096 | 40    | 32    | SwiGLU r3 align64 | 6716M, no qkv bias, local_cls_norm |

Patch 16, 4 storage tokens, LayerScale 1e-5, LN eps 1e-5, RoPE base 100 for all (released models).
RoPE dtype: the factories build fp32 RoPE (the official hub's inference setting); build_backbone
takes `model.pos_embed_rope_dtype` (bf16 in a validated training config, the official trainer's;
null, a model section read for evaluation or export, is fp32).
dinov2_vits14 / vitb14 / vitl14 / vitg14: the DINOv2 backbones (patch 14, learned positions).
"""

from __future__ import annotations

from typing import Any

from fastdino.models.vision_transformer import DinoVisionTransformer

_DINOV2 = {"patch_size": 14, "n_storage_tokens": 0, "norm_eps": 1e-6, "mask_k_bias": False,
           "pos_embed": "learned"}

# arch -> (embed_dim, depth, num_heads, ffn_layer, ffn_ratio, extra official kwargs)
ARCH_TABLE: dict[str, tuple[int, int, int, str, float, dict[str, Any]]] = {
    "vit_test": (32, 2, 2, "mlp", 4.0, {}),
    "vit_tiny": (192, 6, 3, "mlp", 4.0, {}),
    "vit_small": (384, 12, 6, "mlp", 4.0, {}),
    "vit_small_plus": (384, 12, 6, "swiglu", 6.0, {}),
    "vit_base": (768, 12, 12, "mlp", 4.0, {}),
    "vit_large": (1024, 24, 16, "mlp", 4.0, {}),
    "vit_large_plus": (1024, 24, 16, "swiglu", 6.0, {}),  # hubconf's dinov3_vitl16plus
    "vit_huge_plus": (1280, 32, 20, "swiglu", 6.0, {}),
    "vit_7b": (4096, 40, 32, "swiglu64", 3.0,
               {"qkv_bias": False, "untie_global_and_local_cls_norm": True}),
    # DINOv2 (SPEC.md §2.6): patch 14, learned absolute positions, no key-bias mask, LN eps 1e-6,
    # no registers (the _reg4 checkpoints: n_storage_tokens 4, offset 0, antialias); ViT-g's
    # fused SwiGLU (w12 + w3) with hidden (int(6144·2/3) + 7) // 8 · 8 = 4096
    "dinov2_vits14": (384, 12, 6, "mlp", 4.0, _DINOV2),
    "dinov2_vitb14": (768, 12, 12, "mlp", 4.0, _DINOV2),
    "dinov2_vitl14": (1024, 24, 16, "mlp", 4.0, _DINOV2),
    "dinov2_vitg14": (1536, 40, 24, "swiglu", 4.0, _DINOV2),
}


def _make(arch: str, **kwargs) -> DinoVisionTransformer:
    D, depth, heads, ffn, ratio, extra = ARCH_TABLE[arch]
    args = dict(embed_dim=D, depth=depth, num_heads=heads, ffn_layer=ffn, ffn_ratio=ratio,
                patch_size=16, n_storage_tokens=4, layerscale_init=1e-5, norm_eps=1e-5,
                rope_base=100.0, rope_rescale=2.0, mask_k_bias=True)
    args.update(extra)
    args.update(kwargs)
    return DinoVisionTransformer(**args)


def vit_test(**kwargs) -> DinoVisionTransformer:
    return _make("vit_test", **kwargs)


def vit_tiny(**kwargs) -> DinoVisionTransformer:
    return _make("vit_tiny", **kwargs)


def vit_small(**kwargs) -> DinoVisionTransformer:
    return _make("vit_small", **kwargs)


def vit_small_plus(**kwargs) -> DinoVisionTransformer:
    return _make("vit_small_plus", **kwargs)


def vit_base(**kwargs) -> DinoVisionTransformer:
    return _make("vit_base", **kwargs)


def vit_large(**kwargs) -> DinoVisionTransformer:
    return _make("vit_large", **kwargs)


def vit_large_plus(**kwargs) -> DinoVisionTransformer:
    return _make("vit_large_plus", **kwargs)


def vit_huge_plus(**kwargs) -> DinoVisionTransformer:
    return _make("vit_huge_plus", **kwargs)


def vit_7b(**kwargs) -> DinoVisionTransformer:
    return _make("vit_7b", **kwargs)


def dinov2(arch: str, **kwargs) -> DinoVisionTransformer:
    """A DINOv2 backbone by arch name (dinov2_vits14 ... dinov2_vitg14)."""
    return _make(arch, **kwargs)


def build_backbone(model_cfg, *, device=None, kernels_impl: str = "torch",
                   fuse_pointwise: bool = False) -> DinoVisionTransformer:
    """Backbone of `model_cfg` (a fastdino.config.ModelConfig). None overrides keep the arch's
    value; every other field of the config is applied as given (so a config's `qkv_bias: true`
    wins over ViT-7B's official `false`: the 7B presets set it explicitly). On the meta device
    the model is left uninitialised (call `to_empty` then `init_weights()`). `kernels_impl`
    (config `kernels.impl`) picks the fused Triton RoPE (kernels/rope.py) or the reference;
    `fuse_pointwise` (config `kernels.fuse_pointwise`, off by default) also routes each block's
    ls1 + residual + norm2 (kernels/layernorm_residual.py) and SwiGLU gate (kernels/swiglu.py)
    through Triton where `kernels_impl` allows it."""
    from fastdino.models.convnext import CONVNEXT_ARCHS, build_convnext

    if model_cfg.arch in CONVNEXT_ARCHS:  # a distillation student (models/convnext.py)
        return build_convnext(model_cfg.arch, patch_size=model_cfg.patch_size,
                              drop_path_rate=model_cfg.drop_path_rate,
                              activation_checkpointing=model_cfg.activation_checkpointing,
                              device=device)
    if model_cfg.arch not in ARCH_TABLE:
        raise ValueError(f"model.arch = {model_cfg.arch!r} is invalid: allowed is one of "
                         + " | ".join([*ARCH_TABLE, *CONVNEXT_ARCHS]))
    overrides = {k: getattr(model_cfg, k) for k in
                 ("embed_dim", "depth", "num_heads", "ffn_layer", "ffn_ratio")
                 if getattr(model_cfg, k) is not None}
    model = _make(
        model_cfg.arch, **overrides,
        patch_size=model_cfg.patch_size,
        n_storage_tokens=model_cfg.n_storage_tokens,
        qkv_bias=model_cfg.qkv_bias,
        mask_k_bias=model_cfg.mask_k_bias,
        layerscale_init=model_cfg.layerscale_init,
        norm_eps=model_cfg.norm_eps,
        drop_path_rate=model_cfg.drop_path_rate,
        rope_base=model_cfg.rope_base,
        rope_rescale=model_cfg.rope_rescale,
        # null (a model section read for evaluation / export): fp32, the official hub's
        rope_dtype=getattr(model_cfg, "pos_embed_rope_dtype", None) or "fp32",
        untie_global_and_local_cls_norm=model_cfg.untie_global_and_local_cls_norm,
        # the official option; a config without the field (ModelConfig has none yet) keeps it off
        untie_cls_and_patch_norms=getattr(model_cfg, "untie_cls_and_patch_norms", False),
        attn_impl=model_cfg.attn_impl,
        activation_checkpointing=model_cfg.activation_checkpointing,
        pos_embed_grid=model_cfg.pos_embed_grid,
        interpolate_offset=model_cfg.interpolate_offset,
        interpolate_antialias=model_cfg.interpolate_antialias,
        **({} if model_cfg.pos_embed is None else {"pos_embed": model_cfg.pos_embed}),
        device=device,
    )
    for blk in model.blocks:
        blk.attn.kernels_impl = kernels_impl
        blk.set_pointwise_fusion(kernels_impl, fuse_pointwise)
    if model_cfg.compile:
        compile_blocks(model, model_cfg.compile_backend, model_cfg.compile_fallback)
    return model


def compile_blocks(model: DinoVisionTransformer, backend: str, fallback: bool) -> None:
    """torch.compile each block in place (per block, as the official code: after the activation
    checkpointing wrap, so the recomputation is compiled too). With `fallback` a block whose
    compile fails runs eagerly with a warning instead of stopping the run (dynamo's
    suppress_errors: a process-wide switch; the math is the same either way)."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"model.compile_backend = {backend!r} is not a torch.compile backend: "
                         f"allowed is one of {' | '.join(sorted(known))}")
    torch._dynamo.config.suppress_errors = fallback
    for blk in model.blocks:
        blk.compile(backend=backend)
