"""The one switch between the Triton kernels and the PyTorch references (config `kernels.impl`).

auto = Triton on CUDA tensors (and on CPU tensors when the Triton interpreter is on), the
reference elsewhere; triton = Triton or a clear error; torch = always the reference. The choice is
logged once per op, never made by monkey-patching.
"""

from __future__ import annotations

import logging

import torch

from fastdino.config import ConfigError
from fastdino.kernels._utils import can_run_triton, triton_available

logger = logging.getLogger("fastdino")
_logged: set[tuple[str, str]] = set()

IMPLS = ("auto", "triton", "torch")


def check_kernels_impl(impl: str, device: torch.device) -> None:
    """At build time, not at the first step: `kernels.impl=triton` where Triton cannot run (no
    triton package, or a CPU device without TRITON_INTERPRET=1) is a one-line ConfigError."""
    if impl == "triton" and not can_run_triton(torch.empty(0, device=device)):
        raise ConfigError(
            "config key 'kernels.impl' = 'triton' is invalid here: "
            f"{why_triton_cannot_run(device)}: allowed here is auto | torch")


def why_triton_cannot_run(device: torch.device | str) -> str:
    """Why Triton cannot run on `device`: triton is absent (CPU-only torch wheels, macOS and
    Windows have none), or the device is neither CUDA nor the CPU under the interpreter."""
    if not triton_available():
        return ("triton is not installed (CPU-only, macOS and Windows torch wheels do not ship "
                "it; `pip install triton` on Linux with CUDA)")
    return (f"Triton cannot run on the {torch.device(device).type} device (needs CUDA, or "
            "TRITON_INTERPRET=1 set before start on CPU)")


def use_triton(impl: str, x: torch.Tensor, op: str) -> bool:
    """Whether op `op` runs its Triton kernel on tensor `x` under `impl`."""
    if impl not in IMPLS:
        raise ConfigError(
            f"kernels.impl = {impl!r} is invalid: allowed is one of {' | '.join(IMPLS)}"
        )
    if impl == "torch":
        choice = False
    elif impl == "triton":
        if not can_run_triton(x):
            raise ConfigError(
                f"kernels.impl=triton but op '{op}' got a {x.device.type} tensor: "
                f"{why_triton_cannot_run(x.device)}")
        choice = True
    else:
        choice = x.is_cuda and can_run_triton(x)
    key = (op, "triton" if choice else "torch")
    # no logging while dynamo traces: a logger call there is a graph break that stays in the
    # compiled block; the eager calls around it (or the next eager step) log the choice instead
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        logger.info("kernels: %s uses the %s implementation", op, key[1])
    return choice


def use_fused_pointwise(impl: str, fuse_pointwise: bool, x: torch.Tensor, op: str) -> bool:
    """Whether the opt-in pointwise fusion `op` (config `kernels.fuse_pointwise`: LayerNorm +
    residual + LayerScale, SwiGLU) runs its Triton kernel on `x`: the flag is on and
    `use_triton(impl, x, op)` holds. Off (the default): the unfused PyTorch code, untouched."""
    return fuse_pointwise and use_triton(impl, x, op)
