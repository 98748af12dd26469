"""The collectives the DINOv3 algorithm itself needs (SPEC.md §1.1, §1.2, §1.5).

Sinkhorn-Knopp sums, the centering batch mean and the distributed KoLeo gather go through here, so
the model and the losses never import `torch.distributed`. Every function is a no-op (or the
identity) when torch.distributed is not initialised or the world has one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns `x`."""
    if get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks; returns `x`."""
    if get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks; returns `x`."""
    if get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x.div_(get_world_size())
    return x


def all_gather_autograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [n, ...] from every rank along dim 0, with gradients flowing back to each
    rank's own slice (torch.distributed.nn.all_gather), as KoLeoLossDistributed does."""
    if get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [n, ...] from every rank along dim 0 (no autograd)."""
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()
