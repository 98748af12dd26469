"""LoRA adapters on the backbone's linear layers (`optim.lora_rank`; continued pretraining,
USERS.md §8).

    n = add_lora(backbone, rank=8, alpha=16, targets=LORA_TARGETS)  # after loading the weights
    merged = merge_lora_state_dict(backbone.state_dict())          # plain keys, W + s·B·A

`LoRALinear` wraps a block's nn.Linear (`base`, frozen) and adds y += s · B(A(x)), s = alpha /
rank, A [r, in] Kaiming-uniform, B [out, r] zero: the wrapped layer starts as the base exactly
(Hu et al. 2021). The base keeps its own forward, so the key-masked qkv bias still applies. Its
state dict holds `<layer>.base.weight` (and `.base.bias`, `.base.bias_mask`), `<layer>.lora_A`,
`<layer>.lora_B` and `<layer>.lora_scale`; `merge_lora_state_dict` folds them back into
`<layer>.weight` = base + s · B @ A, so exports, evaluation and continued pretraining read LoRA
runs as plain backbones (float64 merge, cast back to the base's dtype).
"""

from __future__ import annotations

import math

import torch
from torch import nn

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "w1", "w2", "w3")  # attention and both FFN kinds


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as peft
        self.register_buffer("lora_scale", torch.tensor(alpha / rank, device=dev))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return self.base(x) + (x @ a.t() @ b.t()) * self.lora_scale.to(x.dtype)


def add_lora(backbone: nn.Module, rank: int, alpha: float,
             targets: tuple[str, ...] = LORA_TARGETS, first_block: int = 0) -> int:
    """Wrap every nn.Linear named in `targets` inside `backbone.blocks[first_block:]`; returns
    how many."""
    if rank <= 0:
        raise ValueError(f"optim.lora_rank={rank}: allowed is a positive integer")
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"optim.lora_targets: {unknown} unknown; allowed: "
                         + ", ".join(LORA_TARGETS))
    n = 0
    for block in list(backbone.blocks)[first_block:]:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
                    n += 1
    if n == 0:
        raise ValueError(f"optim.lora_targets={list(targets)} names no linear layer of the "
                         f"blocks (allowed: {', '.join(LORA_TARGETS)})")
    return n


def merge_lora_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` with every LoRA layer folded into plain keys (a no-op without LoRA keys)."""
    prefixes = [k[: -len(".lora_A")] for k in sd if k.endswith(".lora_A")]
    if not prefixes:
        return dict(sd)
    out = dict(sd)
    for p in prefixes:
        a, b = out.pop(f"{p}.lora_A"), out.pop(f"{p}.lora_B")
        scale = out.pop(f"{p}.lora_scale")
        w = out.pop(f"{p}.base.weight")
        delta = (b.double() @ a.double()) * scale.double()
        out[f"{p}.weight"] = (w.double() + delta).to(w.dtype)
        for extra in ("bias", "bias_mask"):
            if f"{p}.base.{extra}" in out:
                out[f"{p}.{extra}"] = out.pop(f"{p}.base.{extra}")
    return out
