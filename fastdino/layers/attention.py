"""Multi-head self-attention of the DINOv3 block (SPEC.md §2.2).

    qkv = LinearKMaskedBias(x)            [B, N, 3D] -> [B, N, 3, H, d_h] -> q, k, v [B, H, N, d_h]
    q, k <- RoPE on the patch tokens only (fp32), prefix (CLS + storage) untouched
    o = softmax(q k^T / sqrt(d_h)) v      (backend chosen by model.attn_impl)
    out = proj(o)                         [B, N, D]

List forward (multi-crop): the pointwise qkv / proj matmuls run once on the tokens of all crop
types concatenated; the attention core runs per crop type (the official `cat_keep_shapes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdino.layers.attn_backend import attention, resolve_attn_impl
from fastdino.layers.rope_position_encoding import apply_rope_to_patches
from fastdino.layers.token_cat import cat_keep_shapes, uncat_with_shapes

Rope = tuple[torch.Tensor, torch.Tensor] | None


class LinearKMaskedBias(nn.Linear):
    """Linear(D, 3D) whose bias is multiplied by the persistent buffer `bias_mask` (1 on the q and v
    thirds, 0 on the k third), so the key bias is always zero whatever `bias` holds. No buffer when
    the layer has no bias (ViT-7B)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device)
        if out_features % 3 != 0:
            raise ValueError(f"LinearKMaskedBias needs out_features divisible by 3, got "
                             f"{out_features}")
        if self.bias is not None:
            self.register_buffer("bias_mask", torch.empty(out_features, device=device),
                                 persistent=True)

    def reset_bias_mask(self) -> None:
        if self.bias is not None:
            o = self.out_features
            self.bias_mask.fill_(1)
            self.bias_mask[o // 3: 2 * o // 3].fill_(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 mask_k_bias: bool = True, attn_impl: str = "auto", device=None) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.backend = resolve_attn_impl(attn_impl)
        linear_cls = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear_cls(dim, 3 * dim, bias=qkv_bias, device=device)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)

    def compute_attention(self, qkv: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        """qkv [B, N, 3D] -> attention output before proj, [B, N, D]."""
        B, N, three_d = qkv.shape
        D = three_d // 3
        qkv_bn3hd = qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv_bn3hd.unbind(2))  # each [B, H, N, d_h]
        q, k = apply_rope_to_patches(q, k, rope)
        o_bhnd = attention(q, k, v, self.backend)
        return o_bhnd.transpose(1, 2).reshape(B, N, D)

    def forward_list(self, x_list: list[torch.Tensor], rope_list: list[Rope]) -> list[torch.Tensor]:
        x_flat, shapes, num_tokens = cat_keep_shapes(x_list)
        qkv_list = uncat_with_shapes(self.qkv(x_flat), shapes, num_tokens)
        o_list = [self.compute_attention(qkv, rope)
                  for qkv, rope in zip(qkv_list, rope_list, strict=True)]
        o_flat, shapes, num_tokens = cat_keep_shapes(o_list)
        return uncat_with_shapes(self.proj(o_flat), shapes, num_tokens)

    def forward(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        return self.proj(self.compute_attention(self.qkv(x), rope))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attn_impl={self.attn_impl} ({self.backend})"
