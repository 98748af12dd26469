"""The benchmark and parity harness (KERNELS.md §8). The `BenchCase` record below is the contract
each `bench/bench_<op>.py` plugs into: the module defines `cases(quick: bool, on_gpu: bool) ->
list[BenchCase]`; the harness discovers it, times every provider and judges parity."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class BenchCase:
    op: str  # kernel name, e.g. "dino_loss"
    name: str  # shape label, e.g. "vitl16-ibot"
    params: dict[str, Any]  # the shape, recorded in the JSON results
    dtype: torch.dtype  # working precision of the inputs
    # make_inputs(device, dtype) -> dict of keyword inputs; float tensors to differentiate have
    # requires_grad=True. Deterministic (seeded inside).
    make_inputs: Callable[[torch.device, torch.dtype], dict[str, Any]]
    # provider name -> fn(**inputs) -> Tensor (a scalar loss or an output tensor). Must hold
    # "torch" (calling the `<op>_ref`) and "triton"; the harness adds "torch_compile".
    providers: dict[str, Callable[..., torch.Tensor]]
    grad_inputs: list[str] | None = None  # inputs to differentiate (None = all requiring grad)
    bytes_fwd: int | None = None  # minimal HBM bytes of the forward (memory-bound ops: GB/s)
    bytes_bwd: int | None = None
    flops_fwd: int | None = None  # FLOPs of the forward (matmul-bound ops: TFLOP/s)
    flops_bwd: int | None = None
    formula: str = ""  # the byte / FLOP model, printed next to the metric
    reference_dtype: torch.dtype = torch.float32  # dtype of the truth (fp64 for cancellation)
    atol: float = 1e-6  # small absolute slack of the parity rule
    extra: dict[str, Any] = field(default_factory=dict)
