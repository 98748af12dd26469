"""Optimizer parameter groups of SPEC.md §3.3 (official `dinov3/train/param_groups.py`).

Per parameter (full name `backbone.*`, `dino_head.*`, `ibot_head.*`):
- lr multiplier = λ^(L+1−layer_id) with layer_id 0 for patch_embed, cls_token, storage_tokens,
  mask_token; i+1 for `blocks.i.*`; L+1 for everything else (final norm, local_cls_norm and all head
  params → multiplier 1). `patch_embed` additionally × `patch_embed_lr_mult` (0.2).
- wd multiplier 0 for names ending in `bias` or containing `norm` or `gamma` (LayerScale);
  cls/storage/mask tokens DO get weight decay (SPEC.md §9.7).
- `is_last_layer` for names containing `last_layer` (lr 0 during the freeze).
- `is_backbone` for `backbone.*` (lr 0 during the head warm-up, `optim.freeze_backbone_epochs`).
Parameters with equal (lr_multiplier, wd_multiplier, is_last_layer, is_backbone) are fused into one
group, in first-seen order, so the optimizer sees a few large groups (as the official
`fuse_params_groups`). Frozen parameters (requires_grad False: the layers of
`optim.frozen_blocks`, LoRA's base weights) are left out.
"""

from __future__ import annotations

from torch import nn

_LAYER0 = ("patch_embed", "cls_token", "storage_tokens", "mask_token", "pos_embed")


def layer_id(name: str, n_blocks: int, depths: tuple[int, ...] | None = None) -> int:
    """Layer index of backbone-relative parameter `name` (0 .. n_blocks + 1). `depths`: a
    ConvNeXt's blocks per stage (models/convnext.py), numbered in stage order: `stages.i.j` is
    block sum(depths[:i]) + j; the stem (`downsample_layers.0`) is layer 0 as a ViT's patch
    embedding, the downsampling before stage i shares its first block's layer."""
    parts = name.split(".")
    if depths is not None:
        if parts[0] == "stages":
            return sum(depths[:int(parts[1])]) + int(parts[2]) + 1
        if parts[0] == "downsample_layers":
            return 0 if parts[1] == "0" else sum(depths[:int(parts[1])]) + 1
        return n_blocks + 1
    if parts[0] in _LAYER0:
        return 0
    if parts[0] == "blocks":
        return int(parts[1]) + 1
    return n_blocks + 1


def param_multipliers(full_name: str, n_blocks: int, layerwise_decay: float,
                      patch_embed_lr_mult: float, depths: tuple[int, ...] | None = None) -> dict:
    """{lr_multiplier, wd_multiplier, is_last_layer, is_backbone} of one student parameter."""
    module, _, name = full_name.partition(".")
    lid = layer_id(name, n_blocks, depths) if module == "backbone" else n_blocks + 1
    lr_mult = layerwise_decay ** (n_blocks + 1 - lid)
    if module == "backbone" and name.startswith("patch_embed"):
        lr_mult *= patch_embed_lr_mult
    no_wd = full_name.endswith("bias") or "norm" in full_name or "gamma" in full_name
    return {"lr_multiplier": lr_mult, "wd_multiplier": 0.0 if no_wd else 1.0,
            "is_last_layer": "last_layer" in full_name, "is_backbone": module == "backbone"}


def build_param_groups(student: nn.Module, n_blocks: int, layerwise_decay: float,
                       patch_embed_lr_mult: float) -> list[dict]:
    """Fused groups for `student` (a module with children backbone, dino_head, ibot_head).
    Each group: {"params", "names", "lr_multiplier", "wd_multiplier", "is_last_layer",
    "is_backbone", "lr", "weight_decay"}; lr and weight_decay are overwritten every step by the
    schedules."""
    groups: dict[tuple, dict] = {}
    depths = getattr(student.backbone, "depths", None)  # a ConvNeXt's stages
    for full_name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        m = param_multipliers(full_name, n_blocks, layerwise_decay, patch_embed_lr_mult, depths)
        key = (m["lr_multiplier"], m["wd_multiplier"], m["is_last_layer"], m["is_backbone"])
        g = groups.setdefault(key, {"params": [], "names": [], **m, "lr": 0.0, "weight_decay": 0.0})
        g["params"].append(p)
        g["names"].append(full_name)
    return list(groups.values())


def freeze_layers(backbone: nn.Module, frozen_blocks: int) -> int:
    """`optim.frozen_blocks`: requires_grad off for the layers 0 .. frozen_blocks of `backbone`
    (layer_id's numbering: 0 = patch embedding and tokens, i + 1 = blocks.i), or for all of it
    when frozen_blocks = -1 (0: nothing). Returns the number of values frozen."""
    n_blocks = backbone.n_blocks
    if frozen_blocks > n_blocks:
        raise ValueError(f"optim.frozen_blocks={frozen_blocks}: the backbone has {n_blocks} blocks "
                         f"(allowed: -1 .. {n_blocks})")
    if frozen_blocks == 0:
        return 0
    last = n_blocks + 1 if frozen_blocks == -1 else frozen_blocks
    n = 0
    for name, p in backbone.named_parameters():
        if layer_id(name, n_blocks, getattr(backbone, "depths", None)) <= last:
            p.requires_grad_(False)
            n += p.numel()
    return n
