"""`python -m bench`: kernel microbenchmarks, parity checks, the step benchmark, the compile report.

Works from a bare copy of the repo (no pip install): the repo root goes on sys.path and
`fastdino.kernels` is mapped to kernels/ (bench/_paths.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._paths import ensure_importable  # noqa: E402

EPILOG = """\
targets:
  <op>             one kernel: the cases of bench/bench_<op>.py; op1,op2,... several
  all              every bench/bench_<op>.py present (a module that fails to import is reported
                   and skipped)
  step             end-to-end training-step benchmark (bench/bench_step.py; see `step --help`)
  compile-report   compile every kernel spec for sm_90 and sm_80 without a GPU and print
                   registers / spills / shared memory (see `compile-report --help`)
  data             data-loader throughput, DALI vs torch (bench/bench_data.py; `data --help`)
  profile          where one call of an op's case spends its time: host vs device µs, kernel
                   launches and host syncs per call, top kernels (`profile --help`)
  floors           this GPU's latency floors: host µs per launch (Triton, torch), CUDA-graph µs
                   per kernel node, ns per dependent global load (L2, HBM), µs per last-arriver
                   ticket: what launch- and latency-bound ops are judged against (bench/floors.py)

timing:
  CUDA: triton.testing.do_bench (L2 flushed before every call; median, p20, p80 of CUDA-event
        times); ops under ~50 us of device time (probed from a CUDA graph when the event
        time is under 5 ms: short ops are host-bound) use do_bench_cudagraph; the probe's device
        time is the `graph ms` column (median >> graph ms: host-bound). Peak memory =
        max_memory_allocated delta of one call. Metric: model GB/s against a measured 1 GiB
        device-to-device copy, or TFLOP/s against a measured bf16 GEMM, with the case's byte /
        FLOP formula.
  CPU:  Triton runs under its interpreter (TRITON_INTERPRET=1 is set before any kernel module is
        imported) on the interpreter-sized cases (cases(on_gpu=False)); each call is timed with
        time.perf_counter after one warm-up (median, p20, p80; no cache flush, no roofline),
        single-threaded (torch.set_num_threads(1)) so a shared machine gives stable numbers.
modes: fwd (training forward, grad enabled), bwd (backward of one forward, retain_graph),
       fwd+bwd.
providers: torch (the <op>_ref), torch_compile (torch.compile of it), triton (ours), and any
       named peer a case adds when importable (e.g. liger).

--check: per case, the forward and every gradient of `triton` at the case dtype against `torch`
  on inputs upcast to the case's reference dtype (the truth). fp32: max|k-truth| <= max(rtol *
  max|truth|, 2 * max|torch_fp32-truth|) + atol; bf16/fp16: max|k-truth| <= 2 * max|torch_lowp -
  truth| + atol. Prints PASS/FAIL per quantity; exit code 1 on any failure.

results: JSON lines appended to <out>/<gpu-slug>-<date>.jsonl (schema in bench/results.py),
  tagged with GPU name, commit (FASTDINO_COMMIT or git), torch and triton versions.
"""


# targets that are scripts of their own (their own --help), not kernel-case sweeps
SCRIPTS = {"step": "bench.bench_step", "compile-report": "bench.compile_report",
           "data": "bench.bench_data", "profile": "bench.profile_op", "floors": "bench.floors"}
# the targets that run without triton (kernels.impl=torch without a GPU; the data loaders):
# every other one times, checks or compiles the Triton kernels
NO_TRITON = ("step", "data")


def triton_missing(target: str) -> str | None:
    """The one-line error for a target that needs triton where it is not installed (CPU-only,
    macOS and Windows torch wheels ship none), else None."""
    if target in NO_TRITON:
        return None
    import importlib.util

    # find_spec, not import: triton must be imported after TRITON_INTERPRET is set (main() sets
    # it on CPU), or its @triton.jit functions are made for the compiler, not the interpreter
    # (sys.modules["triton"] = None is how Python spells a module that must not import)
    present = (sys.modules["triton"] is not None if "triton" in sys.modules
               else importlib.util.find_spec("triton") is not None)
    if not present:
        return (f"error: python -m bench {target} needs triton, which is not installed (the Linux "
                f"CUDA torch wheels ship it): without it only {' and '.join(NO_TRITON)} run")
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("target", help="an op (or a comma list of ops), all, or a script (see below)")
    p.add_argument("--quick", action="store_true", help="fewer cases and shorter timing")
    p.add_argument("--check", action="store_true", help="parity check instead of timing")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder for the JSONL results (default: bench/results)")
    p.add_argument("--providers", default=None,
                   help="comma list to time, e.g. torch,triton (default: all of the case's + "
                        "torch_compile)")
    p.add_argument("--modes", default="fwd,bwd,fwd+bwd", help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--cases", default=None,
                   help="only cases whose name contains one of these texts (comma list)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda when available")
    p.add_argument("--no-save", action="store_true", help="print only, append no JSON lines")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget for the whole run: each op gets an equal share of "
                        "what is left when it starts (time an op leaves unused goes to the "
                        "later ones); cases past an op's share are skipped and counted")
    args = p.parse_args(argv)
    if args.time_budget is not None and args.time_budget <= 0:
        p.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SCRIPTS:
        # their --help needs no triton, except floors' (it imports triton at the top)
        if not {"-h", "--help"} & set(argv[1:]) or argv[0] == "floors":
            if problem := triton_missing(argv[0]):
                print(problem, file=sys.stderr)
                return 2
        ensure_importable()
        import importlib

        return importlib.import_module(SCRIPTS[argv[0]]).main(argv[1:])
    args = parse_args(argv)
    if problem := triton_missing(args.target):
        print(problem, file=sys.stderr)
        return 2

    import torch

    from bench.harness import MODES, available_ops

    ops = available_ops()
    wanted = ops if args.target == "all" else args.target.split(",")
    unknown = [op for op in wanted if op not in ops]
    if unknown:
        print(f"error: unknown op(s) {', '.join(map(repr, unknown))}: available are "
              f"{', '.join(ops)}, all, {', '.join(SCRIPTS)}", file=sys.stderr)
        return 2
    modes = tuple(args.modes.split(","))
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"error: unknown mode(s) {bad}: allowed is {', '.join(MODES)}", file=sys.stderr)
        return 2
    from bench.results import out_dir_problem

    if not args.no_save and (problem := out_dir_problem(args.out)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    on_gpu = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    ensure_importable()
    from bench.runner import run

    return run(wanted, args, on_gpu)


if __name__ == "__main__":
    sys.exit(main())
