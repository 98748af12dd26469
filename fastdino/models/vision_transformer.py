"""DINOv3 vision transformer (SPEC.md §2), with the official module and state-dict names.

Shapes (B images of one crop type, h x w patches, N = h*w, n = n_storage_tokens, D = embed_dim):
    image [B, 3, H, W] -> patch_embed [B, h, w, D] -> [B, N, D]
    masked patches (masks [B, N] bool) replaced by mask_token [1, D]
    tokens [B, 1 + n + N, D] = [CLS, storage tokens, patches (row-major)]
    blocks (RoPE on the patches, per crop type) -> norm -> outputs dict (forward_features_list)
With pos_embed="learned" (DINOv2, SPEC.md §2.6): [CLS, patches] + the interpolated learned table,
then the storage ("register") tokens inserted after CLS; no RoPE.

Build on the meta device, `to_empty`, then `init_weights()` (STYLE.md §8.11); built on a real
device the constructor initialises by itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from fastdino.layers.attention import LinearKMaskedBias
from fastdino.layers.attn_backend import select_backend
from fastdino.layers.block import SelfAttentionBlock
from fastdino.layers.drop_path import draw_subsets
from fastdino.layers.layer_scale import LayerScale
from fastdino.layers.patch_embed import PatchEmbed
from fastdino.layers.pos_embed import interpolate_pos_embed
from fastdino.layers.rope_position_encoding import RopePositionEmbedding
from fastdino.models.backbone_api import BackboneCalls, pack_intermediates


def _is_meta(device) -> bool:
    return device is not None and torch.device(device).type == "meta"


class DinoVisionTransformer(BackboneCalls, nn.Module):
    def __init__(self, *, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, ffn_ratio: float = 4.0,
                 ffn_layer: str = "mlp", qkv_bias: bool = True, proj_bias: bool = True,
                 ffn_bias: bool = True, mask_k_bias: bool = True, layerscale_init: float = 1e-5,
                 norm_eps: float = 1e-5, drop_path_rate: float = 0.0, n_storage_tokens: int = 4,
                 rope_base: float = 100.0, rope_rescale: float | None = 2.0,
                 rope_dtype: str = "fp32", untie_global_and_local_cls_norm: bool = False,
                 untie_cls_and_patch_norms: bool = False, attn_impl: str = "auto",
                 activation_checkpointing: bool = False, pos_embed: str = "rope",
                 pos_embed_grid: int = 37, interpolate_offset: float = 0.1,
                 interpolate_antialias: bool = False, device=None) -> None:
        super().__init__()
        if layerscale_init is None or not layerscale_init > 0:
            # the official null / 0 means no LayerScale at all (nn.Identity, no ls1/ls2 keys);
            # here 0 would zero every residual branch and null fail deep in the init
            raise ValueError(f"layerscale_init = {layerscale_init!r} is invalid: allowed is a "
                             "float > 0 (blocks without LayerScale are not supported)")
        self.num_features = self.embed_dim = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.n_storage_tokens = n_storage_tokens
        self.activation_checkpointing = activation_checkpointing
        self.attn_impl = attn_impl

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, device=device)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, device=device))
        if n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(
                torch.empty(1, n_storage_tokens, embed_dim, device=device))
        if pos_embed not in ("rope", "learned"):
            raise ValueError(f"pos_embed={pos_embed!r} is invalid: allowed is rope | learned")
        # DINOv3: RoPE in every attention (no weights); DINOv2: a learned absolute table added
        # to the tokens once (layers/pos_embed.py), no RoPE. rope_dtype (the official
        # pos_embed_rope_dtype): the periods buffer's and the tables' dtype; this constructor
        # defaults to fp32 as the official hub factories do, training configs to bf16 as the
        # official trainer runs (config.py ModelConfig.pos_embed_rope_dtype)
        self.rope_embed = (RopePositionEmbedding(embed_dim, num_heads, base=rope_base,
                                                 rescale_coords=rope_rescale, dtype=rope_dtype,
                                                 device=device)
                           if pos_embed == "rope" else None)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(
                torch.empty(1, 1 + pos_embed_grid ** 2, embed_dim, device=device))
            self.interpolate_offset = interpolate_offset
            self.interpolate_antialias = interpolate_antialias
        self.blocks = nn.ModuleList([
            SelfAttentionBlock(embed_dim, num_heads, ffn_ratio=ffn_ratio, ffn_layer=ffn_layer,
                               qkv_bias=qkv_bias, proj_bias=proj_bias, ffn_bias=ffn_bias,
                               mask_k_bias=mask_k_bias, layerscale_init=layerscale_init,
                               norm_eps=norm_eps, drop_path=drop_path_rate, attn_impl=attn_impl,
                               device=device)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps, device=device)
        # Final norm of the CLS + storage tokens, `norm` then only of the patches (the official
        # untie_cls_and_patch_norms, off in every released model; eval too).
        self.cls_norm = (nn.LayerNorm(embed_dim, eps=norm_eps, device=device)
                         if untie_cls_and_patch_norms else None)
        # Final norm of the local crops' CLS + storage tokens (list element 1), training only.
        self.local_cls_norm = (nn.LayerNorm(embed_dim, eps=norm_eps, device=device)
                               if untie_global_and_local_cls_norm else None)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim, device=device))
        if not _is_meta(device):
            self.init_weights()

    # ----------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init (SPEC.md §2.2); touches every parameter and buffer."""
        if self.rope_embed is not None:
            self.rope_embed._init_weights()
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)  # DINOv2's init
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_storage_tokens > 0:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, LinearKMaskedBias):
                    m.reset_bias_mask()
            elif isinstance(m, (nn.LayerNorm, LayerScale, PatchEmbed)):
                m.reset_parameters()

    # -------------------------------------------------------------------------------------- tokens
    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None
                                  ) -> tuple[torch.Tensor, tuple[int, int]]:
        """image [B, 3, H, W], masks [B, N] bool or None -> tokens [B, 1 + n + N, D], (h, w)."""
        p, c = self.patch_size, self.patch_embed.in_chans
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] < p or x.shape[3] < p:
            # one line naming the input, not the convolution's (or a later permute's) message
            raise ValueError(f"images have shape {tuple(x.shape)}: expected [B, {c}, H, W] with "
                             f"H, W >= the patch size {p}")
        if masks is not None and masks.dtype != torch.bool:
            raise ValueError(f"masks have dtype {masks.dtype}: expected a bool tensor [B, N] "
                             "(True = masked patch)")
        x = self.patch_embed(x)  # [B, h, w, D]
        B, h, w, D = x.shape
        x = x.flatten(1, 2)  # [B, N, D]
        if masks is not None:
            if masks.shape != (B, h * w):
                raise ValueError(f"masks have shape {tuple(masks.shape)}, expected [B, N] = "
                                 f"[{B}, {h * w}] for a {h}x{w} patch grid")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            # Keep mask_token in the graph (zero gradient) so every parameter gets a gradient.
            cls_token = self.cls_token + 0 * self.mask_token
        if self.rope_embed is None:  # DINOv2: [CLS, patches] + pos_embed, then the registers
            x = torch.cat([cls_token.expand(B, -1, -1), x.to(cls_token.dtype)], dim=1)
            x = x + interpolate_pos_embed(self.pos_embed, h, w, self.interpolate_offset,
                                          self.interpolate_antialias).to(x.dtype)
            if self.n_storage_tokens > 0:
                x = torch.cat([x[:, :1], self.storage_tokens.expand(B, -1, -1).to(x.dtype),
                               x[:, 1:]], dim=1)
            return x, (h, w)
        prefix = [cls_token.expand(B, -1, -1)]
        if self.n_storage_tokens > 0:
            prefix.append(self.storage_tokens.expand(B, -1, -1))
        return torch.cat([*prefix, x.to(cls_token.dtype)], dim=1), (h, w)

    def _run_block(self, blk: nn.Module, x_list, rope_list, subsets=None):
        if self.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x_list, rope_list, subsets,
                                                     use_reentrant=False)
        return blk(x_list, rope_list, subsets)

    def _drop_path_subsets(self, tokens: list[torch.Tensor]) -> list:
        """Every block's drop-path subsets (attention and FFN branch, per crop type), drawn in
        one go per crop type (`draw_subsets`) when training with one drop rate for all blocks;
        else None per block (each block draws its own, or none)."""
        ratios = {blk.sample_drop_ratio for blk in self.blocks}
        n = len(self.blocks)
        if not self.training or len(ratios) != 1 or ratios == {0.0}:
            return [None] * n
        ratio = ratios.pop()
        per_crop = [draw_subsets(t.shape[0], ratio, 2 * n, t.device) for t in tokens]
        return [([crop[2 * i] for crop in per_crop], [crop[2 * i + 1] for crop in per_crop])
                for i in range(n)]

    def _set_attn_backend(self, tokens: torch.Tensor) -> None:
        """Choose the attention backend for this device / compute dtype once, outside the
        (possibly compiled) blocks, which then only read `attn.backend`."""
        dev = tokens.device
        dtype = (torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type)
                 else tokens.dtype)
        backend = select_backend(self.attn_impl, dev, dtype)
        for blk in self.blocks:
            blk.attn.backend = backend

    # ------------------------------------------------------------------------------------- forward
    def forward_features_list(self, x_list: list[torch.Tensor],
                              masks_list: list[torch.Tensor | None]) -> list[dict]:
        """One output dict per crop type; element 1 is taken to be the local crops."""
        if len(x_list) != len(masks_list):
            raise ValueError(f"forward_features_list got {len(x_list)} crop tensors but "
                             f"{len(masks_list)} masks (give None for an unmasked crop type)")
        tokens, hw_list = [], []
        for x, masks in zip(x_list, masks_list, strict=True):
            t, hw = self.prepare_tokens_with_masks(x, masks)
            tokens.append(t)
            hw_list.append(hw)
        # Official quirk kept: RoPE is called per block and per crop type, so in training a fresh
        # rescale is drawn for each (all blocks' draws made at once per crop type); in eval the
        # one deterministic table comes back repeated as a view (rope_embed's n_draws).
        if self.rope_embed is None:  # learned absolute positions: no rotation in the blocks
            block_ropes = [[None] * len(tokens) for _ in self.blocks]
        else:
            tables = [self.rope_embed(H=h, W=w, n_draws=len(self.blocks)) for h, w in hw_list]
            # per crop type: one unbind per table (not a select per block: host ops)
            per_crop = [list(zip(sin.unbind(0), cos.unbind(0), strict=True))
                        for sin, cos in tables]
            block_ropes = [list(ropes) for ropes in zip(*per_crop, strict=True)]
        self._set_attn_backend(tokens[0])
        block_subsets = self._drop_path_subsets(tokens)
        for blk, ropes, subsets in zip(self.blocks, block_ropes, block_subsets, strict=True):
            tokens = self._run_block(blk, tokens, ropes, subsets)
        n_prefix = 1 + self.n_storage_tokens
        outputs = []
        for idx, (x, masks) in enumerate(zip(tokens, masks_list, strict=True)):
            if self.local_cls_norm is not None and self.training and idx == 1:
                x_norm_cls_reg = self.local_cls_norm(x[:, :n_prefix])
                x_norm_patch = self.norm(x[:, n_prefix:])
            elif self.cls_norm is not None:
                x_norm_cls_reg = self.cls_norm(x[:, :n_prefix])
                x_norm_patch = self.norm(x[:, n_prefix:])
            else:
                x_norm = self.norm(x)
                x_norm_cls_reg, x_norm_patch = x_norm[:, :n_prefix], x_norm[:, n_prefix:]
            outputs.append({
                "x_norm_clstoken": x_norm_cls_reg[:, 0],  # [B, D]
                "x_storage_tokens": x_norm_cls_reg[:, 1:],  # [B, n, D]
                "x_norm_patchtokens": x_norm_patch,  # [B, N, D]
                "x_prenorm": x,  # [B, 1 + n + N, D]
                "masks": masks,
            })
        return outputs

    # ------------------------------------------------------------------------------ intermediates
    def _get_intermediate_layers_not_chunked(self, x: torch.Tensor, n: int | Sequence[int] = 1
                                             ) -> list[torch.Tensor]:
        tokens, (h, w) = self.prepare_tokens_with_masks(x)
        self._set_attn_backend(tokens)
        total = len(self.blocks)
        take = range(total - n, total) if isinstance(n, int) else n
        out = []
        for i, blk in enumerate(self.blocks):
            rope = None if self.rope_embed is None else self.rope_embed(H=h, W=w)
            tokens = blk([tokens], [rope])[0]
            if i in take:
                out.append(tokens)
        if len(out) != len(take):
            raise ValueError(f"get_intermediate_layers: only {len(out)} of the requested blocks "
                             f"{list(take)} exist (depth {total})")
        return out

    def get_intermediate_layers(self, x: torch.Tensor, *, n: int | Sequence[int] = 1,
                                reshape: bool = False, return_class_token: bool = False,
                                return_extra_tokens: bool = False, norm: bool = True):
        """Outputs of the last n blocks (or the listed ones): patch tokens [B, N, D] or, with
        reshape, [B, D, h, w]; optionally zipped with CLS [B, D] and storage tokens [B, n, D]."""
        outputs = self._get_intermediate_layers_not_chunked(x, n)
        n_prefix = 1 + self.n_storage_tokens
        if norm and self.cls_norm is not None:
            outputs = [torch.cat((self.cls_norm(o[:, :n_prefix]), self.norm(o[:, n_prefix:])),
                                 dim=1) for o in outputs]
        elif norm:
            outputs = [self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        extra_tokens = [o[:, 1:n_prefix] for o in outputs]
        outputs = [o[:, n_prefix:] for o in outputs]
        if reshape:
            B, _, H, W = x.shape
            h, w = H // self.patch_size, W // self.patch_size
            outputs = [o.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for o in outputs]
        return pack_intermediates(outputs, class_tokens, extra_tokens, return_class_token,
                                  return_extra_tokens)
