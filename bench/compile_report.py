"""Compile every Triton kernel at each shipped launch configuration for real GPUs, without a GPU.

`python -m bench compile-report [--arch 90 80] [--module MOD[:FUNC]] [--json PATH]`

Each `kernels/<op>.py` (not starting with `_`) that defines `compile_specs()` returns
`fastdino.kernels._utils.CompileSpec` records; every spec is compiled with
`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))`
(attrs: the spec's `divisible_by_16` arguments, specialised as a real launch would be). The
cubin's resource usage (registers, stack frame, local memory) is read with the `cuobjdump`
shipped inside the triton wheel (`--dump-resource-usage`); shared memory comes from the compiled
kernel's metadata. A spec has a problem when it does not compile, when it uses stack or local
memory (register spills land there), or when its shared memory exceeds the target's per-block
limit (227 KB on sm_90, 163 KB on sm_80). Exit code 1 when any spec has a problem.

The kernels must be real `triton.jit` functions, so this runs with TRITON_INTERPRET unset (it
re-executes itself without it when the variable is on). Works under triton 3.6 and 3.9 (same
ASTSource(fn, signature, constexprs) API; constexpr arguments appear in the signature as
"constexpr").
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Max dynamic shared memory per block (opt-in): sm_90 227 KB, sm_80 163 KB (CUDA guide, table 21).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def kernel_modules() -> list[str]:
    return sorted(p.stem for p in (REPO_ROOT / "kernels").glob("*.py")
                  if not p.stem.startswith("_"))


def _import(ref: str):
    """'fastdino.kernels.x' / 'bench.bench_selftest' / 'path/to/file.py'."""
    if ref.endswith(".py"):
        path = Path(ref).resolve()
        name = "_compile_report_" + re.sub(r"\W", "_", path.stem)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(ref)


def collect_specs(extra: list[str] = (), kernels: bool = True
                  ) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """([(module, CompileSpec)], [(module, import error)]) for every kernel module (unless
    `kernels` is False) + `extra` ("MOD" or "MOD:FUNC", FUNC defaulting to compile_specs)."""
    refs = [(f"fastdino.kernels.{m}", "compile_specs") for m in kernel_modules()] if kernels else []
    for e in extra:
        ref, _, func = e.partition(":")
        refs.append((ref, func or "compile_specs"))
    specs, errors = [], []
    for ref, func in refs:
        try:
            module = _import(ref)
        except Exception as e:
            errors.append((ref, f"{type(e).__name__}: {e}"))
            continue
        if hasattr(module, func):
            try:
                specs += [(ref, s) for s in getattr(module, func)()]
            except Exception as e:
                errors.append((ref, f"{func}() raised {type(e).__name__}: {e}"))
    return specs, errors


def cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found in the triton wheel at {path}")
    return str(path)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the kernel function in a cubin (max over functions)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    finally:
        os.unlink(f.name)
    usage: dict[str, int] = {}
    for line in out.splitlines():
        if "REG:" not in line:
            continue
        for key, val in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line):
            usage[key.lower()] = max(usage.get(key.lower(), 0), int(val))
    if "reg" not in usage:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return usage


def compile_one(spec: Any, cc: int) -> dict[str, Any]:
    """Compile one spec for sm_<cc>; a dict with the resource usage, or the compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res: dict[str, Any] = {"name": spec.name, "arch": cc, "num_warps": spec.num_warps,
                           "num_stages": spec.num_stages, "shared_limit": SHARED_LIMIT[cc],
                           "div16": list(getattr(spec, "divisible_by_16", ()) or ()),
                           "error": None}
    t0 = time.perf_counter()
    try:
        sig = _full_signature(spec)
        src = ASTSource(fn=spec.fn, signature=sig, constexprs=dict(spec.constexprs),
                        attrs=divisibility_attrs(spec, sig))
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                options={"num_warps": spec.num_warps,
                                         "num_stages": spec.num_stages,
                                         "enable_fp_fusion": getattr(spec, "enable_fp_fusion",
                                                                     True)})
        res.update(resource_usage(kernel.asm["cubin"]))
        res["shared"] = int(kernel.metadata.shared)  # bytes the launch must request
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {str(e).strip()[:500]}"
    res["compile_s"] = round(time.perf_counter() - t0, 2)
    return res


def divisibility_attrs(spec: Any, sig: dict[str, str]) -> dict[tuple[int], list] | None:
    """ASTSource attrs marking the spec's `divisible_by_16` arguments as triton's JIT marks them
    at a real launch ({(arg index,): [["tt.divisibility", 16]]}; same form in triton 3.6 and
    3.9). An unknown or constexpr name is an error naming it."""
    names = tuple(getattr(spec, "divisible_by_16", ()) or ())
    if not names:
        return None
    order = list(spec.fn.arg_names)
    for n in names:
        if n not in sig or sig[n] == "constexpr" or sig[n].startswith("fp"):
            raise ValueError(f"spec {spec.name}: divisible_by_16 names {n!r}, which is not a "
                             "pointer or integer argument of the kernel")
    return {(order.index(n),): [["tt.divisibility", 16]] for n in names}


def _full_signature(spec: Any) -> dict[str, str]:
    """The spec's signature in the kernel's argument order, constexprs marked "constexpr"; an
    argument given neither a type nor a constexpr value is an error naming it."""
    names = list(spec.fn.arg_names)
    sig = {}
    for n in names:
        if n in spec.constexprs:
            sig[n] = "constexpr"
        elif n in spec.signature:
            sig[n] = spec.signature[n]
        else:
            raise ValueError(f"spec {spec.name}: argument {n!r} of {spec.fn.__name__} has no type "
                             "in `signature` and no value in `constexprs`")
    unknown = set(spec.signature) | set(spec.constexprs)
    unknown -= set(names)
    if unknown:
        raise ValueError(f"spec {spec.name}: {sorted(unknown)} are not arguments of "
                         f"{spec.fn.__name__} (its arguments: {names})")
    return sig


_TASKS: list[tuple[str, Any, int]] = []  # (module, spec, arch), inherited by forked workers


def _compile_task(i: int) -> dict[str, Any]:
    module, spec, cc = _TASKS[i]
    return {**compile_one(spec, cc), "module": module}


def compile_all(specs: list[tuple[str, Any]], archs: list[int], jobs: int) -> list[dict[str, Any]]:
    """Every spec x arch, in order. With jobs > 1 the compiles run in forked worker processes
    (specs hold jit functions, which do not pickle: workers inherit them by fork and get indices);
    serial when fork is unavailable."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    _TASKS[:] = [(m, s, cc) for m, s in specs for cc in archs
                 if cc in getattr(s, "archs", (90, 80))]
    if jobs > 1 and len(_TASKS) > 1 and "fork" in mp.get_all_start_methods():
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
            return list(pool.map(_compile_task, range(len(_TASKS))))
    return [_compile_task(i) for i in range(len(_TASKS))]


def problems(res: dict[str, Any]) -> list[str]:
    """Why a compiled spec is not shippable (empty = fine)."""
    if res.get("error"):
        return [f"compile error: {res['error']}"]
    out = []
    if res.get("stack", 0) > 0 or res.get("local", 0) > 0:
        out.append(f"stack {res.get('stack', 0)} B / local {res.get('local', 0)} B "
                   "(register spills or a local array)")
    if res["shared"] > res["shared_limit"]:
        out.append(f"shared memory {res['shared']} B > sm_{res['arch']} limit "
                   f"{res['shared_limit']} B")
    return out


def not_built(specs: list[tuple[str, Any]], archs: list[int]) -> dict[int, int]:
    """Per asked arch, how many specs its `archs` leave out (compile_all builds no row for
    them)."""
    return {cc: n for cc in archs
            if (n := sum(cc not in getattr(s, "archs", (90, 80)) for _, s in specs))}


def summary(specs: list[tuple[str, Any]], archs: list[int], rows: list[dict[str, Any]],
            n_import_errors: int) -> str:
    """The last line: every spec x arch pair is ok, has problems or is not built (the spec is
    limited to other archs), so the numbers add up."""
    n_bad = sum(bool(problems(r)) for r in rows)
    skipped = not_built(specs, archs)
    where = ", ".join(f"{n} for sm_{cc}" for cc, n in skipped.items())
    return (f"# {len(specs)} spec(s) x {len(archs)} arch(s) = {len(specs) * len(archs)}: "
            f"{len(rows) - n_bad} ok, {n_bad} with problems, {sum(skipped.values())} not built "
            f"for an arch their spec leaves out{' (' + where + ')' if where else ''}, "
            f"{n_import_errors} module(s) failed to import")


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'kernel spec':<58} {'arch':>5} {'warps':>5} {'stages':>6} {'regs':>5} "
            f"{'stack':>6} {'local':>6} {'shared KB':>9} {'limit KB':>8}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        p = problems(r)
        if r.get("error"):
            lines.append(f"{r['name']:<58} {r['arch']:>5} {r['num_warps']:>5} "
                         f"{r['num_stages']:>6}  {p[0]}")
            continue
        lines.append(
            f"{r['name']:<58} {r['arch']:>5} {r['num_warps']:>5} {r['num_stages']:>6} "
            f"{r['reg']:>5} {r['stack']:>6} {r['local']:>6} {r['shared'] / 1024:>9.1f} "
            f"{r['shared_limit'] / 1024:>8.0f}  {'ok' if not p else 'FAIL: ' + '; '.join(p)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench compile-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT),
                   help="compute capabilities to compile for (default: 90 80)")
    p.add_argument("--module", action="append", default=[],
                   help="extra module or .py file with specs, MOD[:FUNC] (default FUNC "
                        "compile_specs); repeatable")
    p.add_argument("--only", default=None, help="only specs whose name contains this text")
    p.add_argument("--no-kernels", action="store_true",
                   help="skip kernels/*.py (compile only the --module specs)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="parallel compiles (forked processes; default: CPU count, at most 8)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # interpreted kernels cannot be compiled: run again with the interpreter off
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "bench", "compile-report"] + raw
        return subprocess.run(cmd, env=env, cwd=REPO_ROOT).returncode

    sys.path.insert(0, str(REPO_ROOT))
    from bench._paths import ensure_importable

    ensure_importable()
    specs, errors = collect_specs(args.module, kernels=not args.no_kernels)
    if args.only:
        chosen = [(m, s) for m, s in specs if args.only in s.name]
        if not chosen and specs:  # else `0 spec(s) ... 0 ok` and exit 0 for a typo
            kernels = sorted({s.name.split("[")[0] for _, s in specs})
            print(f"error: --only {args.only!r} is in no spec name; the specs are of "
                  f"{', '.join(kernels)}", file=sys.stderr)
            return 2
        specs = chosen
    rows = compile_all(specs, args.arch, args.jobs)
    print(format_table(rows))
    for ref, err in errors:
        print(f"import error in {ref}: {err}")
    n_bad = sum(bool(problems(r)) for r in rows)
    print(summary(specs, args.arch, rows, len(errors)))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "import_errors": errors}, indent=1))
    return 1 if n_bad or errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
