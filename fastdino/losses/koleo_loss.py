"""KoLeo regulariser (Sablayrolles et al. 2018, "Spreading vectors for similarity search"), as in
DINOv3 `dinov3/loss/koleo_loss.py` (SPEC.md §1.5): pushes each L2-normalised student CLS embedding
away from its nearest neighbour.

Shapes: B = local rows (one global crop on this rank), D = embedding dim, G = independent groups
(e.g. the 2 global crops batched into one launch), W = ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdino import dist
from fastdino.kernels.koleo import koleo_loss_ref
from fastdino.layers.select import use_triton

_OP = "koleo_loss"


def _koleo(impl: str, x: torch.Tensor, eps: float, query_start: int = 0,
           query_len: int | None = None, fp32_log: bool = False):
    """(loss, nn_idx, d) from the kernel or the reference, per `impl` (kernels.impl)."""
    if use_triton(impl, x, _OP):
        from fastdino.kernels.koleo import koleo_loss  # imports Triton only when used

        return koleo_loss(x, eps=eps, query_start=query_start, query_len=query_len,
                          return_details=True)
    return koleo_loss_ref(x, eps=eps, query_start=query_start, query_len=query_len,
                          fp32_log=fp32_log, return_details=True)


def _stats(d: torch.Tensor) -> dict[str, torch.Tensor]:
    d = d.detach().float()
    return {"koleo_nn_dist_min": d.min(), "koleo_nn_dist_mean": d.mean()}


class KoLeoLoss(nn.Module):
    """Per rank, per crop KoLeo.

    loss = -mean_i log(‖x̂_i - x̂_nn(i) + eps‖ + eps)
    x̂ = x / max(‖x‖, eps), nn(i) = argmax_{j≠i} x̂_i·x̂_j
    x: [B, D] -> scalar; [G, B, D] -> [G] (one loss per group, e.g. both global crops in one call).
    The reference runs in the input dtype (bf16 allowed, as the official code); the Triton kernel
    accumulates in fp32 and returns fp32. `last_stats` holds the detached min / mean nearest-
    neighbour distance of the last call (a collapse indicator), computed only when read.
    """

    def __init__(self, impl: str = "auto", eps: float = 1e-8):
        super().__init__()
        self.impl = impl
        self.eps = eps
        self._last_d: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"impl={self.impl}, eps={self.eps}"

    @property
    def last_stats(self) -> dict[str, torch.Tensor] | None:
        return None if self._last_d is None else _stats(self._last_d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        loss, _, d = _koleo(self.impl, x, self.eps)
        self._last_d = d.detach()
        return loss


class KoLeoLossDistributed(nn.Module):
    """Grouped distributed KoLeo (DINOv3 `KoLeoLossDistributed`, topk = 1).

    The W·B rows of all ranks are gathered with autograd (fastdino.dist.all_gather_autograd), cut
    into consecutive groups of `group_size` rows; each local row's nearest neighbour is searched in
    its rank's group (itself excluded) and the loss is the mean over the B local rows, with the
    distances cast to fp32 before the log. Gradients reach the neighbours on other ranks through the
    gather's backward. x: [B, D] -> scalar.
    """

    def __init__(self, group_size: int = 16, impl: str = "auto", eps: float = 1e-8):
        super().__init__()
        if group_size < 2:
            raise ValueError(f"KoLeoLossDistributed: group_size={group_size} is invalid: "
                             "allowed is an integer >= 2")
        self.group_size = group_size
        self.impl = impl
        self.eps = eps
        self._last_d: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, impl={self.impl}, eps={self.eps}"

    @property
    def last_stats(self) -> dict[str, torch.Tensor] | None:
        return None if self._last_d is None else _stats(self._last_d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"KoLeoLossDistributed: x must be [B, D], got shape {tuple(x.shape)}")
        B, gs = x.shape[0], self.group_size
        if gs % B != 0:
            raise ValueError(f"KoLeoLossDistributed: group_size={gs} must be a multiple of the "
                             f"local batch size B={B}")
        world, rank = dist.get_world_size(), dist.get_rank()
        if (world * B) % gs != 0:
            raise ValueError(f"KoLeoLossDistributed: the global batch W*B={world}*{B}={world * B} "
                             f"must be divisible by group_size={gs}")
        # [W*B, D]; normalising after the gather is the same math as before it
        all_x = dist.all_gather_autograd(x)
        ranks_per_group = gs // B
        group, rank_in_group = rank // ranks_per_group, rank % ranks_per_group
        x_group = all_x[group * gs:(group + 1) * gs].unsqueeze(0)  # [1, gs, D]
        loss, _, d = _koleo(self.impl, x_group, self.eps, query_start=rank_in_group * B,
                            query_len=B, fp32_log=True)
        self._last_d = d.detach()
        return loss[0]
