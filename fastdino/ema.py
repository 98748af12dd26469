"""EMA teacher update and Gram-teacher refresh (SPEC.md §3.1 step 7, §1.6).

    θ_t ← m·θ_t + (1 − m)·θ_s      over every parameter of backbone + both heads (buffers not EMA'd)

The teachers are plain replicated modules outside the DeepSpeed engine. The student's parameters
are read inside `gathered(params)` (parallel.py): under ZeRO-3 this all-gathers the full values for
the duration of the block (read only, `modifier_rank=None`), so the EMA never reads an empty
placeholder; under ZeRO-0/1/2 (and the torch engine) parameters are already full after the step.
Gathering goes chunk by chunk (about `chunk_numel` elements) to bound the transient memory.

Precision: the teacher is fp32. In fp32 runs the EMA reads exactly the student's parameters (the
ZeRO e2e test checks equality with DeepSpeed's fp32 master copy). Under DeepSpeed bf16 the module
holds bf16 compute weights and the fp32 master lives in the optimizer partitions; the EMA reads
the bf16 weights (each value within bf16 rounding, ~2^-8 relative, of the master), not the master
as the official FSDP code does. Reading the fp32 partitions shard-locally is a possible follow-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

Gather = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]


def _no_gather(params):
    return contextlib.nullcontext()


def _chunks(pairs: list[tuple[torch.Tensor, nn.Parameter]], chunk_numel: int
            ) -> Iterator[list[tuple[torch.Tensor, nn.Parameter]]]:
    chunk, n = [], 0
    for t, s in pairs:
        chunk.append((t, s))
        n += t.numel()
        if n >= chunk_numel:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def _paired(teacher: nn.Module, student: nn.Module) -> list[tuple[torch.Tensor, nn.Parameter]]:
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        missing = sorted(set(s_params) ^ set(t_params))[:5]
        raise ValueError(f"teacher and student parameter names differ, e.g. {missing}")
    return [(t_params[k], s_params[k]) for k in s_params]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float,
               gather: Gather = _no_gather, chunk_numel: int = 1 << 26) -> None:
    """teacher ← momentum·teacher + (1 − momentum)·student, parameter by parameter."""
    for chunk in _chunks(_paired(teacher, student), chunk_numel):
        with gather([s for _, s in chunk]):
            t = [t for t, _ in chunk]
            s = [s.detach().to(t[0].dtype) for _, s in chunk]
            torch._foreach_mul_(t, momentum)
            torch._foreach_add_(t, s, alpha=1.0 - momentum)


@torch.no_grad()
def copy_params(dst: nn.Module, src: nn.Module, gather: Gather = _no_gather,
                chunk_numel: int = 1 << 26) -> None:
    """dst ← src, parameter by parameter (teacher init from the student, Gram refresh)."""
    for chunk in _chunks(_paired(dst, src), chunk_numel):
        with gather([s for _, s in chunk]):
            torch._foreach_copy_([t for t, _ in chunk], [s.detach() for _, s in chunk])


def gram_refresh_due(it: int, rep_update: bool, it_first_update: int, update_frequency: int,
                     n_updates: int, max_updates: int) -> bool:
    """Official rule (SPEC.md §1.6), checked after the optimizer step and the EMA of iteration
    `it`: refresh when (it+1) >= first, (it+1) % frequency == 0 and fewer than max updates."""
    return (rep_update and it + 1 >= it_first_update and (it + 1) % update_frequency == 0
            and n_updates < max_updates)
