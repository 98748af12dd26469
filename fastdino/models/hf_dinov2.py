"""Conversion between our DINOv2-architecture backbones (`model.arch: dinov2_*`, learned position
embedding) and Hugging Face's `Dinov2Model` / `Dinov2WithRegistersModel` (transformers 5.x),
proven by output parity in tests/unit/test_dinov2_backbone.py.

    ours                                   HF
    cls_token / storage_tokens             embeddings.cls_token / embeddings.register_tokens
    mask_token [1,D]                       embeddings.mask_token [1,D]
    pos_embed [1,1+M²,D]                   embeddings.position_embeddings
    patch_embed.proj.*                     embeddings.patch_embeddings.projection.*
    blocks.i.attn.qkv [3D,D]               encoder.layer.i.attention.{q,k,v}_proj
    blocks.i.attn.proj                     encoder.layer.i.attention.o_proj
    blocks.i.norm{1,2} / ls{1,2}.gamma     encoder.layer.i.norm{1,2} / layer_scale{1,2}.lambda1
    blocks.i.mlp.fc1/fc2                   encoder.layer.i.mlp.fc1/fc2
    blocks.i.mlp.w1/w2/w3                  encoder.layer.i.mlp.gate_proj/up_proj/down_proj
    norm.*                                 layernorm.*

On disk (and on the hub) transformers keeps its 4.x names (`attention.attention.query`,
`attention.output.dense`, the fused SwiGLU `mlp.weights_in` / `weights_out`): both are read.
HF resizes the position table by size (no offset), with antialias for the register models:
a backbone built from an HF config takes those settings, so it computes what HF computes.
"""

from __future__ import annotations

import re

import torch

from fastdino.layers.ffn_layers import swiglu_hidden_dim
from fastdino.models.hf_convert import rename_block_key
from fastdino.models.vision_transformer import DinoVisionTransformer

_GLOBAL = {"cls_token": "embeddings.cls_token", "storage_tokens": "embeddings.register_tokens",
           "mask_token": "embeddings.mask_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj",
          "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.w1": "mlp.gate_proj",
          "mlp.w2": "mlp.up_proj", "mlp.w3": "mlp.down_proj"}


def to_hf_dinov2_state_dict(our_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf: dict[str, torch.Tensor] = {}
    for key, value in our_sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if key in _GLOBAL:
            hf[_GLOBAL[key]] = value
        elif m and m.group(2) in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = m.group(2).rsplit(".", 1)[1]
            mask = our_sd.get(f"blocks.{m.group(1)}.attn.qkv.bias_mask")
            if kind == "bias" and mask is not None:
                value = value * mask.to(value.dtype)
            for name, t in zip("qkv", value.chunk(3, dim=0), strict=True):
                hf[f"encoder.layer.{m.group(1)}.attention.{name}_proj.{kind}"] = t
        elif m and m.group(2) == "attn.qkv.bias_mask":
            continue
        elif m and (dst := rename_block_key(m.group(2), _BLOCK)) is not None:
            hf[f"encoder.layer.{m.group(1)}.{dst}"] = value
        else:
            raise KeyError(f"to_hf_dinov2_state_dict: no Hugging Face name for key {key!r}")
    return hf


# the names transformers writes to disk (and the hub holds): its 4.x module names
_SAVED = {"attention.attention.query.": "attention.q_proj.",
          "attention.attention.key.": "attention.k_proj.",
          "attention.attention.value.": "attention.v_proj.",
          "attention.output.dense.": "attention.o_proj.", "mlp.weights_out.": "mlp.down_proj."}


def _in_memory_names(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk Dinov2 names -> the module names of transformers 5 (a no-op on those): the
    attention projections, and the fused SwiGLU `mlp.weights_in` [2H, D] (gate half first)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_sd.items():
        key = key.removeprefix("dinov2.")
        if ".mlp.weights_in." in key:
            gate, up = value.chunk(2, dim=0)
            out[key.replace(".weights_in.", ".gate_proj.")] = gate
            out[key.replace(".weights_in.", ".up_proj.")] = up
            continue
        for old, new in _SAVED.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def from_hf_dinov2_state_dict(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Dinov2 / Dinov2WithRegisters state dict (in-memory or on-disk names) -> ours."""
    inverse_global = {v: k for k, v in _GLOBAL.items()}
    inverse_block = {v: k for k, v in _BLOCK.items()}
    ours: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in _in_memory_names(hf_sd).items():
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
        a = re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", m.group(2)) if m else None
        if key in inverse_global:
            if key == "embeddings.register_tokens" and value.shape[1] == 0:
                continue
            ours[inverse_global[key]] = value
        elif a:
            qkv.setdefault((m.group(1), a.group(2)), {})[a.group(1)] = value
        elif m and (dst := rename_block_key(m.group(2), inverse_block)) is not None:
            ours[f"blocks.{m.group(1)}.{dst}"] = value
        else:
            raise KeyError(f"from_hf_dinov2_state_dict: no fastdino name for key {key!r}")
    for (i, kind), parts in qkv.items():
        ours[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in "qkv"])
    return ours


def _mlp_ratio(backbone: DinoVisionTransformer) -> tuple[int, bool]:
    """(HF mlp_ratio, use_swiglu_ffn). HF's config takes an integer ratio; its SwiGLU width is
    (int(D·r·2/3) + 7) // 8 · 8 (the released ViT-g: r = 4 -> 4096)."""
    mlp, D = backbone.blocks[0].mlp, backbone.embed_dim
    swiglu = not hasattr(mlp, "fc1")
    hidden = mlp.w1.out_features if swiglu else mlp.fc1.out_features
    for r in range(1, 65):
        if (swiglu_hidden_dim(D * r, 8) if swiglu else D * r) == hidden:
            return r, swiglu
    raise ValueError(f"the FFN width {hidden} at D = {D} is no integer mlp_ratio of Hugging "
                     "Face's Dinov2 config: the backbone cannot be written as a Dinov2Model")


def hf_dinov2_config_from_backbone(backbone: DinoVisionTransformer):
    """A Dinov2Config (no registers) or Dinov2WithRegistersConfig describing `backbone`."""
    import transformers

    ratio, swiglu = _mlp_ratio(backbone)
    grid = int(round((backbone.pos_embed.shape[1] - 1) ** 0.5))
    qkv = backbone.blocks[0].attn.qkv
    fields = dict(hidden_size=backbone.embed_dim, num_hidden_layers=backbone.n_blocks,
                  num_attention_heads=backbone.num_heads, mlp_ratio=ratio,
                  use_swiglu_ffn=swiglu, patch_size=backbone.patch_size,
                  image_size=grid * backbone.patch_size, layer_norm_eps=backbone.norm.eps,
                  qkv_bias=qkv.bias is not None,
                  layerscale_value=float(backbone.blocks[0].ls1.init_values))
    if backbone.n_storage_tokens > 0:
        return transformers.Dinov2WithRegistersConfig(
            num_register_tokens=backbone.n_storage_tokens, **fields)
    return transformers.Dinov2Config(**fields)


def hf_resize_difference(backbone: DinoVisionTransformer) -> str | None:
    """One line saying how Hugging Face's Dinov2Model / Dinov2WithRegistersModel (which the
    export picks by `n_storage_tokens`) resizes the position table differently from `backbone`
    (HF: by size, no offset; antialias only in the register models; neither is a config field,
    so the export cannot carry the backbone's), or None when both resize alike. They agree at the
    trained grid (the table untouched) and differ at every other input resolution."""
    offset = float(getattr(backbone, "interpolate_offset", 0.0))
    antialias = bool(getattr(backbone, "interpolate_antialias", False))
    hf_antialias = backbone.n_storage_tokens > 0
    if offset == 0 and antialias == hf_antialias:
        return None
    cls = "Dinov2WithRegistersModel" if hf_antialias else "Dinov2Model"
    grid = int(round((backbone.pos_embed.shape[1] - 1) ** 0.5))
    on_off = {True: "on", False: "off"}
    return (f"export --format hf: the teacher resizes its position table with interpolate_offset="
            f"{offset:g} (antialias {on_off[antialias]}), Hugging Face's {cls} by size without "
            f"offset (antialias {on_off[hf_antialias]}): outputs match at the trained "
            f"{grid} x {grid} grid ({grid * backbone.patch_size} px) and differ at other "
            "resolutions (the official-format export keeps the teacher's rule)")


def backbone_from_hf_dinov2_config(hf_config, **kwargs) -> DinoVisionTransformer:
    """Our DINOv2-architecture backbone for a Dinov2 / Dinov2WithRegisters config (weights:
    `from_hf_dinov2_state_dict`), with HF's position-table resize (by size; antialiased for the
    register models)."""
    registers = getattr(hf_config, "num_register_tokens", 0)
    patch = hf_config.patch_size if isinstance(hf_config.patch_size, int) else \
        hf_config.patch_size[0]
    image = hf_config.image_size if isinstance(hf_config.image_size, int) else \
        hf_config.image_size[0]
    args = dict(patch_size=patch, in_chans=hf_config.num_channels,
                embed_dim=hf_config.hidden_size, depth=hf_config.num_hidden_layers,
                num_heads=hf_config.num_attention_heads, ffn_ratio=float(hf_config.mlp_ratio),
                ffn_layer="swiglu" if hf_config.use_swiglu_ffn else "mlp",
                qkv_bias=hf_config.qkv_bias, mask_k_bias=False,
                layerscale_init=hf_config.layerscale_value, norm_eps=hf_config.layer_norm_eps,
                n_storage_tokens=registers, pos_embed="learned", pos_embed_grid=image // patch,
                interpolate_offset=0.0,
                interpolate_antialias=hf_config.model_type == "dinov2_with_registers")
    args.update(kwargs)
    return DinoVisionTransformer(**args)
