"""`triton` and `triton.language` for the kernel modules, or stand-ins without triton.

triton ships with the Linux CUDA torch wheels only: a CPU-only wheel, macOS and Windows have none.
There the kernel modules must still import, because their `<op>_ref` references, dataclasses and
torch.library registrations are what `kernels.impl=auto` runs (and what eval, export and curation
import). So every kernel module takes `triton` / `tl` from here: with triton installed they ARE
the real modules (the kernels, their compile and GPU behaviour are unchanged); without it,
`@triton.jit` wraps a function in a kernel that raises `TritonNotInstalled` (one line) when
launched, `tl.constexpr` holds a value, and any other attribute raises the same error, so a
launcher called anyway fails on its first triton use with that line, never an AttributeError.
"""

from __future__ import annotations

import types
from typing import Any, Callable

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

MISSING = ("triton is not installed (the Linux CUDA torch wheels ship it; CPU-only, macOS and "
           "Windows ones do not): fastdino's Triton kernels cannot run here; kernels.impl=auto "
           "or torch runs the PyTorch references")


class TritonNotInstalled(RuntimeError):
    """A Triton kernel was launched (or a triton function called) where triton is not installed."""


class _Absent(types.ModuleType):
    """A stand-in module: the names kernel modules evaluate at import exist, the rest raise."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # introspection (copy, pickle, inspect) sees a plain module
            raise AttributeError(name)
        raise TritonNotInstalled(f"triton.{name}: {MISSING}")


class _AbsentKernel:
    """What `@triton.jit` gives without triton: the function is kept, a launch raises."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)

    def __getitem__(self, grid: Any) -> Any:
        raise TritonNotInstalled(f"kernel {self.__name__}: {MISSING}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TritonNotInstalled(f"kernel {self.__name__}: {MISSING}")


def _jit(fn: Callable[..., Any] | None = None, **_options: Any) -> Any:
    """`@triton.jit` and `@triton.jit(do_not_specialize=...)`."""
    return _AbsentKernel(fn) if fn is not None else _AbsentKernel


class _Constexpr:
    """`tl.constexpr(v)` (module-level constants) and the `: tl.constexpr` annotation."""

    def __init__(self, value: Any = None):
        self.value = value


if not HAS_TRITON:
    triton = _Absent("triton")
    triton.jit = _jit
    tl = _Absent("triton.language")
    tl.constexpr = _Constexpr

__all__ = ["HAS_TRITON", "MISSING", "TritonNotInstalled", "tl", "triton"]
