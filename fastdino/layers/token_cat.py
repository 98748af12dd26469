"""Concatenate the tokens of several crop types for pointwise ops, then split them back.

    x_list [B_i, N_i, D] -> flat [sum_i B_i*N_i, D] -> op -> [sum_i B_i*N_i, D'] -> [B_i, N_i, D']

One launch per pointwise op (LayerNorm, Linear, FFN) instead of one per crop type; attention, which
mixes tokens, stays per crop type. Same as the official `cat_keep_shapes` / `uncat_with_shapes`.
"""

from __future__ import annotations

import torch


def cat_keep_shapes(x_list: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Size], list[int]]:
    shapes = [x.shape for x in x_list]
    num_tokens = [x.shape[:-1].numel() for x in x_list]
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in x_list]) if len(x_list) > 1 \
        else x_list[0].reshape(-1, x_list[0].shape[-1])
    return flat, shapes, num_tokens


def uncat_with_shapes(flat: torch.Tensor, shapes: list[torch.Size],
                      num_tokens: list[int]) -> list[torch.Tensor]:
    parts = torch.split_with_sizes(flat, num_tokens, dim=0)
    return [p.reshape(*s[:-1], flat.shape[-1]) for p, s in zip(parts, shapes, strict=True)]
