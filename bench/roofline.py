"""Roofline ceilings *measured* on the device, and the derived metric of a timing against them
(KERNELS.md §1.2: model GB/s vs a measured device-to-device copy for memory-bound ops, TFLOP/s vs a
measured cuBLAS bf16 GEMM for matmul-bound ones; the byte / FLOP formula is printed beside it).

Arithmetic (unit-tested in tests/unit/test_harness.py):
    GB/s     = bytes / (ms * 1e-3) / 1e9
    TFLOP/s  = flops / (ms * 1e-3) / 1e12
    % roof   = 100 * achieved / measured ceiling
    copy GB/s (ceiling) = 2 * nbytes / t   (a copy reads and writes every byte)
    GEMM TFLOP/s (ceiling) = 2 * M * N * K / t
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Roofline:
    copy_gbps: float | None  # measured device-to-device copy, bytes read + written
    gemm_tflops: float | None  # measured bf16 GEMM (cuBLAS through torch.matmul)
    copy_bytes: int = 0  # size of the copied buffer
    gemm_mnk: int = 0  # M = N = K of the measured GEMM

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def tflops(flops: int, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def percent(achieved: float, ceiling: float | None) -> float | None:
    return None if not ceiling else 100.0 * achieved / ceiling


def measure(quick: bool = False) -> Roofline:
    """On CUDA: time a 1 GiB device-to-device copy and an 8192^3 bf16 GEMM (4096^3 when quick)
    with do_bench (median) on random data (zeros run fast, METHOD.md). On CPU: no ceilings."""
    if not torch.cuda.is_available():
        return Roofline(None, None)
    from triton.testing import do_bench

    n = 2**28  # fp32 elements = 1 GiB, far beyond L2
    nbytes = 4 * n
    copy = gbps(2 * nbytes, _time_copy(n, do_bench))
    m = 4096 if quick else 8192
    gemm = tflops(2 * m**3, _time_gemm(m, do_bench))
    torch.cuda.empty_cache()
    return Roofline(copy, gemm, nbytes, m)


def _time_copy(n: int, do_bench) -> float:
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    return do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")


def _time_gemm(m: int, do_bench) -> float:
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    return do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")


def derived_metric(case: Any, mode: str, ms: float, roof: Roofline) -> dict[str, Any] | None:
    """The case's metric for `mode`: TFLOP/s when the case gives FLOPs (matmul-bound), else model
    GB/s when it gives bytes; None when it gives neither (or not for this mode)."""
    parts = {"fwd": ("fwd",), "bwd": ("bwd",), "fwd+bwd": ("fwd", "bwd")}[mode]
    flops = [getattr(case, f"flops_{p}") for p in parts]
    nbytes = [getattr(case, f"bytes_{p}") for p in parts]
    if all(f is not None for f in flops):
        value = tflops(sum(flops), ms)
        return {"name": "TFLOP/s", "value": value, "ceiling": roof.gemm_tflops,
                "ceiling_name": "measured bf16 GEMM",
                "pct_roofline": percent(value, roof.gemm_tflops),
                "formula": case.formula}
    if all(b is not None for b in nbytes):
        value = gbps(sum(nbytes), ms)
        return {"name": "GB/s", "value": value, "ceiling": roof.copy_gbps,
                "ceiling_name": "measured D2D copy", "pct_roofline": percent(value, roof.copy_gbps),
                "formula": case.formula}
    return None
