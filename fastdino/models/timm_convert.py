"""Conversion between our DINOv3 backbones and timm's DINOv3 models (`timm.models.eva.Eva`, the
`vit_*_patch16_dinov3[_qkvb]` registry names, timm >= 1.0.20), proven by output parity in
tests/unit/test_timm_parity.py.

    ours                                   timm Eva
    cls_token / storage_tokens             cls_token / reg_token
    mask_token [1,D]                       (none: timm drops it as pretrain-only)
    patch_embed.proj.*                     patch_embed.proj.*
    rope_embed.periods                     (none: timm computes them from rope_temperature in
                                           fp32; bf16-rounded ones cannot travel: logged)
    blocks.i.attn.qkv.weight               blocks.i.attn.qkv.weight
    blocks.i.attn.qkv.bias (k part masked) blocks.i.attn.q_bias / v_bias (`_qkvb` models; timm's
                                           k_bias is a zero buffer)
    blocks.i.attn.proj.*                   blocks.i.attn.proj.*
    blocks.i.ls{1,2}.gamma                 blocks.i.gamma_{1,2}
    blocks.i.norm{1,2}.*, norm.*           the same
    blocks.i.mlp.fc1 / fc2                 blocks.i.mlp.fc1 / fc2
    blocks.i.mlp.w1 / w2 / w3              blocks.i.mlp.fc1_g / fc1_x / fc2 (SwiGLU, align_to)
    local_cls_norm.*                       (none: training-only, dropped)

timm's DINOv2 models (`vit_*_patch14_dinov2`) use the official DINOv2 names, except that the
register models keep `reg_token`, a position table without the CLS slot (its value folded into
`cls_token`) and, for ViT-g, a packed SwiGLU `mlp.fc1` = [gate; up]: `complete_from_timm` unfolds
them for a DINOv2-architecture backbone (exact: a zero CLS slot gives the same sum).

timm's models without `_qkvb` have no qkv bias: the released distilled ViT-S/B/L/H+ were trained
with biases that ended all zero, so timm dropped them. Loading such a file into a backbone with qkv
biases restores the zeros; loading any timm file gives a zero mask token (the official init: timm
keeps none) and RoPE periods from the backbone's own base (timm's rope_temperature, 100 for every
DINOv3 model). `complete_from_timm` does this and nothing else (the mask token: the loader's
general rule, state_dict_io).

Writing uses only key names and plain json; timm itself is not imported (it needs torchvision).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from fastdino.layers.ffn_layers import ffn_for_width
from fastdino.layers.rope_position_encoding import periods_shift_note
from fastdino.models.vision_transformer import DinoVisionTransformer

logger = logging.getLogger("fastdino.models")

# timm's registered DINOv3 architectures (timm/models/eva.py): name -> the Eva arguments that
# differ between them. All share patch 16, 4 register tokens, LayerScale, LN eps 1e-5, RoPE
# temperature 100 (rope_type "dinov3", rotate-half) and no absolute position embedding.
TIMM_DINOV3_ARCHS: dict[str, dict] = {}
for _name, _D, _depth, _heads, _ratio, _align in (
    ("vit_tiny", 192, 12, 3, 4.0, 0),
    ("vit_small", 384, 12, 6, 4.0, 0),
    ("vit_small_plus", 384, 12, 6, 4.0, 8),
    ("vit_base", 768, 12, 12, 4.0, 0),
    ("vit_large", 1024, 24, 16, 4.0, 0),
    ("vit_huge_plus", 1280, 32, 20, 4.0, 8),
    ("vit_7b", 4096, 40, 32, 2.0, 64),
):
    _args = dict(embed_dim=_D, depth=_depth, num_heads=_heads, mlp_ratio=_ratio,
                 swiglu_mlp=bool(_align), swiglu_align_to=_align)
    if _name != "vit_tiny":  # timm registers the tiny model with biases only
        TIMM_DINOV3_ARCHS[f"{_name}_patch16_dinov3"] = dict(_args, qkv_bias=False)
    if _name != "vit_7b":
        TIMM_DINOV3_ARCHS[f"{_name}_patch16_dinov3_qkvb"] = dict(_args, qkv_bias=True)
# timm's mlp_ratio is the SwiGLU width itself (rounded up to swiglu_align_to); the official
# ffn_ratio is 3/2 of it (6.0 -> 4.0, 3.0 -> 2.0): both give 1536 / 5120 / 8192 channels.

_BLOCK_RENAMES = {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2", "mlp.w1": "mlp.fc1_g",
                  "mlp.w2": "mlp.fc1_x", "mlp.w3": "mlp.fc2"}
_GLOBAL_RENAMES = {"storage_tokens": "reg_token"}
_DROPPED = ("mask_token", "rope_embed.periods", "local_cls_norm.weight", "local_cls_norm.bias")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def is_timm_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for timm Eva names (`reg_token`, `gamma_1`, `q_bias`, `fc1_g`): none is ours."""
    return any(k == "reg_token" or k.endswith((".gamma_1", ".attn.q_bias", ".mlp.fc1_g.weight"))
               for k in sd)


def _rename(rest: str, table: dict[str, str]) -> str:
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    return rest


def to_timm_state_dict(our_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our backbone state dict (RoPE, DINOv3) -> timm Eva names. A key bias that is not masked
    and not zero raises: timm's attention has none, and under RoPE it changes the output."""
    if "pos_embed" in our_sd:
        raise ValueError("timm's DINOv3 models use RoPE; this backbone has DINOv2's learned "
                         "position embedding: export the official format (timm's "
                         "vit_*_patch14_dinov2 models load the official DINOv2 names)")
    out: dict[str, torch.Tensor] = {}
    for key, value in our_sd.items():
        m = _BLOCK.fullmatch(key)
        if key in _DROPPED or (m and m.group(2) == "attn.qkv.bias_mask"):
            continue
        if key.startswith("cls_norm."):
            raise ValueError(f"{key}: timm's DINOv3 Eva has one final norm, no separate CLS norm "
                             "(untie_cls_and_patch_norms)")
        if m and m.group(2) == "attn.qkv.bias":
            q, k, v = value.chunk(3)
            mask = our_sd.get(f"blocks.{m.group(1)}.attn.qkv.bias_mask")
            if mask is None and torch.count_nonzero(k):
                raise ValueError(f"block {m.group(1)} has an unmasked non-zero key bias; timm's "
                                 "Eva attention has no key bias (k_bias is a zero buffer)")
            out[f"blocks.{m.group(1)}.attn.q_bias"] = q
            out[f"blocks.{m.group(1)}.attn.v_bias"] = v
        elif m:
            out[f"blocks.{m.group(1)}.{_rename(m.group(2), _BLOCK_RENAMES)}"] = value
        else:
            out[_GLOBAL_RENAMES.get(key, key)] = value
    return out


def from_timm_state_dict(timm_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Eva names -> ours, the inverse of to_timm_state_dict on the keys timm has. The keys
    timm lacks (mask token, RoPE periods, masked key biases) are added by complete_from_timm,
    which needs the target backbone."""
    gated = any(k.endswith(".mlp.fc1_g.weight") for k in timm_sd)
    # timm's fc2 is the SwiGLU's w3 or the MLP's own fc2
    inverse = {v: k for k, v in _BLOCK_RENAMES.items() if gated or k != "mlp.w3"}
    out: dict[str, torch.Tensor] = {}
    for key, value in timm_sd.items():
        m = _BLOCK.fullmatch(key)
        if key == "reg_token":
            out["storage_tokens"] = value
        elif m and m.group(2) == "attn.k_bias":
            continue  # a zero buffer (older timm versions saved it)
        elif m and m.group(2) == "attn.q_bias":
            i = m.group(1)
            v = timm_sd.get(f"blocks.{i}.attn.v_bias")
            if v is None:
                raise KeyError(f"timm state dict: blocks.{i}.attn.q_bias without v_bias")
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([value, torch.zeros_like(value), v])
        elif m and m.group(2) == "attn.v_bias":
            continue  # taken with q_bias
        elif m:
            out[f"blocks.{m.group(1)}.{_rename(m.group(2), inverse)}"] = value
        else:
            out[key] = value
    return out


def complete_from_timm(sd: dict[str, torch.Tensor], backbone: DinoVisionTransformer
                       ) -> dict[str, torch.Tensor]:
    """Add what a timm file cannot hold (module docstring) for `backbone`; every other key is left
    to the strict load, so a file of another architecture still fails by name."""
    sd = dict(sd)
    rope = backbone.rope_embed
    if rope is not None and "rope_embed.periods" not in sd:
        j = torch.arange(rope.head_dim // 4, dtype=torch.float32)
        sd["rope_embed.periods"] = rope.base ** (2 * j / (rope.head_dim // 2))
    pos = getattr(backbone, "pos_embed", None)
    if pos is not None and "pos_embed" in sd and sd["pos_embed"].shape[1] == pos.shape[1] - 1:
        # timm's DINOv2 register models (no_embed_class): the table has no CLS slot, the CLS
        # position is folded into cls_token (timm's checkpoint filter adds it there), so a zero
        # CLS slot gives the same sum, exactly
        sd["pos_embed"] = torch.cat([sd["pos_embed"].new_zeros(1, 1, pos.shape[2]),
                                     sd["pos_embed"]], dim=1)
    restored = 0
    for i, block in enumerate(backbone.blocks):
        fc1 = f"blocks.{i}.mlp.fc1.weight"
        if hasattr(block.mlp, "w1") and fc1 in sd:  # timm's SwiGLUPacked (DINOv2 ViT-g): fc1
            for kind in ("weight", "bias"):         # holds [gate; up] as the official w12
                packed = sd.pop(f"blocks.{i}.mlp.fc1.{kind}", None)
                if packed is not None:
                    gate, up = packed.chunk(2, dim=0)
                    sd[f"blocks.{i}.mlp.w1.{kind}"], sd[f"blocks.{i}.mlp.w2.{kind}"] = gate, up
                if f"blocks.{i}.mlp.fc2.{kind}" in sd:
                    sd[f"blocks.{i}.mlp.w3.{kind}"] = sd.pop(f"blocks.{i}.mlp.fc2.{kind}")
        qkv = block.attn.qkv
        key = f"blocks.{i}.attn.qkv.bias"
        if qkv.bias is not None and key not in sd and f"blocks.{i}.attn.qkv.weight" in sd:
            sd[key] = torch.zeros(qkv.bias.shape)  # a timm model without `_qkvb`
            restored += 1
        if hasattr(qkv, "bias_mask") and key in sd:
            d = sd[key].shape[0] // 3
            sd[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat(
                [torch.ones(d), torch.zeros(d), torch.ones(d)])
    if restored:
        logger.info("timm weights without qkv biases: %d blocks' biases set to zero (timm's "
                    "non-_qkvb DINOv3 models are the released weights with all-zero biases)",
                    restored)
    return sd


def timm_config_from_backbone(backbone: DinoVisionTransformer,
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> dict:
    """The config.json of a timm model folder holding `backbone`: the architecture name of the
    registered timm DINOv3 model of the same size (or of the same FFN kind, resized by
    `model_args`), and `model_args` giving every size explicitly so that any fastdino RoPE backbone
    loads with `timm.create_model("local-dir:FOLDER", pretrained=True)`. `mean` / `std`: the
    normalisation the backbone was trained with (crops.mean / crops.std), which timm's data
    config hands to its transforms."""
    if backbone.rope_embed is None:
        raise ValueError("timm's DINOv3 models use RoPE; this backbone has DINOv2's learned "
                         "position embedding")
    if getattr(backbone, "cls_norm", None) is not None:
        raise ValueError("timm's DINOv3 Eva has one final norm; this backbone normalises CLS and "
                         "storage tokens with its own cls_norm (untie_cls_and_patch_norms): "
                         "export the official format")
    note = periods_shift_note(backbone.rope_embed, "timm", "rope_temperature")
    if note is not None:
        logger.warning(note)
    blk = backbone.blocks[0]
    gated = hasattr(blk.mlp, "w1")
    hidden = (blk.mlp.w1 if gated else blk.mlp.fc1).out_features
    align = blk.mlp.align_to if gated else 0
    D = backbone.embed_dim
    ratio = hidden / D if int(D * (hidden / D)) == hidden else (hidden + 0.5) / D
    problems = []
    if abs(backbone.norm.eps - 1e-5) > 1e-12:
        problems.append(f"LayerNorm eps {backbone.norm.eps} (timm: 1e-5)")
    if blk.attn.proj.bias is None or (blk.mlp.w1 if gated else blk.mlp.fc1).bias is None:
        problems.append("no projection / FFN biases (timm's Eva has them)")
    if backbone.patch_embed.proj.bias is None:
        problems.append("no patch embedding bias")
    if problems:
        raise ValueError("this backbone cannot be written as a timm DINOv3 model: "
                         + "; ".join(problems))
    qkv_bias = blk.attn.qkv.bias is not None
    model_args = dict(
        embed_dim=D, depth=backbone.n_blocks, num_heads=backbone.num_heads, mlp_ratio=ratio,
        swiglu_mlp=gated, swiglu_align_to=align, qkv_bias=qkv_bias,
        num_reg_tokens=backbone.n_storage_tokens, patch_size=backbone.patch_size,
        in_chans=backbone.patch_embed.proj.in_channels,
        init_values=float(blk.ls1.init_values), rope_temperature=float(backbone.rope_embed.base),
        global_pool="token",  # the official DINOv3 pooled output is the CLS token
    )
    same = [n for n, a in TIMM_DINOV3_ARCHS.items()
            if all(model_args[k] == v for k, v in a.items() if k != "mlp_ratio")
            and abs(a["mlp_ratio"] - ratio) < 1e-6]
    kind = [n for n, a in TIMM_DINOV3_ARCHS.items()
            if a["swiglu_mlp"] == gated and a["qkv_bias"] == qkv_bias]
    return {
        "architecture": (same or kind)[0],
        "num_classes": 0,
        "num_features": D,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [model_args["in_chans"], 224, 224], "fixed_input_size": False,
            "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "num_classes": 0, "pool_size": None, "first_conv": "patch_embed.proj",
            "classifier": "head", "license": "dinov3-license",
        },
    }


def backbone_from_timm_config(cfg: Mapping, **kwargs) -> DinoVisionTransformer:
    """Our backbone with the architecture of a timm config.json (`architecture` + `model_args`),
    for the DINOv3 names in TIMM_DINOV3_ARCHS."""
    name = cfg.get("architecture")
    if name not in TIMM_DINOV3_ARCHS:
        raise ValueError(f"timm architecture {name!r} is not a DINOv3 model; allowed is one of "
                         + " | ".join(TIMM_DINOV3_ARCHS))
    a = {**TIMM_DINOV3_ARCHS[name], "num_reg_tokens": 4, "patch_size": 16, "in_chans": 3,
         "init_values": 1e-5, "rope_temperature": 100.0, **cfg.get("model_args", {})}
    D, gated, align = a["embed_dim"], bool(a["swiglu_mlp"]), int(a["swiglu_align_to"] or 0)
    if gated and not align:
        raise ValueError("timm model_args swiglu_mlp without swiglu_align_to is timm's packed "
                         "GluMlp, not a DINOv3 layout")
    hidden = int(D * a["mlp_ratio"])
    hidden += -hidden % align if gated else 0
    ffn_layer, ratio = ffn_for_width(D, hidden, gated, aligns=(align,) if gated else ())
    args = dict(
        embed_dim=D, depth=a["depth"], num_heads=a["num_heads"], ffn_layer=ffn_layer,
        ffn_ratio=ratio, qkv_bias=bool(a["qkv_bias"]), mask_k_bias=True,
        n_storage_tokens=a["num_reg_tokens"], patch_size=a["patch_size"], in_chans=a["in_chans"],
        layerscale_init=a["init_values"], norm_eps=1e-5, rope_base=float(a["rope_temperature"]),
    )
    args.update(kwargs)
    return DinoVisionTransformer(**args)
