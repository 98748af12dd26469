"""Multi-head self-attention of the DINOv3 block (SPEC.md §2.2).

    qkv = LinearKMaskedBias(x)            [B, N, 3D] -> [B, N, 3, H, d_h] -> q, k, v [B, H, N, d_h]
    q, k <- RoPE on the patch tokens only (fp32), prefix (CLS + storage) untouched
    o = softmax(q k^T / sqrt(d_h)) v      (backend chosen by model.attn_impl, attn_backend.py)
    out = proj(o)                         [B, N, D]

List forward (multi-crop): the pointwise qkv / proj matmuls run once on the tokens of all crop
types concatenated. The attention core runs per crop type (the official `cat_keep_shapes` path),
or, with a flash-attn backend, once over all crop types packed as variable-length sequences
(cu_seqlens): the flat token layout [sum_i B_i*N_i, 3D] already is flash-attn's packed layout.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fastdino.layers.attn_backend import (
    FLASH_BACKENDS,
    attention,
    check_attn_impl,
    select_backend,
    varlen_attention,
)
from fastdino.layers.rope_position_encoding import apply_rope_to_patches
from fastdino.layers.select import use_triton
from fastdino.layers.token_cat import cat_keep_shapes, uncat_with_shapes

Rope = tuple[torch.Tensor, torch.Tensor] | None


@functools.lru_cache(maxsize=64)
def packed_cu_seqlens(crops: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """[1 + sum_i B_i] int32 sequence starts of the packed crop types ((B_i, N_i) each): built
    once per step shape and device, not on the host with a host-to-device copy in every layer of
    every step (which also kept the step out of CUDA-graph capture). Read-only."""
    lengths = [n for b, n in crops for _ in range(b)]
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


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
        if self.bias is None:
            return F.linear(x, self.weight)
        mask = self.bias_mask
        bias = self.bias * (mask if mask.dtype == self.bias.dtype else mask.to(self.bias.dtype))
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 mask_k_bias: bool = True, attn_impl: str = "auto", device=None) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        check_attn_impl(attn_impl)
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        # Set by the backbone before its blocks run (so compiled blocks only read a string);
        # None = choose from the tensors at call time.
        self.backend: str | None = None
        # Pack the crop types into one varlen call: None = when the backend is flash-attn.
        self.pack_crops: bool | None = None
        # kernels.impl for the fused RoPE (kernels/rope.py); set by the backbone from the config
        self.kernels_impl: str = "torch"
        linear_cls = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear_cls(dim, 3 * dim, bias=qkv_bias, device=device)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)

    def _backend(self, t: torch.Tensor) -> str:
        return self.backend or select_backend(self.attn_impl, t.device, t.dtype)

    def compute_attention(self, qkv: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        """qkv [B, N, 3D] -> attention output before proj, [B, N, D]."""
        B, N, three_d = qkv.shape
        D = three_d // 3
        if rope is not None and use_triton(self.kernels_impl, qkv, "rope"):
            from fastdino.kernels.rope import rope_qkv  # imports Triton only when used

            sin, cos = rope
            q, k, v = rope_qkv(qkv, cos, sin, self.num_heads, N - sin.shape[0])  # [B, H, N, d_h]
        else:
            qkv_bn3hd = qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads)
            q, k, v = (t.transpose(1, 2) for t in qkv_bn3hd.unbind(2))  # each [B, H, N, d_h]
            q, k = apply_rope_to_patches(q, k, rope)
        o_bhnd = attention(q, k, v, self._backend(qkv))
        return o_bhnd.transpose(1, 2).reshape(B, N, D)

    def _packed_attention(self, qkv_flat: torch.Tensor, shapes: list[torch.Size],
                          rope_list: list[Rope], backend: str) -> torch.Tensor:
        """qkv_flat [T, 3D] (crop types back to back, T = sum_i B_i*N_i) -> [T, D]."""
        T, three_d = qkv_flat.shape
        H = self.num_heads
        d_h = three_d // 3 // H
        q_parts, k_parts, v_parts, lengths = [], [], [], []
        fused = (all(r is not None for r in rope_list)
                 and use_triton(self.kernels_impl, qkv_flat, "rope"))
        offset = 0
        for shape, rope in zip(shapes, rope_list, strict=True):
            b, n = shape[0], shape[1]
            if fused:
                from fastdino.kernels.rope import rope_qkv  # imports Triton only when used

                sin, cos = rope
                qkv_i = qkv_flat[offset:offset + b * n].view(b, n, three_d)
                q_i, k_i, v_i = rope_qkv(qkv_i, cos, sin, H, n - sin.shape[0], layout="bnhd")
                v_parts.append(v_i.reshape(b * n, H, d_h))  # each [b, n, H, d_h] -> [b*n, H, d_h]
            else:
                qkv_i = qkv_flat[offset:offset + b * n].view(b, n, 3, H, d_h)
                q_i, k_i = (qkv_i[:, :, j].transpose(1, 2) for j in (0, 1))  # [b, H, n, d_h]
                q_i, k_i = (t.transpose(1, 2) for t in apply_rope_to_patches(q_i, k_i, rope))
            q_parts.append(q_i.reshape(b * n, H, d_h))
            k_parts.append(k_i.reshape(b * n, H, d_h))
            lengths += [n] * b
            offset += b * n
        q, k = torch.cat(q_parts), torch.cat(k_parts)  # [T, H, d_h]
        v = torch.cat(v_parts) if fused else qkv_flat.view(T, 3, H, d_h)[:, 2]
        cu_seqlens = packed_cu_seqlens(tuple((s[0], s[1]) for s in shapes), qkv_flat.device)
        o = varlen_attention(q, k, v, cu_seqlens, max(lengths), backend)
        return o.reshape(T, H * d_h)

    def forward_flat(self, h_flat: torch.Tensor, shapes: list[torch.Size],
                     rope_list: list[Rope]) -> torch.Tensor:
        """h_flat [T, D]: the (normed) tokens of every crop type back to back, crop type i of
        shape shapes[i] = [B_i, N_i, D] -> proj output [T, D]. The block keeps its residual
        stream in this layout, so only the attention core sees the crop types apart."""
        qkv_flat = self.qkv(h_flat)
        backend = self._backend(qkv_flat)
        pack = self.pack_crops if self.pack_crops is not None else backend in FLASH_BACKENDS
        if pack and len(shapes) > 1:
            return self.proj(self._packed_attention(qkv_flat, shapes, rope_list, backend))
        num_tokens = [s[:-1].numel() for s in shapes]
        qkv_list = uncat_with_shapes(qkv_flat, shapes, num_tokens)
        o_list = [self.compute_attention(qkv, rope)
                  for qkv, rope in zip(qkv_list, rope_list, strict=True)]
        return self.proj(cat_keep_shapes(o_list)[0])

    def forward_list(self, x_list: list[torch.Tensor], rope_list: list[Rope]) -> list[torch.Tensor]:
        x_flat, shapes, num_tokens = cat_keep_shapes(x_list)
        return uncat_with_shapes(self.forward_flat(x_flat, shapes, rope_list), shapes, num_tokens)

    def forward(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        return self.proj(self.compute_attention(self.qkv(x), rope))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attn_impl={self.attn_impl}"
