"""Strict loading of a backbone state dict from the files the DINOv3 world produces (SPEC.md §4).

Accepted layouts:
    {"cls_token": ..., "blocks.0....": ...}                        plain backbone (released files)
    {"teacher": {"backbone.cls_token": ..., "dino_head....": ...}}  eval snapshots / our exports
    any of the above with `module.` prefixes (DDP) -- stripped, as the official eval loaders do
    LoRA layers (`optim.lora_rank` runs) -- merged into plain weights (layers/lora.py)
    DINOv2 checkpoints (register_tokens, fused w12, chunked blocks) -- renamed (from_dinov2_names)
    timm DINOv3 models (reg_token, gamma_1, q_bias / v_bias) -- renamed, and what timm does not
        store (mask token, RoPE periods, zero biases) added for the target (models/timm_convert.py)
Never a silent partial load: a missing or unexpected key, or a shape mismatch, raises and names it
(the one exception: a missing `mask_token`, a training-only parameter that inference formats drop,
is set to zeros, the official init, and logged).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from torch import nn

from fastdino.layers.lora import merge_lora_state_dict
from fastdino.models.timm_convert import (
    complete_from_timm,
    from_timm_state_dict,
    is_timm_state_dict,
)

logger = logging.getLogger("fastdino.models")

_NON_BACKBONE_PREFIXES = ("dino_head.", "ibot_head.", "dino_loss.", "ibot_patch_loss.")


def extract_backbone_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unwrap {"teacher": ...}, strip `module.` / `backbone.` prefixes, drop head and loss keys."""
    if "teacher" in sd and isinstance(sd["teacher"], Mapping):
        sd = sd["teacher"]
    out: dict[str, torch.Tensor] = {}
    has_backbone_prefix = any(k.removeprefix("module.").startswith("backbone.") for k in sd)
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if has_backbone_prefix:
            if not key.startswith("backbone."):
                continue  # heads, loss centers: not part of the backbone
            key = key.removeprefix("backbone.")
        elif key.startswith(_NON_BACKBONE_PREFIXES):
            continue
        out[key] = value
    # a LoRA run's teacher reads as a plain backbone; DINOv2 files as our names
    return from_dinov2_names(merge_lora_state_dict(out))


_CHUNKED_BLOCK = re.compile(r"blocks\.\d+\.(\d+)\.(.+)")


def from_dinov2_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 checkpoint names -> ours (SPEC.md §2.6): `register_tokens` -> `storage_tokens`; the
    fused SwiGLU `mlp.w12` [2H, D] -> `mlp.w1` (first half: the gate) and `mlp.w2`; FSDP block
    chunks `blocks.<chunk>.<i>.` -> `blocks.<i>.` (DINOv2's BlockChunk keeps the global index).
    A no-op on DINOv3 / fastdino names."""
    out: dict[str, torch.Tensor] = {}
    chunked = any(_CHUNKED_BLOCK.fullmatch(k) for k in sd)
    for key, value in sd.items():
        m = _CHUNKED_BLOCK.fullmatch(key) if chunked else None
        if m:
            key = f"blocks.{m.group(1)}.{m.group(2)}"
        if key == "register_tokens":
            key = "storage_tokens"
        if ".mlp.w12." in key:
            gate, up = value.chunk(2, dim=0)
            out[key.replace(".w12.", ".w1.")] = gate
            out[key.replace(".w12.", ".w2.")] = up
            continue
        out[key] = value
    return out


def to_dinov2_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> the official DINOv2 ones for a learned-position (DINOv2) backbone, the
    inverse of from_dinov2_names: `storage_tokens` -> `register_tokens`, `mlp.w1` + `mlp.w2` ->
    the fused `mlp.w12` of its ViT-g (SwiGLUFFNFused)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".mlp.w2." in key:
            continue  # fused with w1 below
        if ".mlp.w1." in key:
            out[key.replace(".w1.", ".w12.")] = torch.cat([value, sd[key.replace(".w1.", ".w2.")]])
            continue
        out["register_tokens" if key == "storage_tokens" else key] = value
    return out


_LOCAL_CLS_NORM = ("local_cls_norm.weight", "local_cls_norm.bias")


def _match_local_cls_norm(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                          ) -> dict[str, torch.Tensor]:
    """`local_cls_norm` (untie_global_and_local_cls_norm: ViT-7B, the SAT ViT-L) normalises the
    local crops' CLS + storage tokens in training only; Hugging Face and timm files drop it.
    Weights with it into a backbone without it: dropped (the backbone normalises every crop
    with `norm`); weights without it into a backbone with it: started from the weights' `norm`,
    which is what normalised those tokens in the model they come from. Both logged."""
    has = all(k in sd for k in _LOCAL_CLS_NORM)
    wants = all(k in expected for k in _LOCAL_CLS_NORM)
    if has and not any(k in expected for k in _LOCAL_CLS_NORM):
        logger.info("the weights' local_cls_norm (a training-only norm of the local crops' CLS "
                    "and storage tokens) is dropped: this backbone has none "
                    "(model.untie_global_and_local_cls_norm false)")
        return {k: v for k, v in sd.items() if k not in _LOCAL_CLS_NORM}
    if wants and not any(k in sd for k in _LOCAL_CLS_NORM) and all(
            f"norm.{p}" in sd for p in ("weight", "bias")):
        logger.info("the weights hold no local_cls_norm (Hugging Face and timm files drop it): "
                    "started from their final norm")
        return {**sd, **{f"local_cls_norm.{p}": sd[f"norm.{p}"].clone()
                         for p in ("weight", "bias")}}
    return sd


def load_backbone_state_dict(backbone: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Load `sd` (any layout above) into `backbone` strictly; raise ValueError naming every
    missing key, unexpected key and shape mismatch."""
    sd = extract_backbone_state_dict(sd)
    from fastdino.models.convnext import ConvNeXt

    if isinstance(backbone, ConvNeXt):  # timm's names, or the official duplicate final norm
        from fastdino.models.convnext import from_official_state_dict
        from fastdino.models.timm_convnext import (
            from_timm_convnext_state_dict,
            is_timm_convnext_state_dict,
        )
        if is_timm_convnext_state_dict(sd):
            sd = from_timm_convnext_state_dict(sd)
        sd = from_official_state_dict(sd)
    if is_timm_state_dict(sd):
        sd = complete_from_timm(from_timm_state_dict(sd), backbone)
    expected = backbone.state_dict()
    if "mask_token" in expected and "mask_token" not in sd:
        # a training-only parameter that inference formats drop (timm's DINOv2 and DINOv3
        # models): zeros, the official init; it matters only when continued pretraining masks
        sd = {**sd, "mask_token": torch.zeros(expected["mask_token"].shape)}
        logger.info("the weights hold no mask token: set to zeros (the official init)")
    sd = _match_local_cls_norm(sd, expected)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if items:
                parts.append(f"{name} ({len(items)}): " + ", ".join(items))
        raise ValueError("backbone state dict does not match the model: " + "; ".join(parts))
    backbone.load_state_dict(sd, strict=True)
