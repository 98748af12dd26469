"""`python -m bench floors`: the latency floors of this GPU, measured, against which the launch- and
latency-bound ops are judged (the roofline's other end: `roofline.py` measures the ceilings).

Why: several targets sit at shapes where no kernel streams or multiplies for long (KoLeo at
B = 64: 15.6 µs of CUDA-graph time for torch.compile's fwd+bwd, so 2x is 7.8 µs for two kernels;
the DINO CLS loss: ~20 launches under 1.4 ms of host time). Whether such a target is reachable is
a question of these floors, not of kernel design:
  host µs / launch   a Triton launch from Python (1 argument, and 14 like our launchers; and the
                     14-argument kernel through its compiled launcher directly, skipping
                     JITFunction.run: what a cached launcher would save), a tiny torch op, a
                     torch.empty: what a host-bound op pays per launch
  graph µs / node    an empty kernel replayed back to back from a CUDA graph (as the bench times
                     small ops): the cost of one more kernel in a fwd+bwd
  ns / round trip    one program walking a random pointer chain (each load's address is the
                     previous load's value) in an 8 MiB buffer (L2-resident) and in a 512 MiB
                     one (HBM): the latency of one dependent global access, the unit of a
                     latency-bound kernel's critical path (slope of a fit over chain lengths)
  µs / ticket        the last-arriver pattern (every program stores, one atomic ticket each, the
                     last one reads all the stores back): 64 programs against an empty 64-program
                     kernel, the price of a cross-program reduction inside one launch (the KoLeo
                     small forward takes two)
A latency-bound kernel costs about one node plus its chain of dependent round trips (and tickets).

GPU only (CUDA events, CUDA graphs); on the CPU the command says so and exits 0. The kernels also
run under the interpreter (tests/unit/test_floors.py checks what they compute).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastdino.kernels._utils import next_pow2

LINE_INT32 = 32  # 128-byte lines: one int32 per line holds the chain
CHAIN_STEPS = (16, 256)  # the two chain lengths of the round-trip fit
TICKET_PROGRAMS = 64


@triton.jit
def _empty_kernel(X_ptr, n):
    if tl.program_id(0) >= n:  # never true (the grid is n programs): the argument stays live
        tl.store(X_ptr, 0)


@triton.jit
def _empty_args_kernel(A_ptr, B_ptr, C_ptr, D_ptr, E_ptr, F_ptr, n, k, stride_a, stride_b,
                       k_per_split, n_splits, scale, shift, BLOCK: tl.constexpr):
    # a launch signature like the loss launchers' (6 pointers, 6 ints, 2 floats, a constexpr)
    if tl.program_id(0) >= n:
        v = (k + stride_a + stride_b + k_per_split + n_splits).to(tl.float32) * scale + shift
        tl.store(A_ptr + tl.arange(0, BLOCK), tl.full([BLOCK], 0.0, tl.float32) + v)
        tl.store(B_ptr, v)
        tl.store(C_ptr, v)
        tl.store(D_ptr, v)
        tl.store(E_ptr, v)
        tl.store(F_ptr, v)


@triton.jit
def _chase_kernel(Next_ptr, Out_ptr, start, steps):
    # one program, one chain: every load's address is the previous load's value, so the loads
    # cannot overlap; .cg skips L1 (the chain never revisits a line within its steps anyway)
    j = start
    for _ in range(steps):
        j = tl.load(Next_ptr + j, cache_modifier=".cg")
    tl.store(Out_ptr, j)


@triton.jit
def _ticket_kernel(Count_ptr, Val_ptr, Out_ptr, BLOCK: tl.constexpr):
    # the KoLeo small forward's reduction: store, barrier, acq_rel ticket; the last program to
    # arrive resets the counter and sums every program's value (volatile: written by other SMs)
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    tl.store(Val_ptr + pid, pid.to(tl.float32))
    tl.debug_barrier()
    ticket = tl.atomic_add(Count_ptr, 1)
    if ticket == n - 1:
        tl.atomic_xchg(Count_ptr, 0)
        offs = tl.arange(0, BLOCK)
        v = tl.load(Val_ptr + offs, mask=offs < n, other=0.0, volatile=True)
        tl.store(Out_ptr, tl.sum(v, axis=0))


def compile_specs():
    """The probes at their launch configurations, for `python -m bench compile-report --module
    bench.floors` (they must compile for sm_90 / sm_80 under triton 3.6 and the newest)."""
    from fastdino.kernels._utils import CompileSpec

    ptr = "*fp32"
    return [
        CompileSpec("floors_empty", _empty_kernel, {"X_ptr": ptr, "n": "i32"}, num_warps=1),
        CompileSpec("floors_empty_args[BLOCK=128]", _empty_args_kernel,
                    {**{f"{c}_ptr": ptr for c in "ABCDEF"}, "n": "i32", "k": "i32",
                     "stride_a": "i32", "stride_b": "i32", "k_per_split": "i32",
                     "n_splits": "i32", "scale": "fp32", "shift": "fp32"},
                    {"BLOCK": 128}, num_warps=4),
        CompileSpec("floors_chase", _chase_kernel,
                    {"Next_ptr": "*i32", "Out_ptr": "*i32", "start": "i32", "steps": "i32"},
                    num_warps=1),
        CompileSpec(f"floors_ticket[BLOCK={TICKET_PROGRAMS}]", _ticket_kernel,
                    {"Count_ptr": "*i32", "Val_ptr": ptr, "Out_ptr": ptr},
                    {"BLOCK": TICKET_PROGRAMS}, num_warps=4),
    ]


def pointer_chain(lines: int, device, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(next, start): an int32 buffer of `lines` 128-byte lines whose first words form one random
    cycle through every line (next[i·32] = the element index of the following line's word), and
    the cycle's first element index. Random order: neither the prefetchers nor a stride help."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(lines, generator=g)
    nxt = torch.zeros(lines * LINE_INT32, dtype=torch.int32)
    nxt[order * LINE_INT32] = (torch.roll(order, -1) * LINE_INT32).to(torch.int32)
    return nxt.to(device), int(order[0]) * LINE_INT32


def walk(nxt: torch.Tensor, start: int, steps: int) -> int:
    """Where `steps` hops from `start` end (host reference of _chase_kernel)."""
    j = start
    for _ in range(steps):
        j = int(nxt[j])
    return j


def chase(nxt: torch.Tensor, start: int, steps: int) -> torch.Tensor:
    out = torch.empty(1, device=nxt.device, dtype=torch.int32)
    _chase_kernel[(1,)](nxt, out, start, steps, num_warps=1)
    return out


def ticket_sum(count: torch.Tensor, vals: torch.Tensor, programs: int) -> torch.Tensor:
    """Launch the ticket kernel on `programs` programs: returns Σ pid; leaves `count` zero."""
    out = torch.empty(1, device=vals.device, dtype=torch.float32)
    _ticket_kernel[(programs,)](count, vals, out, BLOCK=next_pow2(programs), num_warps=4)
    return out


def per_step(steps: tuple[int, int], times: tuple[float, float]) -> tuple[float, float]:
    """(slope, intercept) of the line through two (steps, time) points: the time of one more
    step and the time at zero steps."""
    (s0, s1), (t0, t1) = steps, times
    if s1 == s0:
        raise ValueError(f"per_step needs two different step counts, got {steps}")
    slope = (t1 - t0) / (s1 - s0)
    return slope, t0 - slope * s0


@dataclass
class Floors:
    host_us: dict[str, float]  # per launch, from Python, no sync
    graph_node_us: dict[str, float]  # per kernel replayed back to back from a CUDA graph
    round_trip_ns: dict[str, float]  # per dependent load: "l2", "hbm"
    chain_intercept_us: dict[str, float]  # the chain kernel's graph time at zero steps
    ticket_us: float  # ticket kernel minus an empty kernel, both at TICKET_PROGRAMS programs


def _host_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / n * 1e6


def _graph_us(fn) -> float:
    from triton.testing import do_bench_cudagraph

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3


CHAIN_BYTES = (("l2", 8 * 2**20), ("hbm", 512 * 2**20))  # fits L2 (H100 50 MB, H200 60 MB) / not


def _chain_fit(nbytes: int, dev, graph_us) -> tuple[float, float]:
    """(ns per dependent load, µs at zero steps) of the chase kernel in an `nbytes` buffer."""
    nxt, start = pointer_chain(nbytes // (4 * LINE_INT32), dev)
    ts = tuple(graph_us(lambda s=s: chase(nxt, start, s)) for s in CHAIN_STEPS)
    slope, intercept = per_step(CHAIN_STEPS, ts)
    return slope * 1e3, intercept


_ARGS14 = (1, 65536, 65536, 65536, 4096, 16, 0.5, 1.0)  # n .. shift of _empty_args_kernel


def _direct_launch(compiled, args: tuple, dev):
    """A launch that skips JITFunction.run (argument binding, specialization, cache key, hooks):
    the compiled kernel's own launcher, as torch inductor calls it. `args`: every parameter in
    order, constexprs included (what JITFunction.run hands the launcher). What a cached launcher
    in our launchers would cost per launch; None (with the reason printed) where this triton's
    CompiledKernel does not take it."""
    try:
        stream = torch.cuda.current_stream(dev).cuda_stream
        runner = compiled[(1, 1, 1)]

        def launch():
            runner(*args, stream=stream)
        launch()
        torch.cuda.synchronize(dev)
        return launch
    except Exception as e:  # an API difference between triton versions: report, do not fail
        print(f"floors: direct launch not measured ({type(e).__name__}: {e})")
        return None


def measure(dev=None, host_us=None, graph_us=None, chain_bytes=CHAIN_BYTES) -> Floors:
    """Every floor on `dev` (default: the current CUDA device). host_us / graph_us: the timers
    (default: wall clock over many launches; do_bench_cudagraph), replaceable so that the CPU
    tests run this whole function under the interpreter."""
    dev = torch.device("cuda") if dev is None else torch.device(dev)
    host_us, graph_us = host_us or _host_us, graph_us or _graph_us
    x = torch.zeros(256, device=dev, dtype=torch.float32)
    y = torch.zeros(1, device=dev, dtype=torch.float32)
    ptrs = [torch.zeros(256, device=dev) for _ in range(6)]

    def empty1():
        _empty_kernel[(1,)](x, 1, num_warps=1)

    def empty14():
        _empty_args_kernel[(1,)](*ptrs, *_ARGS14, BLOCK=128, num_warps=4)

    def add1():
        y.add_(1.0)

    host = {"triton 1 arg": host_us(empty1), "triton 14 args": host_us(empty14),
            "torch add_ (1 element)": host_us(add1),
            "torch.empty (1 KiB)": host_us(lambda: torch.empty(256, device=dev))}
    if dev.type == "cuda":
        direct = _direct_launch(_empty_args_kernel[(1,)](*ptrs, *_ARGS14, BLOCK=128, num_warps=4),
                                (*ptrs, *_ARGS14, 128), dev)
        if direct is not None:
            host["triton 14 args, direct"] = host_us(direct)
    node = {"triton empty": graph_us(empty1), "torch add_ (1 element)": graph_us(add1)}
    rt, icpt = {}, {}
    for name, nbytes in chain_bytes:
        rt[name], icpt[name] = _chain_fit(nbytes, dev, graph_us)
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the 512 MiB chain
    count = torch.zeros(1, device=dev, dtype=torch.int32)
    vals = torch.zeros(TICKET_PROGRAMS, device=dev, dtype=torch.float32)
    wide = graph_us(lambda: _empty_kernel[(TICKET_PROGRAMS,)](x, TICKET_PROGRAMS, num_warps=4))
    ticket = graph_us(lambda: ticket_sum(count, vals, TICKET_PROGRAMS)) - wide
    return Floors(host, node, rt, icpt, ticket)


def format_floors(f: Floors) -> str:
    lines = ["floors (GPU latency floors; bench/floors.py)"]
    lines += [f"  host µs / launch   {k:<26} {v:7.2f}" for k, v in f.host_us.items()]
    lines += [f"  graph µs / node    {k:<26} {v:7.2f}" for k, v in f.graph_node_us.items()]
    lines += [f"  ns / round trip    {k:<26} {v:7.1f}   (chain kernel at 0 steps: "
              f"{f.chain_intercept_us[k]:.2f} µs)" for k, v in f.round_trip_ns.items()]
    lines.append(f"  µs / ticket        {TICKET_PROGRAMS} programs{'':<15} {f.ticket_us:7.2f}   "
                 "(ticket kernel minus an empty one)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench floors", description=__doc__.splitlines()[0])
    p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not torch.cuda.is_available():
        print("floors: no CUDA device; these are GPU measurements (nothing measured)")
        return 0
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton "
          f"{triton.__version__}")
    print(format_floors(measure()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
