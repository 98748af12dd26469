"""Feed-forward layers of the ViT block (SPEC.md §2.2): MLP and SwiGLU.

MLP:    fc2(GELU_exact(fc1(x)))                  hidden = int(D * ffn_ratio)
SwiGLU: w3(silu(w1(x)) * w2(x))                  hidden = align_up(int(int(D * r) * 2/3), align)
Keys match the official ones (`mlp.fc1/fc2`, `mlp.w1/w2/w3`), all with biases.
With config `kernels.fuse_pointwise` (off by default) SwiGLU's gate silu(w1(x)) * w2(x) runs as
one Triton kernel (kernels/swiglu.py) where `kernels.impl` allows Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdino.layers.select import use_fused_pointwise

FFN_LAYERS = ("mlp", "swiglu", "swiglu32", "swiglu64", "swiglu128")


def swiglu_hidden_dim(hidden_features: int, align_to: int) -> int:
    """Official SwiGLU width: 2/3 of the MLP width, rounded up to a multiple of `align_to`."""
    d = int(hidden_features * 2 / 3)
    return d + (-d % align_to)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, bias: bool = True,
                 device=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device)
        self.act = nn.GELU()  # exact erf GELU, as the official nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, bias: bool = True,
                 align_to: int = 8, device=None) -> None:
        super().__init__()
        hidden = swiglu_hidden_dim(hidden_features, align_to)
        self.align_to = align_to  # read by the timm export (its swiglu_align_to)
        self.w1 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w2 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w3 = nn.Linear(hidden, in_features, bias=bias, device=device)
        # kernels.impl / kernels.fuse_pointwise; set by the backbone from the config
        self.kernels_impl: str = "torch"
        self.fuse_pointwise: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w1(x), self.w2(x)  # each [..., hidden]
        if use_fused_pointwise(self.kernels_impl, self.fuse_pointwise, x1, "swiglu"):
            from fastdino.kernels.swiglu import swiglu  # imports Triton only when used

            return self.w3(swiglu(x1, x2))
        return self.w3(F.silu(x1) * x2)


def ffn_for_width(embed_dim: int, hidden: int, gated: bool,
                  aligns: tuple[int, ...] = (8, 32, 64, 128)) -> tuple[str, float]:
    """(ffn_layer, ffn_ratio) whose official width formula gives an FFN of `hidden` channels, for
    converters that read a width (HF intermediate_size, timm mlp_ratio) instead of a ratio. The
    plain ratio when float rounding allows (6.0, 4.0, 3.0), else one nudged by half a channel so
    that int(D * r) lands on the intended integer; SwiGLU tries each alignment in `aligns`."""
    target = -(-hidden * 3 // 2) if gated else hidden  # int(D * r) must give this
    for ratio in (target / embed_dim, (target + 0.5) / embed_dim):
        for align in (aligns if gated else (0,)):
            width = (swiglu_hidden_dim(int(embed_dim * ratio), align) if gated
                     else int(embed_dim * ratio))
            if width == hidden:
                return ("mlp" if not gated else "swiglu" if align == 8 else f"swiglu{align}",
                        ratio)
    kind = f"SwiGLU, align {aligns}" if gated else "MLP"
    raise ValueError(f"an FFN width of {hidden} is not reachable by the official width formula "
                     f"for embed_dim={embed_dim} ({kind})")


def build_ffn(ffn_layer: str, dim: int, ffn_ratio: float, bias: bool = True,
              device=None) -> nn.Module:
    """`ffn_layer` is "mlp" or "swiglu[ALIGN]" (default align 8), as the official ffn_layer_dict."""
    hidden = int(dim * ffn_ratio)
    if ffn_layer == "mlp":
        return Mlp(dim, hidden, bias=bias, device=device)
    if ffn_layer in FFN_LAYERS:
        align = int(ffn_layer[len("swiglu"):] or 8)
        return SwiGLUFFN(dim, hidden, bias=bias, align_to=align, device=device)
    raise ValueError(f"ffn_layer = {ffn_layer!r} is invalid: allowed is one of "
                     + " | ".join(FFN_LAYERS))
