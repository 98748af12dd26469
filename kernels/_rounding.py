"""Round-to-nearest-even stores under the Triton interpreter.

On a GPU, `x.to(tl.bfloat16)` rounds fp32 to the nearest bf16 (ties to even), as PyTorch does.
The CPU interpreter (triton 3.6 and 3.9, measured 2026-07) truncates instead, even with
`fp_downcast_rounding="rtne"`: every bf16 result it stores is up to one ulp low in magnitude, so
CPU parity tests would measure the interpreter's truncation, not the kernel. `to_stored` rounds
the fp32 bits to nearest even first (the interpreter's truncation is then exact); compiled for a
GPU, `INTERPRETED` is a False constexpr and the branch is not emitted, so the GPU code is a plain
cast. Kernels cast every fp32 result they store in the caller's dtype through it.
"""

from fastdino.kernels._triton import tl, triton
from fastdino.kernels._utils import is_interpreter

# a global constexpr: triton folds it at compile time (and keys its cache on it)
INTERPRETED = tl.constexpr(is_interpreter())


@triton.jit
def rne_bf16(x):
    """fp32 -> the fp32 value nearest to it that bf16 holds (ties to even); NaN/inf are kept
    (a NaN payload could carry into the exponent, so they bypass the add)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    return tl.where(x == x, tl.where(tl.abs(x) == float("inf"), x, rounded), x)


@triton.jit
def to_stored(x, dtype: tl.constexpr):
    """`x.to(dtype)` with the GPU's rounding to nearest even for bf16 under the interpreter too."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            if x.dtype == tl.float32:
                x = rne_bf16(x)
    return x.to(dtype)
