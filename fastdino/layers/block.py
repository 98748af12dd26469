"""Pre-norm transformer block of DINOv3 (SPEC.md §2.2), list-of-crop-types forward.

    x <- x + ls1 * attn(norm1(x))          (attention per crop type, RoPE per crop type)
    x <- x + ls2 * mlp(norm2(x))

Pointwise ops (norm1, qkv, proj, norm2, FFN, LayerScale) run once on the tokens of all crop types
concatenated. In training with drop_path > 0 each branch runs on a random subset of the samples
of each crop type (drop_path.py); otherwise on all of them.

With config `kernels.fuse_pointwise` (off by default) and no active drop path (eval, or rate 0),
the middle of the block, ls1 + residual add + norm2, runs as one Triton kernel
(kernels/layernorm_residual.py) returning both the new residual stream and norm2's output. With
drop path active the attention branch is added to a random, rescaled subset of the samples and
the FFN branch reads another subset, so the rows do not line up: the unfused path runs.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdino.layers.attention import Rope, SelfAttention
from fastdino.layers.drop_path import add_residual, sample_subset
from fastdino.layers.ffn_layers import build_ffn
from fastdino.layers.layer_scale import LayerScale
from fastdino.layers.select import use_fused_pointwise
from fastdino.layers.token_cat import cat_keep_shapes, uncat_with_shapes

# per branch (attention, FFN), per crop type: (sample indices or None, residual scale)
Subsets = tuple[list[tuple[torch.Tensor | None, float]], list[tuple[torch.Tensor | None, float]]]


class SelfAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_ratio: float = 4.0, ffn_layer: str = "mlp",
                 qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True,
                 mask_k_bias: bool = True, layerscale_init: float = 1e-5, norm_eps: float = 1e-5,
                 drop_path: float = 0.0, attn_impl: str = "auto", device=None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, device=device)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                                  mask_k_bias=mask_k_bias, attn_impl=attn_impl, device=device)
        self.ls1 = LayerScale(dim, layerscale_init, device=device)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, device=device)
        self.mlp = build_ffn(ffn_layer, dim, ffn_ratio, bias=ffn_bias, device=device)
        self.ls2 = LayerScale(dim, layerscale_init, device=device)
        self.sample_drop_ratio = drop_path
        # kernels.impl / kernels.fuse_pointwise; set by the backbone (set_pointwise_fusion)
        self.kernels_impl: str = "torch"
        self.fuse_pointwise: bool = False

    def set_pointwise_fusion(self, kernels_impl: str, fuse_pointwise: bool) -> None:
        """Config `kernels.impl` and `kernels.fuse_pointwise` for this block and its FFN."""
        self.kernels_impl, self.fuse_pointwise = kernels_impl, fuse_pointwise
        if hasattr(self.mlp, "fuse_pointwise"):  # SwiGLUFFN (the GELU MLP has no fused op)
            self.mlp.kernels_impl, self.mlp.fuse_pointwise = kernels_impl, fuse_pointwise

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters the fused path reads without calling their module (ls1's gamma, norm2's
        weight and bias). ZeRO-3 gathers a parameter when its owning module runs, so these
        must be registered with this block (parallel.py does), or they could be read while
        partitioned once a config lowers DeepSpeed's persistence threshold below D."""
        if not self.fuse_pointwise:
            return []
        return [*self.ls1.parameters(), *self.norm2.parameters()]

    def _subsets(self, x_list: list[torch.Tensor]) -> list[tuple[torch.Tensor | None, float]]:
        if self.training and self.sample_drop_ratio > 0.0:
            return [sample_subset(x.shape[0], self.sample_drop_ratio, x.device) for x in x_list]
        return [(None, 1.0)] * len(x_list)

    def forward(self, x_list: list[torch.Tensor], rope_list: list[Rope],
                subsets: Subsets | None = None) -> list[torch.Tensor]:
        """x_list: per crop type [B_i, N_i, D]; rope_list: per crop type (sin, cos) or None.
        subsets: the drop-path draws (attention branch, FFN branch), each per crop type
        (indices, scale), made by the caller (the backbone draws every block's at once, and
        activation checkpointing then recomputes with the same ones); None: drawn here when drop
        path is active."""
        # Attention branch. RoPE has no batch dimension, so it needs no subsetting.
        subsets_ffn = None if subsets is None else subsets[1]
        subsets = self._subsets(x_list) if subsets is None else subsets[0]
        if all(idx is None for idx, _ in subsets):
            return self._forward_flat(x_list, rope_list)
        x_in = [x if idx is None else x[idx] for x, (idx, _) in zip(x_list, subsets, strict=True)]
        flat, shapes, num_tokens = cat_keep_shapes(x_in)
        a_flat = self.attn.forward_flat(self.norm1(flat), shapes, rope_list)
        a_list = uncat_with_shapes(self.ls1(a_flat), shapes, num_tokens)
        x_list = [add_residual(x, a, idx, s)
                  for x, a, (idx, s) in zip(x_list, a_list, subsets, strict=True)]

        # FFN branch, with its own independent subsets.
        subsets = self._subsets(x_list) if subsets_ffn is None else subsets_ffn
        x_in = [x if idx is None else x[idx] for x, (idx, _) in zip(x_list, subsets, strict=True)]
        flat, shapes, num_tokens = cat_keep_shapes(x_in)
        f_list = uncat_with_shapes(self.ls2(self.mlp(self.norm2(flat))), shapes, num_tokens)
        return [add_residual(x, f, idx, s)
                for x, f, (idx, s) in zip(x_list, f_list, subsets, strict=True)]

    def _forward_flat(self, x_list: list[torch.Tensor], rope_list: list[Rope]
                      ) -> list[torch.Tensor]:
        """No drop path (eval, the teacher, or rate 0): every branch reads every row, so the
        residual stream stays one [T, D] tensor through the block (one concatenation in, one for
        the attention outputs; views out), instead of splitting and re-concatenating the crop
        types around every pointwise step. Bit-identical to the per-crop-type path: LayerNorm,
        the linears and the adds are row-wise."""
        flat, shapes, num_tokens = cat_keep_shapes(x_list)
        a_flat = self.attn.forward_flat(self.norm1(flat), shapes, rope_list)
        # The kernel returns norm2's output in the stream's dtype; under autocast nn.LayerNorm
        # returns fp32, so there it fuses only an fp32 stream (fp32 params, the usual case).
        same_dtype = flat.dtype == torch.float32 or not torch.is_autocast_enabled(
            flat.device.type)
        if same_dtype and use_fused_pointwise(self.kernels_impl, self.fuse_pointwise, a_flat,
                                              "layernorm_residual"):
            from fastdino.kernels.layernorm_residual import layernorm_residual

            # y = flat + ls1(a) and h = norm2(y) in one pass. The [D] parameters of ls1 and norm2
            # are read without calling those modules: under ZeRO-3 that relies on them staying
            # unpartitioned (DeepSpeed's default stage3_param_persistence_threshold, 1e5
            # elements, keeps every [D] parameter whole).
            y, h = layernorm_residual(flat, a_flat, self.ls1.gamma, self.norm2.weight,
                                      self.norm2.bias, self.norm2.eps)
        else:
            y = add_residual(flat, self.ls1(a_flat), None, 1.0)
            h = self.norm2(y)
        return uncat_with_shapes(add_residual(y, self.ls2(self.mlp(h)), None, 1.0), shapes,
                                 num_tokens)
