"""The benchmark and parity harness (KERNELS.md §8). The `BenchCase` record below is the contract
each `bench/bench_<op>.py` plugs into: the module defines `cases(quick: bool, on_gpu: bool) ->
list[BenchCase]`; the harness discovers it, times every provider and judges parity."""

from __future__ import annotations

import contextlib
import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
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
    rtol: float = 1e-5  # fp32 / fp64 cases: max|kernel - truth| <= rtol * max|truth| (+ atol)
    modes: tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")  # ops with no gradient: ("fwd",)


# ------------------------------------------------------------------------------------------------
# Discovery: every bench/bench_<op>.py that defines `cases` (bench_step.py is the step benchmark).

BENCH_DIR = Path(__file__).resolve().parent
NOT_CASE_MODULES = ("bench_step", "bench_data")  # scripts with their own main()


# Order of `all`, so that a time-limited run (device_check.sh) spends its budget on what the
# open issues measure first: the loss kernels and RoPE, then attention and the whole student;
# ops not named run next in name order; last the opt-in pointwise fusions, curation's k-means
# and the harness self-test.
RUN_FIRST = ("dino_loss", "koleo", "gram", "rope", "attention", "student")
RUN_LAST = ("layernorm_residual", "swiglu", "kmeans_assign", "selftest")


def _run_order(op: str) -> tuple[int, int, str]:
    if op in RUN_FIRST:
        return (0, RUN_FIRST.index(op), op)
    if op in RUN_LAST:
        return (2, RUN_LAST.index(op), op)
    return (1, 0, op)


def available_ops() -> list[str]:
    """Op names from the file names alone (nothing imported): bench_<op>.py -> <op>, in run
    order (RUN_FIRST, the rest by name, RUN_LAST)."""
    ops = [p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py")
           if p.stem not in NOT_CASE_MODULES]
    return sorted(ops, key=_run_order)


def load_cases(op: str, quick: bool, on_gpu: bool) -> list[BenchCase]:
    module = importlib.import_module(f"bench.bench_{op}")
    if not hasattr(module, "cases"):
        raise AttributeError(f"bench/bench_{op}.py defines no `cases(quick, on_gpu)`")
    return list(module.cases(quick=quick, on_gpu=on_gpu))


# ------------------------------------------------------------------------------------------------
# Providers and modes.

MODES = ("fwd", "bwd", "fwd+bwd")


def providers_for(case: BenchCase) -> dict[str, Callable[..., Any]]:
    """The case's providers plus `torch_compile` = torch.compile(providers["torch"]), unless the
    case maps "torch_compile" to None (not a meaningful baseline there)."""
    out = {k: v for k, v in case.providers.items() if v is not None}
    if "torch_compile" not in case.providers:
        out["torch_compile"] = torch.compile(case.providers["torch"], dynamic=False)
    return out


def grad_names(case: BenchCase, inputs: dict[str, Any]) -> list[str]:
    if case.grad_inputs is not None:
        return list(case.grad_inputs)
    return [k for k, v in inputs.items() if torch.is_tensor(v) and v.requires_grad]


def fresh_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Independent leaf copies (so providers never share .grad or autograd history)."""
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v):
            out[k] = v.detach().clone().requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def grad_output_like(out: torch.Tensor) -> torch.Tensor | None:
    """None for a scalar loss (backward() seeds 1); a fixed-seed randn cotangent otherwise."""
    if out.numel() == 1:
        return None
    g = torch.Generator().manual_seed(1234)
    return torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)


def _replay_context(mode: str, provider: str):
    """The `bwd` mode replays one backward (retain_graph), which a compiled backward with donated
    buffers refuses (it frees saved activations it owns). That mode's torch_compile provider is
    recompiled and timed without donation; fwd and fwd+bwd keep the memory-saving default a
    training step gets."""
    if mode == "bwd" and provider == "torch_compile":
        torch._dynamo.reset()
        return torch._functorch.config.patch(donated_buffer=False)
    return contextlib.nullcontext()


def mode_fn(fn: Callable[..., torch.Tensor], inputs: dict[str, Any], mode: str,
            grad_out: torch.Tensor | None) -> Callable[[], Any]:
    """The closure that one timed call runs. `fwd` runs the training forward (grad enabled, so the
    autograd bookkeeping a training step pays is counted); `bwd` replays the backward of one
    forward made here (retain_graph); `fwd+bwd` does both per call."""
    if mode == "fwd":
        return lambda: fn(**inputs)
    if mode == "bwd":
        out = fn(**inputs)
        return lambda: out.backward(grad_out, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: fn(**inputs).backward(grad_out)
    raise ValueError(f"unknown mode {mode!r}: allowed is one of {', '.join(MODES)}")


# ------------------------------------------------------------------------------------------------
# Timing.


@dataclass
class Timing:
    median: float  # ms
    p20: float
    p80: float
    timer: str  # do_bench | do_bench_cudagraph | perf_counter
    # device time of one call replayed from a CUDA graph (no host launch cost, no L2 flush), when
    # probed: median >> graph_ms means the op is host-bound (launches and Python, not the GPU)
    graph_ms: float | None = None


CUDAGRAPH_BELOW_MS = 0.05  # ops under ~50 µs of device time: timed from CUDA-graph replays
# event timings under this may be host-bound: probe with a graph (the DINO CLS loss on an H200:
# 1.7 ms of events over 0.3 ms of kernels, bench/results/nvidia-h200-2026-11-26-check2/)
GRAPH_PROBE_BELOW_MS = 5.0


def time_gpu(fn: Callable[[], Any], grad_to_none: list[torch.Tensor], quick: bool) -> Timing:
    """`triton.testing.do_bench`: L2 flushed (256 MB memset) before every call, median / p20 / p80
    of CUDA-event times. Short ops: per-launch events on a starved stream time the host (launch
    overhead), not the GPU (KERNELS.md §8), so an op whose event time is under 1 ms is probed once
    more from CUDA-graph replays; if that device time is under ~50 µs the op is timed with
    `do_bench_cudagraph` (no L2 flush; the timer field says which). An op that cannot be captured
    falls back to do_bench. The probe's device time is kept as `graph_ms` (the table's `graph ms`
    column) for every op probed: event time far above it = host-bound."""
    from triton.testing import do_bench, do_bench_cudagraph

    q = [0.5, 0.2, 0.8]
    warmup, rep = (10, 40) if quick else (25, 100)
    probe = do_bench(fn, warmup=5, rep=10, grad_to_none=grad_to_none, return_mode="median")
    graph_probe = None
    if probe < GRAPH_PROBE_BELOW_MS:
        try:
            graph_probe = do_bench_cudagraph(fn, rep=5, grad_to_none=grad_to_none,
                                             return_mode="median")
            if graph_probe < CUDAGRAPH_BELOW_MS:
                ms = do_bench_cudagraph(fn, rep=rep, grad_to_none=grad_to_none, quantiles=q)
                return Timing(*ms, timer="do_bench_cudagraph", graph_ms=ms[0])
        except Exception:  # capture refused (host sync, allocator...): plain events below
            graph_probe = None
            torch.cuda.synchronize()  # a sticky CUDA error surfaces here, as this row's error
    ms = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=q)
    return Timing(*ms, timer="do_bench", graph_ms=graph_probe)


def time_cpu(fn: Callable[[], Any], grad_to_none: list[torch.Tensor], quick: bool) -> Timing:
    """CPU timing (do_bench needs CUDA): one warm-up call, then calls timed one by one with
    time.perf_counter until `budget_s` is spent (at least 3, at most `max_reps`); median / p20 /
    p80 of the per-call times. No cache flush: the CPU path exists for regression tracking of the
    references and the interpreter, not for roofline numbers."""
    budget_s, max_reps = (0.2, 5) if quick else (1.0, 50)

    def call() -> float:
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        times.append(call())
    return Timing(*quantiles_ms(times), timer="perf_counter")


def quantiles_ms(times: list[float]) -> tuple[float, float, float]:
    """Median, p20, p80 with linear interpolation (numpy's default)."""
    xs = sorted(times)

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return q(0.5), q(0.2), q(0.8)


def peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Peak allocated bytes of one call above what was allocated before it (CCE's op_mem)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------------------------
# One case: every provider x mode.


@dataclass
class Measurement:
    op: str
    case: str
    provider: str
    mode: str
    dtype: str
    params: dict[str, Any]
    timing: Timing | None = None
    peak_mem_mb: float | None = None
    error: str | None = None


def _measure(case: BenchCase, fn: Callable[..., Any], base: dict[str, Any], mode: str,
             on_gpu: bool, quick: bool) -> tuple[Timing, float | None]:
    """(timing, peak MB on a GPU) of one provider in one mode, on fresh copies of the inputs."""
    inputs = fresh_inputs(base)
    leaves = [inputs[k] for k in grad_names(case, inputs)]
    grad_out = None
    if mode != "fwd":
        grad_out = grad_output_like(fn(**fresh_inputs(base)))
    call = mode_fn(fn, inputs, mode, grad_out)
    timing = (time_gpu if on_gpu else time_cpu)(call, leaves, quick)
    return timing, (peak_memory_mb(call) if on_gpu else None)


def run_case(case: BenchCase, device: torch.device, modes: tuple[str, ...] = MODES,
             providers: list[str] | None = None, quick: bool = False) -> list[Measurement]:
    """Time every provider in every mode. A provider that raises (not importable, OOM at a 7B
    shape, a kernel bug) yields a row with `error` set; the sweep goes on."""
    on_gpu = device.type == "cuda"
    torch._dynamo.reset()  # each case compiles afresh (no recompile-limit fallback to eager)
    base = case.make_inputs(device, case.dtype)
    rows = []
    for mode in [m for m in modes if m in case.modes]:
        for name, fn in providers_for(case).items():
            if providers is not None and name not in providers:
                continue
            row = Measurement(case.op, case.name, name, mode, str(case.dtype).replace("torch.", ""),
                              case.params)
            try:
                with _replay_context(mode, name):
                    row.timing, row.peak_mem_mb = _measure(case, fn, base, mode, on_gpu, quick)
            except Exception as e:  # recorded, printed, and the sweep continues
                row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                if on_gpu:
                    torch.cuda.empty_cache()
            rows.append(row)
    return rows


def case_selected(name: str, spec: str | None) -> bool:
    """--cases: a comma list of texts; a case runs when its name contains any of them."""
    return spec is None or any(s and s in name for s in spec.split(","))
