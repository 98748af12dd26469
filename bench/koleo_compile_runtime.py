"""Compile the KoLeo kernels as the Triton JIT specializes them at run time, without a GPU.

`python -m bench.koleo_compile_runtime [--arch 90 80]` (TRITON_INTERPRET unset)

Why: `bench compile-report` compiles each CompileSpec with no argument attributes, but at run time
the JIT marks every pointer that is 16-byte aligned and every int divisible by 16 with
`tt.divisibility = 16`. Without those marks a masked 2-D load cannot be vectorised, so the
ahead-of-time kernel has no cp.async pipeline and holds one 64-bit pointer per element: its
registers and shared memory are not the ones that run (found on koleo's search, issue 6). This
script adds the marks a DINOv3-shaped call gets (n, nq, D, strides, cols_per_split all multiples
of 16; the split count S and eps unmarked) and reports registers, stack (spills) and shared memory
per spec and arch, for the configurations that run on aligned inputs (`aligned=False` specs are
skipped: their D is not a multiple of 16 at run time). Exit code 1 on a spill or an error.
"""

from __future__ import annotations

import argparse
import os
import sys

UNMARKED = {"S", "eps"}  # never divisible by 16 at the benchmark shapes (S = 4 splits) / floats


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser()
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    args = p.parse_args()
    import triton
    from fastdino.kernels import koleo
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bench.compile_report import _full_signature, resource_usage

    bad = 0
    for spec in koleo.compile_specs():
        if "aligned=False" in spec.name:
            continue
        sig = _full_signature(spec)
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(spec.fn.arg_names)
                 if sig[name] != "constexpr" and not sig[name].startswith("fp")
                 and name not in UNMARKED}
        for cc in args.arch:
            try:
                k = triton.compile(
                    ASTSource(fn=spec.fn, signature=sig, constexprs=dict(spec.constexprs),
                              attrs=attrs),
                    target=GPUTarget("cuda", cc, 32),
                    options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
                use = resource_usage(k.asm["cubin"])
                spill = use.get("stack", 0) or use.get("local", 0)
                bad += bool(spill)
                print(f"{spec.name:48s} sm_{cc} reg {use['reg']:3d} stack {use.get('stack', 0):4d}"
                      f" shared {k.metadata.shared / 1024:5.1f} KB{'  SPILL' if spill else ''}")
            except Exception as e:  # reported, counted, the sweep goes on
                bad += 1
                print(f"{spec.name:48s} sm_{cc} ERROR {type(e).__name__}: {str(e)[:200]}")
    print(f"# {bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
