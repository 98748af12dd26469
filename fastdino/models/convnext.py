"""ConvNeXt backbones as DINOv3 distillation students (SPEC.md §1.8: the official run distils the
7B into ConvNeXt T/S/B/L besides the ViTs; the released `dinov3_convnext_*` weights).

    stem: Conv 4x4 stride 4 -> LN ; then 4 stages of `depths[i]` blocks at width `dims[i]`,
    a downsampling (LN -> Conv 2x2 stride 2) before stages 1-3. Block (ConvNeXt paper, Liu et al.
    2022): x + γ · Linear(GELU(Linear(LN(DWConv7x7(x))))), 4x expansion, γ = layer scale.
    CLS = global average of the last map; patch tokens = the last map (stride 32) resized
    bilinearly to the teacher's patch grid (H / patch_size, W / patch_size), then both through
    the final LayerNorm.

Why the resize: distillation compares the student's and the teacher's tokens at the iBOT mask
positions of the teacher's patch grid (a ViT/16: 14 x 14 at 224 px); the ConvNeXt map is 7 x 7.
The official ConvNeXt resizes its maps to a "pseudo patch size" grid the same way for its dense
outputs (`patch_size`, get_intermediate_layers); fastdino does it in forward_features too, so the
training loss, the dense evaluations and the Gram-free distillation objective all see one grid.
CLS and the weights are unaffected: the released ConvNeXt weights load here as they are (the
official parameter names: `downsample_layers.*`, `stages.<i>.<j>.*`, `norm.*`), and an exported
student loads in the official code.

ConvNeXt students are unmasked (distillation: the iBOT loss is taken at the mask positions, the
student sees the whole crop), so they have no mask token; config.validate allows them only in
distillation runs. Layer-wise lr decay counts the blocks of all stages in order (n_blocks =
sum(depths); param_groups.layer_id).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastdino.models.backbone_api import BackboneCalls, pack_intermediates

# arch -> (depths, dims): the official sizes (dinov3 `convnext_sizes`); convnext_test for CPU tests
CONVNEXT_ARCHS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "convnext_test": ((1, 1, 1, 1), (16, 24, 32, 48)),
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}


class DropPath(nn.Module):
    """Classic stochastic depth (the ConvNeXt paper's, per-sample Bernoulli keep of the residual
    branch, scaled by 1/keep; not the ViT's sample-subset drop of layers/drop_path.py: a conv
    map is not a batch of tokens to subset)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of an [N, C, H, W] map (the stem's and the downsamplings')."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # [N, H, W, C]: the MLP acts per position
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(BackboneCalls, nn.Module):
    def __init__(self, *, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), patch_size: int = 16,
                 drop_path_rate: float = 0.0, layer_scale_init: float = 1e-6,
                 activation_checkpointing: bool = False, in_chans: int = 3, device=None):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt has 4 stages: got depths {depths}, dims {dims}")
        self.depths, self.dims = tuple(depths), tuple(dims)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.downsample_layers = nn.ModuleList([nn.Sequential(
                nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                ChannelsFirstLayerNorm(dims[0]))])
            for i in range(3):
                self.downsample_layers.append(nn.Sequential(
                    ChannelsFirstLayerNorm(dims[i]),
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
            rates = np.linspace(0, drop_path_rate, sum(depths)).tolist()  # linear over blocks
            self.stages, k = nn.ModuleList(), 0
            for i, d in enumerate(depths):
                self.stages.append(nn.Sequential(*[
                    ConvNeXtBlock(dims[i], rates[k + j], layer_scale_init) for j in range(d)]))
                k += d
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Identity()
        self.embed_dim, self.patch_size = dims[-1], patch_size
        self.n_blocks = sum(depths)  # layer-wise decay and optim.frozen_blocks count these
        self.n_storage_tokens = 0
        self.layer_scale_init = layer_scale_init
        self.activation_checkpointing = activation_checkpointing
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, ChannelsFirstLayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, ConvNeXtBlock):
                m.gamma.fill_(self.layer_scale_init)

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map [N, C, H/32, W/32]."""
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = down(x)
            for blk in stage:
                ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
                x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        return x

    def _grid(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """The map resized to the patch grid of an input of size `hw`, as tokens [N, h·w, C]."""
        grid = (hw[0] // self.patch_size, hw[1] // self.patch_size)
        if x.shape[-2:] != grid:
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False,
                              antialias=x.shape[-2] > grid[0])
        return x.flatten(2).transpose(1, 2)

    def forward_features_list(self, x_list: list[torch.Tensor],
                              masks_list: list[torch.Tensor | None]) -> list[dict]:
        out = []
        for x, masks in zip(x_list, masks_list, strict=True):
            if masks is not None:
                raise ValueError("ConvNeXt students are not masked (no mask token): they train "
                                 "as distillation students only (distillation.enabled)")
            fmap = self._map(x)
            pooled = fmap.mean((-2, -1))  # [N, C]
            tokens = self.norm(torch.cat([pooled.unsqueeze(1), self._grid(fmap, x.shape[-2:])],
                                         dim=1))
            out.append({"x_norm_clstoken": tokens[:, 0],
                        "x_storage_tokens": tokens[:, 1:1],
                        "x_norm_patchtokens": tokens[:, 1:],
                        "x_prenorm": fmap, "masks": masks})
        return out

    def get_intermediate_layers(self, x: torch.Tensor, *, n=1, reshape: bool = False,
                                return_class_token: bool = False,
                                return_extra_tokens: bool = False, norm: bool = True):
        """The last stage's tokens on the patch grid (n = 1, the only output a ConvNeXt gives
        in the ViT's form: its stages have other widths), as the ViT's."""
        if n not in (1, [3], (3,)):
            raise ValueError(f"ConvNeXt get_intermediate_layers gives the last stage only "
                             f"(n=1), got n={n}")
        fmap = self._map(x)
        tokens = torch.cat([fmap.mean((-2, -1)).unsqueeze(1), self._grid(fmap, x.shape[-2:])],
                           dim=1)
        if norm:
            tokens = self.norm(tokens)
        cls, patches = tokens[:, 0], tokens[:, 1:]
        if reshape:
            h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            patches = patches.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
        return pack_intermediates([patches], [cls], [tokens[:, 1:1]], return_class_token,
                                  return_extra_tokens)


def build_convnext(arch: str, *, patch_size: int = 16, drop_path_rate: float = 0.0,
                   activation_checkpointing: bool = False, device=None) -> ConvNeXt:
    depths, dims = CONVNEXT_ARCHS[arch]
    return ConvNeXt(depths=depths, dims=dims, patch_size=patch_size, drop_path_rate=drop_path_rate,
                    activation_checkpointing=activation_checkpointing, device=device)


# The official ConvNeXt also registers its final norm as `norms[3]` (beside three Identity
# modules, for get_intermediate_layers), so its state dicts, the released weights included, hold
# the same LayerNorm twice: `norm.*` and `norms.3.*`. fastdino's module has it once.
_NORM_ALIAS = {"norms.3.weight": "norm.weight", "norms.3.bias": "norm.bias"}


def is_convnext_state_dict(sd) -> bool:
    return "stages.0.0.gamma" in sd


def from_official_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official names -> this module's: the `norms.3.*` alias dropped (it must equal
    `norm.*`: a file where they differ is not one model)."""
    for alias, key in _NORM_ALIAS.items():
        if alias in sd and key in sd and not torch.equal(sd[alias], sd[key]):
            raise ValueError(f"ConvNeXt weights: {alias} differs from {key}; the official model "
                             "holds one final norm under both names")
    return {k: v for k, v in sd.items() if k not in _NORM_ALIAS}


def to_official_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This module's names -> the official ones: `norms.3.*` added, so that the official
    ConvNeXt loads the file strictly."""
    return {**sd, **{alias: sd[key].clone() for alias, key in _NORM_ALIAS.items() if key in sd}}
