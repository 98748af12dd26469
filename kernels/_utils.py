"""Shared helpers for the Triton kernels: interpreter detection, launch heuristics and the
compile-spec record that `bench compile-report` and tests/kernels/test_compile.py use to compile
every kernel at each shipped launch configuration for sm_90 and sm_80 without a GPU."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def is_interpreter() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1 set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """triton imports (cached: without it, a failed import searches sys.path on every call,
    and `kernels.impl=auto` asks once per op call on CUDA)."""
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


def arch_family(device: torch.device) -> int:
    """The launch-config family of a device: 90 (warpgroup MMA: sm_90, sm_100) or 80 (per-warp
    mma.sync: sm_80..89 and consumer Blackwell sm_120, which has no wgmma). CPU (the
    interpreter): 90, unused there."""
    if device.type != "cuda":
        return 90
    return _cuda_arch_family(device.index if device.index is not None
                             else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_arch_family(index: int) -> int:
    major, _ = torch.cuda.get_device_capability(index)
    return 90 if major in (9, 10) else 80


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code. `triton.cdiv` is a JIT-callable that unwraps constexprs on
    every call (~2-4 µs of host time each); launchers call this a dozen times per launch."""
    return -(-a // b)


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
    # the GPU families whose launcher picks this configuration (`arch_family`): the compile
    # report and test compile it for these only
    archs: tuple[int, ...] = (90, 80)
    # the launcher's `enable_fp_fusion` (False where a kernel must round every product, as C does)
    enable_fp_fusion: bool = True


def eager_or_op(op: Callable[..., Any], launcher: Callable[..., Any]) -> Callable[..., Any]:
    """What an autograd.Function calls: the torch.library custom op while torch.compile traces
    (dynamo then sees one opaque node with its fake implementation), else the launcher the op
    wraps. The op's Python dispatch costs ~5-7 µs of host time per call, which eager training
    pays for every block and loss call of every step; the launcher is the same computation."""
    return op if torch.compiler.is_compiling() else launcher
