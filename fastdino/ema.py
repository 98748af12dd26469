"""EMA teacher update and Gram-teacher refresh (SPEC.md §3.1 step 7, §1.6).

    θ_t ← m·θ_t + (1 − m)·θ_s      over every parameter of backbone + both heads (buffers not EMA'd)

The teachers are plain replicated fp32 modules outside the DeepSpeed engine (the Gram teacher's
Linear / Conv weights in bf16 when training in bf16: `gram.teacher_dtype`; it is only copied
into). The student's values come from `full_values(params)` (parallel.py), a context yielding
the *full fp32* value of each parameter, never an empty ZeRO-3 placeholder:
- plain torch engine, DeepSpeed fp32 ZeRO-0/1/2: the module parameters themselves (replicated and
  equal to the optimizer's values after the step);
- DeepSpeed fp32 ZeRO-3: the parameters inside `GatheredParameters` (read only);
- DeepSpeed bf16 ZeRO-1/2/3: the module holds bf16 compute weights, so the fp32 master
  partitions the optimizers own are all-gathered, one flat partition (a "unit": a param group's
  under ZeRO-1/2, a sub-group's under ZeRO-3) at a time (exactly the masters, as the official
  FSDP EMA reads the fp32 shards); ZeRO-0 bf16: the replicated fp32 masters.
Chunk by chunk (about `chunk_numel` elements) to bound the transient memory; chunks never split
a unit the engine gathers whole (`EMAPlan.chunks_for`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

FullValues = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]


@contextlib.contextmanager
def module_values(params: list[nn.Parameter]):
    """Default `full_values`: the parameters as they are (one process, replicated params), read
    only, under no_grad (as `ema_update` and `copy_params` call it: no `.detach()` per
    parameter, ~1 µs of host time each, per step)."""
    yield params if isinstance(params, list) else list(params)


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


class EMAPlan:
    """The (teacher, student) parameter pairs an EMA updates, in `chunk_numel` chunks: built once
    (the owner keeps it, SSLMetaArch) instead of at every step. Pairing by name walks both
    modules (named_parameters, dict building: ~2-5 ms of host time at ViT-L's ~400 parameters),
    right after the step's one host sync, while the GPU has little queued. Valid while neither
    module gains or loses parameters and no `requires_grad` changes: all of that happens when
    the model is built (freezing, LoRA, distillation), never during training."""

    def __init__(self, teacher: nn.Module, student: nn.Module, chunk_numel: int = 1 << 26):
        self.pairs = [(t, s) for t, s in _paired(teacher, student) if s.requires_grad]
        self.chunk_numel = chunk_numel
        self.chunks = self._split(_chunks(self.pairs, chunk_numel))
        self._by_units: dict[int, list] = {}  # id(engine) -> its unit-aligned chunks

    @staticmethod
    def _split(chunks) -> list[tuple[list[torch.Tensor], list[nn.Parameter]]]:
        return [([t for t, _ in c], [s for _, s in c]) for c in chunks]

    def chunks_for(self, full_values: FullValues) -> list:
        """The chunks to read through `full_values`. An engine whose `full_values` gathers whole
        units (DeepSpeed bf16: one flat fp32 partition per param group, parallel.py
        `value_units`) gets chunks that never split a unit, so no unit is gathered twice per
        step (a chunk then exceeds `chunk_numel` by at most one unit); any other gets
        `chunks`."""
        engine = getattr(full_values, "__self__", None)
        units_of = getattr(engine, "value_units", None)
        if units_of is None:
            return self.chunks
        if id(engine) not in self._by_units:
            units = units_of([s for _, s in self.pairs])
            if units is None:
                self._by_units[id(engine)] = self.chunks
            else:
                by_unit: dict = {}  # first-seen order; a parameter outside every unit: alone
                for i, (pair, u) in enumerate(zip(self.pairs, units, strict=True)):
                    by_unit.setdefault(("alone", i) if u is None else u, []).append(pair)
                chunks, chunk, n = [], [], 0
                for group in by_unit.values():
                    chunk += group
                    n += sum(t.numel() for t, _ in group)
                    if n >= self.chunk_numel:
                        chunks.append(chunk)
                        chunk, n = [], 0
                if chunk:
                    chunks.append(chunk)
                self._by_units[id(engine)] = self._split(chunks)
        return self._by_units[id(engine)]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float,
               full_values: FullValues = module_values, chunk_numel: int = 1 << 26,
               plan: EMAPlan | None = None) -> None:
    """teacher ← momentum·teacher + (1 − momentum)·student, parameter by parameter. Frozen
    student parameters (requires_grad False: `optim.frozen_blocks`, LoRA base weights) are
    skipped: they never change, so the teacher keeps their copy and no gather is spent on them.
    `plan`: the pairs of `EMAPlan(teacher, student, chunk_numel)`, built here when not given.

    One `_foreach_lerp_` (t + (1 − m)·(s − t), as torch's AveragedModel EMA) instead of the
    official `_foreach_mul_` + `_foreach_add_`: the same value within fp32 rounding (one
    rounding of t plus a tiny term, where mul + add round twice), one launch per chunk instead of
    two and 12 instead of 20 bytes of traffic per parameter (~0.9 ms per step on an H100 at
    ViT-L's 350 M fp32 parameters). m = 1 keeps the teacher and m = 0 copies the student
    exactly."""
    plan = plan or EMAPlan(teacher, student, chunk_numel)
    for t, s in plan.chunks_for(full_values):
        with full_values(s) as values:
            dt = t[0].dtype
            torch._foreach_lerp_(t, [v if v.dtype == dt else v.to(dt) for v in values],
                                 1.0 - momentum)


@torch.no_grad()
def copy_params(dst: nn.Module, src: nn.Module, full_values: FullValues = module_values,
                chunk_numel: int = 1 << 26) -> None:
    """dst ← src, parameter by parameter (teacher init from the student, Gram refresh). Each
    value is cast to its own destination's dtype: the Gram teacher holds its Linear / Conv
    weights in bf16 beside fp32 norms and LayerScales (meta_arch.py), and the fp32 -> bf16 cast
    rounds to nearest even, as autocast's does. (Casting a chunk to its first tensor's dtype
    rounded the fp32 norms of a chunk that began with a bf16 weight.)"""
    for chunk in _chunks(_paired(dst, src), chunk_numel):
        with full_values([s for _, s in chunk]) as values:
            dsts = [t for t, _ in chunk]
            torch._foreach_copy_(dsts, [v if v.dtype == t.dtype else v.to(t.dtype)
                                        for t, v in zip(dsts, values, strict=True)])


def gram_refresh_due(it: int, rep_update: bool, it_first_update: int, update_frequency: int,
                     n_updates: int, max_updates: int) -> bool:
    """Official rule (SPEC.md §1.6), checked after the optimizer step and the EMA of iteration
    `it`: refresh when (it+1) >= first, (it+1) % frequency == 0 and fewer than max updates."""
    return (rep_update and it + 1 >= it_first_update and (it + 1) % update_frequency == 0
            and n_updates < max_updates)
