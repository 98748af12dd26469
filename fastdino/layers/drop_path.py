"""Sample-subset stochastic depth ("sample drop") of DINOv3 (SPEC.md §2.2).

Instead of zeroing the residual branch of random samples (classic DropPath), the branch is run only
on a random subset of floor(b * (1 - p)) (>= 1) samples and `index_add`-ed back with scale
b / subset, so the dropped samples cost no compute. Drawn independently per block, per crop type,
and per branch (attention, FFN); training mode only.
"""

from __future__ import annotations

import torch


def subset_size(b: int, drop_ratio: float) -> int:
    return max(int(b * (1 - drop_ratio)), 1)


def sample_subset(b: int, drop_ratio: float, device: torch.device
                  ) -> tuple[torch.Tensor, float]:
    """(indices [subset] of the samples that run the branch, residual scale b / subset)."""
    subset = subset_size(b, drop_ratio)
    return torch.randperm(b, device=device)[:subset], b / subset


def draw_subsets(b: int, drop_ratio: float, n: int, device: torch.device
                 ) -> list[tuple[torch.Tensor, float]]:
    """n independent `sample_subset` draws in one go: the first `subset` positions of n random
    permutations (argsort of iid uniforms: every subset equally likely, as randperm's). The
    backbone draws every block's subsets this way, 3 ops per crop type instead of a randperm
    and a slice per block, branch and crop type (launches on the critical path of a
    host-bound step)."""
    subset = subset_size(b, drop_ratio)
    idx = torch.rand(n, b, device=device).argsort(dim=1)[:, :subset]
    return [(i, b / subset) for i in idx.unbind(0)]


def add_residual(x: torch.Tensor, residual: torch.Tensor, indices: torch.Tensor | None,
                 scale: float) -> torch.Tensor:
    """x [b, N, D] + residual [b or subset, N, D] (scattered to `indices`, times `scale`)."""
    if residual.dtype != x.dtype:  # (a same-dtype .to() is still a dispatched op: host time)
        residual = residual.to(x.dtype)
    if indices is None:
        return x + residual
    return torch.index_add(x, dim=0, index=indices, source=residual, alpha=scale)
