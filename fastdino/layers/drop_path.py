"""Sample-subset stochastic depth ("sample drop") of DINOv3 (SPEC.md §2.2).

Instead of zeroing the residual branch of random samples (classic DropPath), the branch is run only
on a random subset of floor(b * (1 - p)) (>= 1) samples and `index_add`-ed back with scale
b / subset, so the dropped samples cost no compute. Drawn independently per block, per crop type,
and per branch (attention, FFN); training mode only.
"""

from __future__ import annotations

import torch


def sample_subset(b: int, drop_ratio: float, device: torch.device
                  ) -> tuple[torch.Tensor, float]:
    """(indices [subset] of the samples that run the branch, residual scale b / subset)."""
    subset = max(int(b * (1 - drop_ratio)), 1)
    return torch.randperm(b, device=device)[:subset], b / subset


def add_residual(x: torch.Tensor, residual: torch.Tensor, indices: torch.Tensor | None,
                 scale: float) -> torch.Tensor:
    """x [b, N, D] + residual [b or subset, N, D] (scattered to `indices`, times `scale`)."""
    if residual.dtype != x.dtype:  # (a same-dtype .to() is still a dispatched op: host time)
        residual = residual.to(x.dtype)
    if indices is None:
        return x + residual
    return torch.index_add(x, dim=0, index=indices, source=residual, alpha=scale)
