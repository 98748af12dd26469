"""The collectives the DINOv3 algorithm itself needs (SPEC.md §1.1, §1.2, §1.5).

Sinkhorn-Knopp sums, the centering batch mean and the distributed KoLeo gather go through here, so
the model and the losses never import `torch.distributed`. Every function is a no-op (or the
identity) when torch.distributed is not initialised or the world has one rank.

The group: every function works over the process group of the model this process trains, which is
the world unless `set_group` chose a subgroup (co-distillation with one student per rank range,
fastdino/codistill.py: the losses' Sinkhorn-Knopp sums, the gradient clip, metrics and
checkpoints of a student are its ranks' business). `world()` scopes the few collectives that span
every rank there (the shared loader, the teacher outputs' exchange, the stop agreement).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist

_group = None  # the training group; None: the world


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def set_group(group) -> None:
    """Make `group` (a torch.distributed process group this rank belongs to, or None for the
    world) the group of every function here, for the rest of the process."""
    global _group
    _group = group


def get_group():
    return _group


_alone = None  # this rank's group of one (DeepSpeed's model-parallel group under a subgroup)


def split(sizes: list[int]) -> int:
    """Split the world into consecutive rank ranges of `sizes` (summing to the world size), make
    this rank's range the group (set_group) and return its index. Collective: every rank calls
    it with the same sizes (torch creates every group on every rank)."""
    global _alone
    world = dist.get_world_size()
    if sum(sizes) != world or min(sizes) < 1:
        raise ValueError(f"rank ranges {list(sizes)} must be positive and sum to the world size "
                         f"{world}")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    ranges = [list(range(a, a + n)) for a, n in zip(starts, sizes, strict=True)]
    mine, _ = dist.new_subgroups_by_enumeration(ranges)
    _alone, _ = dist.new_subgroups_by_enumeration([[r] for r in range(world)])
    set_group(mine)
    rank = dist.get_rank()
    return next(i for i, r in enumerate(ranges) if rank in r)


def self_group():
    """This rank alone (after `split`)."""
    return _alone


@contextlib.contextmanager
def world():
    """Run the enclosed collectives over every rank, whatever group is set."""
    global _group
    saved, _group = _group, None
    try:
        yield
    finally:
        _group = saved


def get_rank() -> int:
    return dist.get_rank(_group) if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size(_group) if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns `x`."""
    if get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=_group)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks; returns `x`."""
    if get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=_group)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks; returns `x`."""
    if get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=_group)
        x.div_(get_world_size())
    return x


def all_gather_autograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [n, ...] from every rank along dim 0, with gradients flowing back to each
    rank's own slice (torch.distributed.nn.all_gather), as KoLeoLossDistributed does."""
    if get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # its deprecation names a private API as the replacement:
        warnings.simplefilter("ignore", FutureWarning)  # noise printed once by every rank
        parts = all_gather(x.contiguous(), group=_group or dist.group.WORLD)
    return torch.cat(parts, dim=0)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [n, ...] from every rank along dim 0 (no autograd)."""
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous(), group=_group)
    return torch.cat(out, dim=0)


def all_gather_into(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`out` (contiguous, world_size × x.numel() elements) ← every rank's `x` in rank order, in
    place (no autograd, no list of outputs, no concatenation copy); returns `out`. Equal sizes on
    every rank. Moves (world − 1) × x's bytes into each rank: half an all-reduce of `out`."""
    n = get_world_size()
    if out.numel() != n * x.numel():
        raise ValueError(f"all_gather_into: out holds {out.numel()} elements, {n} ranks x "
                         f"{x.numel()} needed")
    x = x.contiguous().view(-1)
    if n == 1:
        return out.view(-1).copy_(x).view_as(out)
    # torch >= 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    try:
        gather(out.view(-1), x, group=_group)
    except (RuntimeError, NotImplementedError) as e:  # a backend without it (older gloo):
        if "support" not in str(e).lower():  # raised on every rank before any transfer
            raise
        dist.all_gather(list(out.view(n, -1).unbind(0)), x, group=_group)
    return out


def group_ranks() -> list[int]:
    """The global ranks of the group, in group-rank order (one rank: [0] without a group)."""
    if not is_enabled():
        return [0]
    return dist.get_process_group_ranks(_group or dist.group.WORLD)


def broadcast_object(obj):
    """`obj` (picklable) as the group's rank 0 has it, on every rank of the group."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=group_ranks()[0], group=_group)
    return box[0]


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier(group=_group)
