"""DINO / iBOT projection head (SPEC.md §2.5).

    x [M, in_dim] -> mlp: Linear GELU Linear GELU Linear -> [M, bottleneck]
      -> L2-normalise (eps 1e-12; 1e-6 in fp16)
      -> last_layer: Linear(bottleneck, K, no bias) -> [M, K]

Keys: `mlp.{0,2,4}.{weight,bias}`, `last_layer.weight` (DINOv3, no weight norm) or, with
`weight_norm_last_layer` (DINOv2), `last_layer.weight_g` (filled with 1: unit-norm prototypes at
init) and `last_layer.weight_v`. Both train and both are EMA'd, as in DINOv2, whose head is
`torch.nn.utils.weight_norm(Linear)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int,
               device=None) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, device=device)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, device=device), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim, device=device), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, device=device))
    return nn.Sequential(*layers)


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight = g · v / ‖v‖ (norm per output row), the function and the
    state-dict keys (`weight_g` [out, 1], `weight_v` [out, in]) of DINOv2's
    `torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))`. Own module rather than that
    hook: its `weight` is a non-leaf tensor attribute that `copy.deepcopy` refuses (the teacher
    and Gram teacher are deep copies of the student), and the parametrizations API would rename
    the keys to `parametrizations.weight.original{0,1}`."""

    def __init__(self, in_features: int, out_features: int, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(torch.empty(out_features, 1, device=device))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features, device=device))

    @property
    def weight(self) -> torch.Tensor:
        # torch's _weight_norm(v, g, dim=0), spelled out
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_norm"


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3,
                 weight_norm_last_layer: bool = False, device=None) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead nlayers = {nlayers} is invalid: allowed is >= 1")
        self.weight_norm_last_layer = weight_norm_last_layer
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, device=device)
        self.last_layer = (WeightNormLinear(bottleneck_dim, out_dim, device=device)
                           if weight_norm_last_layer else
                           nn.Linear(bottleneck_dim, out_dim, bias=False, device=device))
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if self.weight_norm_last_layer:
            nn.init.trunc_normal_(self.last_layer.weight_v, std=0.02)
            self.last_layer.weight_g.fill_(1.0)
        else:
            nn.init.trunc_normal_(self.last_layer.weight, std=0.02)

    def forward(self, x: torch.Tensor, no_last_layer: bool = False,
                only_last_layer: bool = False) -> torch.Tensor:
        if not only_last_layer:
            x = self.mlp(x)
            eps = 1e-6 if x.dtype == torch.float16 else 1e-12
            x = F.normalize(x, dim=-1, p=2, eps=eps)
        if not no_last_layer:
            x = self.last_layer(x)
        return x


def build_head(head_cfg, in_dim: int, *, device=None) -> DINOHead:
    """Head of `head_cfg` (a fastdino.config.HeadConfig) on top of a backbone of width `in_dim`."""
    return DINOHead(in_dim, head_cfg.n_prototypes, hidden_dim=head_cfg.hidden_dim,
                    bottleneck_dim=head_cfg.bottleneck_dim, nlayers=head_cfg.nlayers,
                    weight_norm_last_layer=head_cfg.weight_norm_last_layer, device=device)
