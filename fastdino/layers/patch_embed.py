"""Patch embedding: a stride-p convolution from pixels to tokens (SPEC.md §2.2).

    x [B, 3, H, W] -> proj -> [B, D, h, w] -> [B, h, w, D]      (h = H // p, w = W // p)

Inputs whose sides are not multiples of p are floored by the convolution, as in the official code.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 device=None) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size,
                              device=device)

    def reset_parameters(self) -> None:
        # Official init: weight AND bias ~ U(±sqrt(k)), k = 1 / (in_chans * p^2)
        # (U(±sqrt(1/(3*16^2))) for RGB, patch 16) -- not PyTorch's default conv init.
        bound = math.sqrt(1.0 / (self.in_chans * self.patch_size**2))
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_bdhw = self.proj(x)
        return x_bdhw.permute(0, 2, 3, 1)  # [B, h, w, D]
