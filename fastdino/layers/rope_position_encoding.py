"""Axial 2-D rotary position embedding of DINOv3 (SPEC.md §2.3), no learnable weights.

    periods p_j = base^(2j / (d_h/2)),  j = 0 .. d_h/4 - 1            (persistent buffer, [d_h/4])
    coords  c = 2 * ((i + 0.5)/h, (j + 0.5)/w) - 1                     ("separate" normalisation)
    train:  c *= s,  s = exp(U[-log r, log r])  (one scalar, both axes; only in training mode)
    angles  2*pi*c/p : [hw, 2, d_h/4] -> [hw, d_h/2] (all h-angles then all w-angles) -> tile x2
    x' = x*cos + rotate_half(x)*sin,  rotate_half([a, b]) = [-b, a]    (pairs x_i with x_{i+d_h/2})

Precision (`dtype`, config `model.pos_embed_rope_dtype`), as the official RopePositionEmbedding:
the periods buffer is stored in the rope dtype and computed in it (bf16: 2j, /(d_h/2), base**
each rounded to bf16), and so are the coordinates, the rescale draw, the angles and sin/cos; the
dtype is the module's, not the buffer's (a wrapper casting buffers, DeepSpeed bf16, must not
change it; an fp32 module then uses its bf16-rounded periods in fp32 math, as the hub does with
the released files' periods). bf16 is the official trainer's (its build_model never passes the
config key, so DinoVisionTransformer's default bf16 applies to every official run; its FSDP2
blocks would cast fp32 tables to bf16 anyway: MixedPrecisionPolicy casts every float input of a
block to param_dtype bf16); fp32 is the official hub's inference setting (released backbones,
dinov3/hub/backbones.py).
The tables are handed out in fp32 (bf16 ones upcast, exactly) and the caller rotates q, k in
fp32 and casts back once: the official training compiles its blocks, and inductor computes the
bf16 rotation chain in fp32 with one rounding at the end (its eager bf16 path rounds each op).
Both the reference rotation and the fused Triton kernel (kernels/rope.py) do exactly that.
The official student calls this module once per block and per crop type, so a fresh s is drawn
for each (SPEC.md §9.4); eval mode draws nothing.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

# config name -> torch dtype (model.pos_embed_rope_dtype; the official dtype_dict's)
ROPE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _autocast_off(device: torch.device):
    """The tables are computed in the rope dtype whatever autocast is on around the call
    (autocast would run `exp` and `pow` in fp32 and promote the bf16 chain to fp32)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class RopePositionEmbedding(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, base: float = 100.0,
                 rescale_coords: float | None = None, dtype: str = "fp32", device=None) -> None:
        super().__init__()
        head_dim = embed_dim // num_heads
        if head_dim % 4 != 0:
            raise ValueError(f"RoPE needs head_dim = embed_dim / num_heads divisible by 4, got "
                             f"{embed_dim}/{num_heads} = {head_dim}")
        if dtype not in ROPE_DTYPES:
            raise ValueError(f"pos_embed_rope_dtype = {dtype!r} is invalid: allowed is "
                             + " | ".join(ROPE_DTYPES))
        self.head_dim = head_dim
        self.base = base
        self.rescale_coords = rescale_coords
        self.rope_dtype = dtype
        self.dtype = ROPE_DTYPES[dtype]  # the compute dtype: never read off the buffer
        self.register_buffer("periods", torch.empty(head_dim // 4, device=device,
                                                    dtype=self.dtype), persistent=True)

    def _init_weights(self) -> None:
        dd = {"device": self.periods.device, "dtype": self.dtype}
        with torch.no_grad(), _autocast_off(self.periods.device):
            j = torch.arange(self.head_dim // 4, **dd)
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
        with _autocast_off(self.periods.device):
            return self._tables(H, W, n_draws)

    def _tables(self, H: int, W: int, n_draws: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        dd = {"device": self.periods.device, "dtype": self.dtype}
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
        # a buffer cast by a wrapper (DeepSpeed bf16) is used at its rounded values
        angles = 2 * math.pi * coords[..., None] / self.periods.to(self.dtype)  # [(k,)HW,2,d/4]
        angles = angles.flatten(-2).tile(2)  # -> [(k,) HW, d_h/2] -> [(k,) HW, d_h]
        # fp32 out (exact for bf16 tables, a no-op for fp32): the rotation runs in fp32
        sin, cos = torch.sin(angles).float(), torch.cos(angles).float()
        if n_draws is None:
            return (sin[0], cos[0]) if rescale else (sin, cos)
        if not rescale:
            sin, cos = (t.expand(k, *t.shape) for t in (sin, cos))
        return sin, cos

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, base={self.base}, "
                f"rescale_coords={self.rescale_coords}, dtype={self.rope_dtype}")


def periods_shift(rope: RopePositionEmbedding) -> float:
    """Largest relative difference between `rope`'s periods and base^(2j/(d_h/2)) computed in fp32,
    which is what Hugging Face (inv_freq from rope_theta) and timm (rope_temperature) rebuild:
    neither stores the periods (non-persistent buffers), so bf16-rounded ones (a bf16 run, the
    released files) cannot travel to them; up to 2^-9 ~ 0.2 % per period."""
    if rope.periods.is_meta:
        return 0.0
    j = torch.arange(rope.head_dim // 4, dtype=torch.float32)
    fresh = rope.base ** (2 * j / (rope.head_dim // 2))
    return ((rope.periods.detach().float().cpu() - fresh) / fresh).abs().max().item()


def periods_shift_note(rope: RopePositionEmbedding, target: str, field: str) -> str | None:
    """A one-line warning for an export to `target` when `rope`'s periods are not the fp32
    ones the target rebuilds from `field` (None when they are)."""
    shift = periods_shift(rope)
    if shift == 0.0:
        return None
    return (f"rope_embed.periods differ from the fp32 periods of {field}={rope.base:g} by up to "
            f"{shift:.3%} (bf16-rounded: a model.pos_embed_rope_dtype=bf16 run or released "
            f"weights); {target} rebuilds them from {field} and stores none, so the exported "
            f"model's RoPE periods, hence its outputs, differ slightly from fastdino's and the "
            f"official hub's (which use the rounded periods)")


def rope_rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_apply(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x [..., N_patch, d_h] rotated by angles [N_patch, d_h]."""
    return x * cos + rope_rotate_half(x) * sin


def apply_rope_to_patches(q: torch.Tensor, k: torch.Tensor,
                          rope: tuple[torch.Tensor, torch.Tensor] | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, H, N, d_h]; rotate the last N_patch tokens in the tables' dtype (fp32), leave the
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
