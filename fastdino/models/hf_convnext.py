"""Hugging Face `DINOv3ConvNextModel` (transformers >= 4.56; the facebook/dinov3-convnext-*
folders) <-> fastdino's ConvNeXt (models/convnext.py, the official names).

    ours                                   Hugging Face
    downsample_layers.<i>.<k>.*            model.stages.<i>.downsample_layers.<k>.*
    stages.<i>.<j>.dwconv / norm           model.stages.<i>.layers.<j>.depthwise_conv / layer_norm
    stages.<i>.<j>.pwconv1 / pwconv2       model.stages.<i>.layers.<j>.pointwise_conv1 / 2
    stages.<i>.<j>.gamma                   model.stages.<i>.layers.<j>.gamma
    norm.*                                 layer_norm.*

Both give CLS = LayerNorm(global average of the last map); Hugging Face's patch tokens are that
map (stride 32), ours are resized to the patch grid first (models/convnext.py), so the weights
and the CLS match, the patch tokens match where the grid is the map's (patch_size 32).
"""

from __future__ import annotations

import torch

from fastdino.models.convnext import ConvNeXt

_BLOCK = {"dwconv": "depthwise_conv", "norm": "layer_norm", "pwconv1": "pointwise_conv1",
          "pwconv2": "pointwise_conv2", "gamma": "gamma"}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}


def to_hf_convnext_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "downsample_layers":
            new = f"model.stages.{parts[1]}.downsample_layers.{'.'.join(parts[2:])}"
        elif parts[0] == "stages":
            new = ".".join(["model.stages", parts[1], "layers", parts[2], _BLOCK[parts[3]],
                            *parts[4:]])
        elif parts[0] == "norm":
            new = "layer_norm." + ".".join(parts[1:])
        elif parts[0] == "norms":  # the official duplicate of the final norm (convnext.py)
            continue
        else:
            raise ValueError(f"ConvNeXt state dict: unexpected key {key!r}")
        out[new] = value
    return out


def from_hf_convnext_state_dict(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in hf_sd.items():
        parts = key.removeprefix("model.").split(".")
        if parts[0] == "stages" and parts[2] == "downsample_layers":
            new = ".".join(["downsample_layers", parts[1], *parts[3:]])
        elif parts[0] == "stages" and parts[2] == "layers":
            new = ".".join(["stages", parts[1], parts[3], _BLOCK_BACK[parts[4]], *parts[5:]])
        elif parts[0] == "layer_norm":
            new = "norm." + ".".join(parts[1:])
        else:
            raise ValueError(f"Hugging Face DINOv3ConvNextModel state dict: unexpected key "
                             f"{key!r}")
        out[new] = value
    return out


def hf_convnext_config_from_backbone(backbone: ConvNeXt):
    from transformers import DINOv3ConvNextConfig

    return DINOv3ConvNextConfig(hidden_sizes=list(backbone.dims), depths=list(backbone.depths),
                                layer_scale_init_value=backbone.layer_scale_init)


def backbone_from_hf_convnext_config(hf_config, *, patch_size: int = 16, device=None) -> ConvNeXt:
    """An uninitialised-on-meta (or initialised) ConvNeXt of a DINOv3ConvNextConfig; the pseudo
    patch size is the DINOv3 ViTs' 16 (the grid its patch tokens are resized to)."""
    return ConvNeXt(depths=tuple(hf_config.depths), dims=tuple(hf_config.hidden_sizes),
                    patch_size=patch_size, layer_scale_init=hf_config.layer_scale_init_value,
                    device=device)
