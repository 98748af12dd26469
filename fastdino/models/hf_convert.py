"""Conversion between our (= official DINOv3) backbone state dict and Hugging Face's
`transformers.DINOv3ViTModel` (SPEC.md §4), proven by output parity in tests/unit/test_hf_parity.py.

    ours                                   HF (transformers 5.x; 4.x had no `model.` prefix)
    cls_token [1,1,D]                      embeddings.cls_token
    storage_tokens [1,n,D]                 embeddings.register_tokens
    mask_token [1,D]                       embeddings.mask_token [1,1,D]
    patch_embed.proj.*                     embeddings.patch_embeddings.*
    rope_embed.periods [d_h/4]             (none: HF recomputes inv_freq = 1/periods from rope_theta
                                           in fp32; bf16-rounded periods, a bf16 run's or the
                                           released files', cannot travel: logged on export)
    blocks.i.attn.qkv.weight [3D,D]        model.layer.i.attention.{q,k,v}_proj.weight
    blocks.i.attn.qkv.bias * bias_mask     ...{q,v}_proj.bias (k bias dropped: masked to zero)
    blocks.i.attn.proj.*                   model.layer.i.attention.o_proj.*
    blocks.i.ls{1,2}.gamma                 model.layer.i.layer_scale{1,2}.lambda1
    blocks.i.norm{1,2}.*                   model.layer.i.norm{1,2}.*
    blocks.i.mlp.fc1/fc2                   model.layer.i.mlp.up_proj/down_proj
    blocks.i.mlp.w1/w2/w3                  model.layer.i.mlp.gate_proj/up_proj/down_proj
    norm.*                                 norm.*
    local_cls_norm.*                       (none: training-only, dropped)

transformers is imported lazily (it is an optional extra).
"""

from __future__ import annotations

import logging
import re

import torch

from fastdino.layers.ffn_layers import ffn_for_width
from fastdino.layers.rope_position_encoding import periods_shift_note
from fastdino.models.vision_transformer import DinoVisionTransformer

logger = logging.getLogger("fastdino.models")

HF_LAYER_PREFIX = "model.layer."

_BLOCK_RENAMES = {  # ours (after "blocks.i.") -> HF (after "<layer prefix>i.")
    "norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj",
    "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj",
    "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.up_proj", "mlp.w3": "mlp.down_proj",
}
_GLOBAL_RENAMES = {
    "cls_token": "embeddings.cls_token", "storage_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
    "norm.weight": "norm.weight", "norm.bias": "norm.bias",
}
_DROPPED = ("rope_embed.periods", "local_cls_norm.weight", "local_cls_norm.bias")


def rename_block_key(rest: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    return None


def to_hf_state_dict(our_sd: dict[str, torch.Tensor], *, layer_prefix: str = HF_LAYER_PREFIX
                     ) -> dict[str, torch.Tensor]:
    """Our backbone state dict -> `DINOv3ViTModel` state dict (the FFN kind is read from the keys,
    fc1 vs w1). `layer_prefix="layer."` gives the transformers 4.x names. Unknown keys raise."""
    hf: dict[str, torch.Tensor] = {}
    for key, value in our_sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if key in _GLOBAL_RENAMES:
            hf[_GLOBAL_RENAMES[key]] = value
        elif key == "mask_token":
            hf["embeddings.mask_token"] = value.reshape(1, 1, -1)
        elif key in _DROPPED:
            continue
        elif m and m.group(2) == "attn.qkv.weight":
            q, k, v = value.chunk(3, dim=0)
            for name, t in zip("qkv", (q, k, v), strict=True):
                hf[f"{layer_prefix}{m.group(1)}.attention.{name}_proj.weight"] = t
        elif m and m.group(2) == "attn.qkv.bias":
            mask = our_sd.get(f"blocks.{m.group(1)}.attn.qkv.bias_mask")
            bias = value * mask.to(value.dtype) if mask is not None else value
            q, k, v = bias.chunk(3, dim=0)
            names = ("q", "v") if mask is not None else ("q", "k", "v")
            for name, t in zip("qkv", (q, k, v), strict=True):
                if name in names:
                    hf[f"{layer_prefix}{m.group(1)}.attention.{name}_proj.bias"] = t
        elif m and m.group(2) == "attn.qkv.bias_mask":
            continue
        elif m and (dst := rename_block_key(m.group(2), _BLOCK_RENAMES)) is not None:
            hf[f"{layer_prefix}{m.group(1)}.{dst}"] = value
        else:
            raise KeyError(f"to_hf_state_dict: no Hugging Face name for key {key!r}")
    if "embeddings.register_tokens" not in hf:  # HF keeps a [1, 0, D] parameter
        d = hf["embeddings.cls_token"].shape[-1]
        hf["embeddings.register_tokens"] = hf["embeddings.cls_token"].new_zeros(1, 0, d)
    return hf


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """`DINOv3ViTModel` state dict (with or without the `model.` prefix of transformers 5) and its
    config -> our backbone state dict (with `rope_embed.periods` and, when the HF model has no key
    bias, `qkv.bias_mask`)."""
    ours: dict[str, torch.Tensor] = {}
    inverse_global = {v: k for k, v in _GLOBAL_RENAMES.items()}
    gated = bool(hf_config.use_gated_mlp)
    inverse_block = {v: k for k, v in _BLOCK_RENAMES.items()
                     if k.startswith("mlp.w") == gated or not k.startswith("mlp.")}
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in hf_sd.items():
        m = re.fullmatch(r"(?:model\.)?layer\.(\d+)\.(.+)", key)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif key == "embeddings.mask_token":
            ours["mask_token"] = value.reshape(1, -1)
        elif key == "embeddings.register_tokens":
            if value.shape[1] > 0:
                ours["storage_tokens"] = value
        elif key == "rope_embeddings.inv_freq":
            continue  # recomputed below from rope_theta, as HF does
        elif key in inverse_global:
            ours[inverse_global[key]] = value
        else:
            raise KeyError(f"from_hf_state_dict: no fastdino name for Hugging Face key {key!r}")
    for i, layer in sorted(per_layer.items()):
        att = "attention."
        ours[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [layer.pop(f"{att}{n}_proj.weight") for n in "qkv"], dim=0)
        q_b, k_b, v_b = (layer.pop(f"{att}{n}_proj.bias", None) for n in "qkv")
        if q_b is not None or v_b is not None:
            if q_b is None or v_b is None:
                raise ValueError("from_hf_state_dict: fastdino's fused qkv needs both q and v "
                                 f"biases or neither; layer {i} has only one")
            masked = k_b is None
            k_b = torch.zeros_like(q_b) if masked else k_b
            ours[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q_b, k_b, v_b])
            if masked:
                ones = torch.ones_like(q_b)
                ours[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([ones, 0 * ones, ones])
        for rest, value in layer.items():
            dst = rename_block_key(rest, inverse_block)
            if dst is None:
                raise KeyError(f"from_hf_state_dict: no fastdino name for layer {i} key {rest!r}")
            ours[f"blocks.{i}.{dst}"] = value
    head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    j = torch.arange(head_dim // 4, dtype=torch.float32)
    ours["rope_embed.periods"] = hf_config.rope_theta ** (2 * j / (head_dim // 2))
    return ours


def hf_config_from_backbone(backbone: DinoVisionTransformer, **overrides):
    """A `DINOv3ViTConfig` describing `backbone` (sizes, biases, eps, RoPE)."""
    from transformers import DINOv3ViTConfig

    if backbone.rope_embed is None:
        raise ValueError("the Hugging Face export writes DINOv3ViTModel (RoPE); this backbone "
                         "has DINOv2's learned position embedding: export the official format")
    if getattr(backbone, "cls_norm", None) is not None:
        raise ValueError("DINOv3ViTModel has one final norm; this backbone normalises CLS and "
                         "storage tokens with its own cls_norm (untie_cls_and_patch_norms): "
                         "export the official format")
    note = periods_shift_note(backbone.rope_embed, "Hugging Face", "rope_theta")
    if note is not None:
        logger.warning(note)
    blk = backbone.blocks[0]
    gated = hasattr(blk.mlp, "w1")
    qkv = blk.attn.qkv
    has_qkv_bias = qkv.bias is not None
    masked = hasattr(qkv, "bias_mask")
    fields = dict(
        patch_size=backbone.patch_size, hidden_size=backbone.embed_dim,
        intermediate_size=(blk.mlp.w1 if gated else blk.mlp.fc1).out_features,
        num_hidden_layers=backbone.n_blocks, num_attention_heads=backbone.num_heads,
        hidden_act="silu" if gated else "gelu", layer_norm_eps=backbone.norm.eps,
        rope_theta=float(backbone.rope_embed.base), query_bias=has_qkv_bias,
        key_bias=has_qkv_bias and not masked, value_bias=has_qkv_bias,
        proj_bias=blk.attn.proj.bias is not None,
        mlp_bias=(blk.mlp.w1 if gated else blk.mlp.fc1).bias is not None,
        layerscale_value=float(blk.ls1.init_values), use_gated_mlp=gated,
        num_register_tokens=backbone.n_storage_tokens,
        pos_embed_rescale=backbone.rope_embed.rescale_coords,
    )
    fields.update(overrides)
    return DINOv3ViTConfig(**fields)


def backbone_from_hf_config(hf_config, **kwargs) -> DinoVisionTransformer:
    """Our backbone with the architecture of a `DINOv3ViTConfig` (weights: `from_hf_state_dict`)."""
    D = hf_config.hidden_size
    try:
        ffn_layer, ratio = ffn_for_width(D, hf_config.intermediate_size, hf_config.use_gated_mlp)
    except ValueError as e:
        raise ValueError(f"backbone_from_hf_config: intermediate_size: {e}") from None
    act = "silu" if hf_config.use_gated_mlp else "gelu"  # fastdino's SwiGLU / exact-GELU MLP
    if hf_config.hidden_act != act:
        raise ValueError(f"backbone_from_hf_config: hidden_act {hf_config.hidden_act!r} with "
                         f"use_gated_mlp={hf_config.use_gated_mlp} is not a DINOv3 FFN: allowed "
                         f"is {act!r}")
    if hf_config.query_bias != hf_config.value_bias:
        raise ValueError("backbone_from_hf_config: fastdino's fused qkv needs query_bias == "
                         f"value_bias, got {hf_config.query_bias} / {hf_config.value_bias}")
    patch = hf_config.patch_size
    args = dict(
        patch_size=patch if isinstance(patch, int) else patch[0], in_chans=hf_config.num_channels,
        embed_dim=D, depth=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
        ffn_ratio=ratio, ffn_layer=ffn_layer, qkv_bias=hf_config.query_bias,
        proj_bias=hf_config.proj_bias, ffn_bias=hf_config.mlp_bias,
        mask_k_bias=not hf_config.key_bias, layerscale_init=hf_config.layerscale_value,
        norm_eps=hf_config.layer_norm_eps, n_storage_tokens=hf_config.num_register_tokens,
        rope_base=hf_config.rope_theta, rope_rescale=hf_config.pos_embed_rescale,
    )
    args.update(kwargs)
    return DinoVisionTransformer(**args)
