"""Axial 2-D rotary position embedding of DINOv3 (SPEC.md §2.3), no learnable weights.

    periods p_j = base^(2j / (d_h/2)),  j = 0 .. d_h/4 - 1            (persistent buffer, [d_h/4])
    coords  c = 2 * ((i + 0.5)/h, (j + 0.5)/w) - 1                     ("separate" normalisation)
    train:  c *= s,  s = exp(U[-log r, log r])  (one scalar, both axes; only in training mode)
    angles  2*pi*c/p : [hw, 2, d_h/4] -> [hw, d_h/2] (all h-angles then all w-angles) -> tile x2
    x' = x*cos + rotate_half(x)*sin,  rotate_half([a, b]) = [-b, a]    (pairs x_i with x_{i+d_h/2})

Everything is computed in fp32 (the released models use rope dtype fp32); the caller casts q, k to
fp32 for the rotation and back. The official student calls this module once per block and per crop
type, so a fresh s is drawn for each (SPEC.md §9.4); eval mode draws nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RopePositionEmbedding(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, base: float = 100.0,
                 rescale_coords: float | None = None, device=None) -> None:
        super().__init__()
        head_dim = embed_dim // num_heads
        if head_dim % 4 != 0:
            raise ValueError(f"RoPE needs head_dim = embed_dim / num_heads divisible by 4, got "
                             f"{embed_dim}/{num_heads} = {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self.rescale_coords = rescale_coords
        self.register_buffer("periods", torch.empty(head_dim // 4, device=device,
                                                    dtype=torch.float32), persistent=True)

    def _init_weights(self) -> None:
        j = torch.arange(self.head_dim // 4, device=self.periods.device, dtype=torch.float32)
        self.periods.copy_(self.base ** (2 * j / (self.head_dim // 2)))

    def reset_parameters(self) -> None:
        self._init_weights()

    def forward(self, *, H: int, W: int, n_draws: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos), each [H*W, head_dim] fp32, for an H x W patch grid. With `n_draws`, each
        [n_draws, H*W, head_dim]: that many independent rescale draws in one go (training), or
        the one deterministic table repeated as a view (eval, no rescale). The student wants a
        fresh draw per block (SPEC.md §9.4); asking for all blocks at once costs ~10 small ops
        per crop type instead of ~15 per block and crop type (host time: every one of them is a
        launch on the critical path of an eager step)."""
        dd = {"device": self.periods.device, "dtype": torch.float32}
        coords_h = torch.arange(0.5, H, **dd) / H
        coords_w = torch.arange(0.5, W, **dd) / W
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1)  # [H,W,2]
        coords = 2.0 * coords.flatten(0, 1) - 1.0  # [HW, 2] in (-1, 1)
        k = 1 if n_draws is None else n_draws
        rescale = self.training and self.rescale_coords is not None
        if rescale:
            log_r = math.log(self.rescale_coords)
            s = torch.empty(k, **dd).uniform_(-log_r, log_r).exp()
            coords = coords * s[:, None, None]  # [k, HW, 2], the same products as one by one
        # periods may have been cast to bf16 by a wrapper; the official rounding quirk is then kept.
        angles = 2 * math.pi * coords[..., None] / self.periods.float()  # [(k,) HW, 2, d_h/4]
        angles = angles.flatten(-2).tile(2)  # -> [(k,) HW, d_h/2] -> [(k,) HW, d_h]
        sin, cos = torch.sin(angles), torch.cos(angles)
        if n_draws is None:
            return (sin[0], cos[0]) if rescale else (sin, cos)
        if not rescale:
            sin, cos = (t.expand(k, *t.shape) for t in (sin, cos))
        return sin, cos

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, rescale_coords={self.rescale_coords}"


def rope_rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_apply(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x [..., N_patch, d_h] rotated by angles [N_patch, d_h]."""
    return x * cos + rope_rotate_half(x) * sin


def apply_rope_to_patches(q: torch.Tensor, k: torch.Tensor,
                          rope: tuple[torch.Tensor, torch.Tensor] | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, H, N, d_h]; rotate the last N_patch tokens in the rope dtype (fp32), leave the
    1 + n_storage prefix tokens untouched, cast back to the input dtype."""
    if rope is None:
        return q, k
    sin, cos = rope
    prefix = q.shape[-2] - sin.shape[-2]
    out = []
    for t in (q, k):
        t32 = t.to(sin.dtype)
        rotated = rope_apply(t32[:, :, prefix:], sin, cos)
        out.append(torch.cat((t32[:, :, :prefix], rotated), dim=-2).to(t.dtype))
    return out[0], out[1]
