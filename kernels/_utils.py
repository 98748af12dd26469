"""Shared helpers for the Triton kernels: interpreter detection, launch heuristics and the
compile-spec record that `bench compile-report` and tests/kernels/test_compile.py use to compile
every kernel at each shipped launch configuration for sm_90 and sm_80 without a GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def is_interpreter() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1 set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def can_run_triton(x: torch.Tensor) -> bool:
    """Triton can run on `x`: a CUDA tensor, or a CPU tensor under the interpreter."""
    if not triton_available():
        return False
    return x.is_cuda or (x.device.type == "cpu" and is_interpreter())


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass
class CompileSpec:
    """One kernel at one shipped launch configuration, compiled ahead of time for a GPU target.

    `signature` maps every non-constexpr argument name to a Triton type string ("*fp32", "*bf16",
    "i32", "i64", "fp32"); `constexprs` maps every constexpr argument name to its value.
    `divisible_by_16` names the pointer / int arguments that every real launch passes 16-byte
    aligned / divisible by 16: triton's JIT specialises on that (tt.divisibility = 16: vector
    loads, the load pipeline), so the ahead-of-time compile declares it too, and reports the
    registers and shared memory of the code the GPU runs. Empty: the unspecialised kernel.
    """

    name: str  # e.g. "dino_loss_fwd[BLOCK_K=4096,bf16]"
    fn: Callable[..., Any]  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] = ()


def eager_or_op(op: Callable[..., Any], launcher: Callable[..., Any]) -> Callable[..., Any]:
    """What an autograd.Function calls: the torch.library custom op while torch.compile traces
    (dynamo then sees one opaque node with its fake implementation), else the launcher the op
    wraps. The op's Python dispatch costs ~5-7 µs of host time per call, which eager training
    pays for every block and loss call of every step; the launcher is the same computation."""
    return op if torch.compiler.is_compiling() else launcher
