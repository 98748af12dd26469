"""timm's ConvNeXt (`convnext_tiny.dinov3_lvd1689m` ... the DINOv3 ConvNeXt weights on the hub)
<-> fastdino's ConvNeXt (models/convnext.py, the official names). timm's own loader maps the
official names the same way (timm.models.convnext.checkpoint_filter_fn).

    ours                               timm
    downsample_layers.0.<k>.*          stem.<k>.*
    downsample_layers.<i>.<k>.*        stages.<i>.downsample.<k>.*        (i = 1, 2, 3)
    stages.<i>.<j>.dwconv / norm       stages.<i>.blocks.<j>.conv_dw / norm
    stages.<i>.<j>.pwconv1 / pwconv2   stages.<i>.blocks.<j>.mlp.fc1 / mlp.fc2
    stages.<i>.<j>.gamma               stages.<i>.blocks.<j>.gamma
    norm.*                             head.norm.*   (timm pools, then norms: the same CLS)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fastdino.models.convnext import CONVNEXT_ARCHS, ConvNeXt

_BLOCK = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2",
          "gamma": "gamma"}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
# timm's registered ConvNeXt sizes with DINOv3 weights (the official sizes)
TIMM_CONVNEXT_ARCHS = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")


def is_timm_convnext_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    return "stem.0.weight" in sd and "head.norm.weight" in sd


def to_timm_convnext_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        if p[0] == "downsample_layers":
            new = ".".join(["stem", *p[2:]] if p[1] == "0" else
                           ["stages", p[1], "downsample", *p[2:]])
        elif p[0] == "stages":
            new = ".".join(["stages", p[1], "blocks", p[2], _BLOCK[p[3]], *p[4:]])
        elif p[0] == "norm":
            new = ".".join(["head.norm", *p[1:]])
        elif p[0] == "norms":  # the official duplicate of the final norm (convnext.py)
            continue
        else:
            raise ValueError(f"ConvNeXt state dict: unexpected key {key!r}")
        out[new] = value
    return out


def from_timm_convnext_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        if p[0] == "stem":
            new = ".".join(["downsample_layers.0", *p[1:]])
        elif p[0] == "stages" and p[2] == "downsample":
            new = ".".join(["downsample_layers", p[1], *p[3:]])
        elif p[0] == "stages" and p[2] == "blocks":
            name = ".".join(p[4:6]) if p[4] == "mlp" else p[4]
            rest = p[6:] if p[4] == "mlp" else p[5:]
            new = ".".join(["stages", p[1], p[3], _BLOCK_BACK[name], *rest])
        elif key.startswith("head.norm."):
            new = "norm." + key.removeprefix("head.norm.")
        elif key.startswith("head.fc."):  # a classifier: not part of the backbone
            continue
        else:
            raise ValueError(f"timm ConvNeXt state dict: unexpected key {key!r}")
        out[new] = value
    return out


def timm_convnext_config(backbone: ConvNeXt, mean=(0.485, 0.456, 0.406),
                         std=(0.229, 0.224, 0.225)) -> dict:
    """The config.json of a timm model folder holding `backbone`: timm's ConvNeXt of the same
    stages (`model_args` gives them explicitly), average pooling, no classifier."""
    same = [n for n in TIMM_CONVNEXT_ARCHS
            if CONVNEXT_ARCHS[n] == (backbone.depths, backbone.dims)]
    model_args = dict(depths=list(backbone.depths), dims=list(backbone.dims),
                      ls_init_value=float(backbone.layer_scale_init))
    return {
        "architecture": (same or ["convnext_tiny"])[0], "num_classes": 0,
        "num_features": backbone.embed_dim, "global_pool": "avg", "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, 224, 224], "fixed_input_size": False, "interpolation": "bicubic",
            "crop_pct": 1.0, "crop_mode": "center", "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "num_classes": 0, "pool_size": [7, 7],
            "first_conv": "stem.0", "classifier": "head.fc", "license": "dinov3-license",
        },
    }


def backbone_from_timm_convnext_config(cfg: Mapping, *, device=None) -> ConvNeXt:
    """Our ConvNeXt for a timm config.json of a ConvNeXt (`architecture` + `model_args`)."""
    name = cfg.get("architecture")
    if name not in TIMM_CONVNEXT_ARCHS:
        raise ValueError(f"timm architecture {name!r}: allowed ConvNeXt ones are "
                         + " | ".join(TIMM_CONVNEXT_ARCHS))
    depths, dims = CONVNEXT_ARCHS[name]
    a = cfg.get("model_args", {})
    return ConvNeXt(depths=tuple(a.get("depths", depths)), dims=tuple(a.get("dims", dims)),
                    layer_scale_init=float(a.get("ls_init_value", 1e-6)), device=device)
