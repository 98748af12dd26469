"""LayerScale: a learned per-channel gain on each residual branch (SPEC.md §2.2).

The parameter is named `gamma` (official key `blocks.{i}.ls{1,2}.gamma`); the optimiser's
parameter groups exclude it from weight decay by that name.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5, device=None) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim, device=device))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"dim={self.gamma.shape[0]}, init_values={self.init_values}"
