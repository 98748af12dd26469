"""`python -m bench profile <op> [--cases TEXT] [--providers LIST] [--modes LIST] [--top N]`:
where one call of a benchmark case spends its time, for the calls the timing tables cannot
explain (an op whose median sits far above its bytes / bandwidth is host-bound, or launches
more kernels than it should, or synchronises with the host).

Per case, provider and mode (the same call the timing harness times, bench/harness.py):
  host µs/call    enqueue time: calls issued back to back, no synchronisation (the CPU cost)
  wall µs/call    calls each followed by torch.cuda.synchronize (what a step waits for)
  device µs/call  sum of the GPU kernel times under torch.profiler (what the GPU works)
  kernels/call    GPU kernel launches (memsets and copies included)
  syncs/call      host-device synchronisations (cudaStreamSynchronize, cudaDeviceSynchronize,
                  device-to-host copies): each one stalls the host until the GPU drains
then the top N GPU kernels by device time, the top N top-level host ops by CPU time and the top N
Python functions by own time under cProfile (count and µs per call). host > device means the op
is host-bound: fewer launches and host ops (fusion, CUDA graphs) pay, faster kernels do not.
Without CUDA only the host side is printed (the interpreter's numbers mean nothing: a smoke test
of the script).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
DTOH = ("Memcpy DtoH", "cudaMemcpy ")  # device-to-host copies (the `.item()` family)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("op", help="an op of bench/bench_<op>.py, e.g. dino_loss")
    p.add_argument("--cases", default=None,
                   help="only cases whose name contains one of these texts (comma list)")
    p.add_argument("--providers", default="triton", help="comma list (default: triton)")
    p.add_argument("--modes", default="fwd,bwd", help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--quick", action="store_true", help="the --quick case list")
    p.add_argument("--calls", type=int, default=10, help="profiled calls per measurement")
    p.add_argument("--top", type=int, default=8, help="kernels listed per measurement")
    args = p.parse_args(argv)
    if args.calls < 1 or args.top < 0:
        p.error(f"--calls must be >= 1 and --top >= 0, got {args.calls} and {args.top}")
    return args


def _host_and_wall_us(call, n: int, cuda: bool) -> tuple[float, float]:
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    host = (time.perf_counter() - t0) / n * 1e6
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        call()
        sync()
    return host, (time.perf_counter() - t0) / n * 1e6


def _python_top(call, n: int, top: int) -> list[tuple[str, float, float]]:
    """(function, calls, own µs) per op call of the Python functions with the most own time
    (cProfile: inflates every Python call, so the ranking counts, not the absolute µs)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        call()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [(f"{os.path.basename(f)}:{line}({name})", nc / n, tt / n * 1e6)
            for (f, line, name), (_, nc, tt, _, _) in rows]


def fresh_grads(call, leaves: list):
    """`call` with the leaves' .grad dropped before each run, as the timed benchmark does
    (do_bench's grad_to_none): otherwise every backward after the first accumulates into .grad,
    one add kernel per leaf that neither training (zero_grad) nor the benchmark runs."""
    def run():
        for t in leaves:
            t.grad = None
        return call()
    return run


def profile_call(call, n: int, top: int, cuda: bool) -> dict:
    """Host, wall and device time per call, launches and syncs per call, the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        call()
    host, wall = _host_and_wall_us(call, n, cuda)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            call()
        if cuda:
            torch.cuda.synchronize()
    kernels, host_ops, syncs, launches = {}, {}, 0, 0
    for e in prof.events():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += e.device_time
            launches += 1
            continue
        if any(s in e.name for s in SYNC_EVENTS) or any(s in e.name for s in DTOH):
            syncs += 1
        if e.cpu_parent is None:  # top-level host ops: what the Python code called
            k = host_ops.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += e.cpu_time_total

    def per_call(d):
        ranked = sorted(d.items(), key=lambda kv: -kv[1][1])
        return [(name, c / n, t / n) for name, (c, t) in ranked]
    return {"host_us": host, "wall_us": wall, "python": _python_top(call, n, top),
            "device_us": sum(v[1] for v in kernels.values()) / n if cuda else None,
            "kernels": launches / n if cuda else None, "syncs": syncs / n,
            "host_ops": sum(c for c, _ in host_ops.values()) / n,
            "top": per_call(kernels)[:top], "top_host": per_call(host_ops)[:top]}


def format_profile(op: str, case: str, provider: str, mode: str, r: dict) -> str:
    dev = "n/a (no CUDA)" if r["device_us"] is None else f"{r['device_us']:.1f}"
    ker = "n/a" if r["kernels"] is None else f"{r['kernels']:.1f}"
    lines = [f"{op} {case} {provider} {mode}: host {r['host_us']:.1f} µs/call | wall "
             f"{r['wall_us']:.1f} | device {dev} | kernels/call {ker} | syncs/call "
             f"{r['syncs']:.1f} | top-level host ops/call {r['host_ops']:.1f}"]
    for name, count, us in r["top"]:
        lines.append(f"    {us:9.1f} µs device x{count:<5.1f} {name[:110]}")
    for name, count, us in r["top_host"]:
        lines.append(f"    {us:9.1f} µs host   x{count:<5.1f} {name[:110]}")
    for name, count, us in r["python"]:
        lines.append(f"    {us:9.1f} µs python x{count:<5.1f} {name[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    from bench._paths import ensure_importable

    ensure_importable()
    from bench.harness import (
        MODES,
        available_ops,
        case_selected,
        fresh_inputs,
        grad_names,
        grad_output_like,
        load_cases,
        mode_fn,
        providers_for,
    )

    if args.op not in available_ops():
        print(f"error: unknown op {args.op!r}: available are {', '.join(available_ops())}",
              file=sys.stderr)
        return 2
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        print(f"error: --modes {args.modes!r}: allowed are {', '.join(MODES)}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    cases = [c for c in load_cases(args.op, quick=args.quick, on_gpu=cuda)
             if case_selected(c.name, args.cases)]
    if not cases:
        print(f"error: no case of {args.op} matches --cases {args.cases!r}", file=sys.stderr)
        return 2
    wanted = [w for w in args.providers.split(",") if w]
    from bench.runner import provider_names

    known = list(dict.fromkeys(n for c in cases for n in provider_names(c)))
    missing = [w for w in wanted if w not in known]
    if missing:  # else it profiled nothing and exited 0
        print(f"error: --providers {', '.join(map(repr, missing))}: no selected case of "
              f"{args.op} has {'it' if len(missing) == 1 else 'them'}; their providers are "
              f"{', '.join(known)}", file=sys.stderr)
        return 2
    for case in cases:
        base = case.make_inputs(device, case.dtype)
        provs = {k: v for k, v in providers_for(case).items() if k in wanted}
        for mode in [m for m in modes if m in case.modes]:  # forward-only ops: fwd
            for name, fn in provs.items():
                try:
                    inputs = fresh_inputs(base)
                    grad_out = None if mode == "fwd" else grad_output_like(fn(**fresh_inputs(base)))
                    leaves = [inputs[k] for k in grad_names(case, inputs)]
                    call = fresh_grads(mode_fn(fn, inputs, mode, grad_out), leaves)
                    r = profile_call(call, args.calls, args.top, cuda)
                    print(format_profile(args.op, case.name, name, mode, r), flush=True)
                except Exception as e:  # one failing provider does not end the profile
                    print(f"{args.op} {case.name} {name} {mode}: {type(e).__name__}: {e}",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
