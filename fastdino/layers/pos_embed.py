"""DINOv2's learned absolute position embedding (SPEC.md §2.6), for `model.pos_embed: learned`.

    pos_embed [1, 1 + M², D]: the CLS position, then an M x M grid (M = 37: trained at 518 px,
    patch 14), added to [CLS, patches] before the register tokens are inserted after CLS.

For another input grid h x w the patch part is resized bicubically in fp32, as the official
`interpolate_pos_encoding`: with `interpolate_offset` (0.1 for the plain models) by
scale_factor ((h + offset) / M, (w + offset) / M), whose coordinate mapping differs slightly from
resizing to (h, w) (DINO issue #8); with offset 0 (the register models) by size (h, w), and
`antialias` as configured (True for the register models). The grid M = h = w returns the table
untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def interpolate_pos_embed(pos_embed: torch.Tensor, h: int, w: int, offset: float = 0.1,
                          antialias: bool = False) -> torch.Tensor:
    """[1, 1 + M², D] -> [1, 1 + h·w, D] in pos_embed's dtype."""
    n = pos_embed.shape[1] - 1
    m = int(round(n ** 0.5))
    if m * m != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
    if h == m and w == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
    if offset:
        kwargs = {"scale_factor": ((h + offset) / m, (w + offset) / m)}
    else:
        kwargs = {"size": (h, w)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    if grid.shape[-2:] != (h, w):
        raise ValueError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, "
                         f"expected {(h, w)} (offset {offset})")
    patches = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([pos_embed[:, :1].float(), patches], dim=1).to(pos_embed.dtype)
