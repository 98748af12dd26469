"""Every Triton kernel compiles for sm_90 and sm_80 at each shipped launch configuration, without a
GPU, with no register spills / stack use and shared memory within the target's limit (DESIGN.md
"Kernels"). Specs come from `compile_specs()` of each kernels/<op>.py; the compile itself runs in
one subprocess with TRITON_INTERPRET unset (bench/compile_report.py), since interpreted kernels
cannot be compiled, and its JSON is shared by all the parametrised tests below.

This module also holds two tiny kernels of its own: `_scale_kernel` (must pass: proves the
mechanism before any real kernel lands) and `_overflow_kernel` (a tf32 dot with 128x128x64 tiles
and 5 pipeline stages: 5 x 64 KB of shared memory, over both limits, and spilling) which the
checker must flag, so the test can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl
from fastdino.kernels._utils import CompileSpec

from bench.compile_report import collect_specs, problems

REPO = Path(__file__).resolve().parents[2]
ARCHS = (90, 80)


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * alpha, mask=mask)


@triton.jit
def _overflow_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr):
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


SCALE_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "alpha": "fp32"}


def compile_specs() -> list[CompileSpec]:
    return [CompileSpec("selftest_scale[BLOCK=1024,fp32]", _scale_kernel, SCALE_SIG,
                        {"BLOCK": 1024}, num_warps=4, num_stages=3),
            CompileSpec("selftest_scale[BLOCK=1024,fp32,div16]", _scale_kernel, SCALE_SIG,
                        {"BLOCK": 1024}, num_warps=4, num_stages=3,
                        divisible_by_16=("x_ptr", "y_ptr", "n"))]


def bad_compile_specs() -> list[CompileSpec]:
    return [CompileSpec("selftest_overflow[128x128x64,fp32,stages=5]", _overflow_kernel,
                        {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "K": "i32"},
                        {"BM": 128, "BN": 128, "BK": 64}, num_warps=4, num_stages=5)]


def _spec_arch_ids() -> list[tuple[str, int]]:
    """(spec, arch) for every arch whose launcher picks the spec (CompileSpec.archs)."""
    specs, errors = collect_specs()
    pairs = [(s.name, cc) for s in [s for _, s in specs] + compile_specs() for cc in ARCHS
             if cc in s.archs]
    return pairs + [(f"IMPORT-ERROR:{ref}", 90) for ref, _ in errors]


@pytest.fixture(scope="session")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    me = str(Path(__file__).resolve())
    cmd = [sys.executable, "-m", "bench", "compile-report", "--json", str(out),
           "--module", me, "--module", f"{me}:bad_compile_specs"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), f"compile-report wrote no JSON:\n{proc.stdout}\n{proc.stderr}"
    data = json.loads(out.read_text())
    data["by_key"] = {(r["name"], r["arch"]): r for r in data["rows"]}
    return data


@pytest.mark.parametrize(("spec_name", "arch"), _spec_arch_ids())
def test_kernel_compiles_clean(report, spec_name, arch):
    assert not spec_name.startswith("IMPORT-ERROR:"), \
        f"{spec_name}: {dict(report['import_errors']).get(spec_name.split(':', 1)[1])}"
    row = report["by_key"].get((spec_name, arch))
    assert row is not None, f"{spec_name} was not compiled for sm_{arch}"
    assert not problems(row), f"{spec_name} sm_{arch}: {'; '.join(problems(row))}"
    assert row["reg"] > 0  # cuobjdump really read the cubin


def test_checker_flags_spills_and_shared_overflow(report):
    for arch in ARCHS:
        row = report["by_key"][("selftest_overflow[128x128x64,fp32,stages=5]", arch)]
        found = " ".join(problems(row))
        assert "shared memory" in found and row["shared"] > row["shared_limit"], row
        assert "stack" in found, row


def test_problems_logic():
    ok = {"name": "k", "arch": 90, "shared": 100, "shared_limit": 227 * 1024, "stack": 0,
          "local": 0, "error": None}
    assert problems(ok) == []
    assert problems({**ok, "stack": 8})
    assert problems({**ok, "local": 4})
    assert problems({**ok, "shared": 227 * 1024 + 1})
    assert problems({**ok, "error": "CompilationError: x"})[0].startswith("compile error")


def test_divisibility_is_declared_as_the_jit_does(report):
    """`divisible_by_16` becomes ASTSource attrs {(arg index,): [["tt.divisibility", 16]]} (the
    form triton's JIT uses); the compiled row records it; a float, constexpr or unknown name is an
    error naming it."""
    from bench.compile_report import _full_signature, divisibility_attrs

    plain, div = compile_specs()
    assert divisibility_attrs(plain, _full_signature(plain)) is None
    attrs = divisibility_attrs(div, _full_signature(div))
    assert attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]],
                     (2,): [["tt.divisibility", 16]]}
    for arch in ARCHS:
        assert report["by_key"][(div.name, arch)]["div16"] == ["x_ptr", "y_ptr", "n"]
    for bad in ("alpha", "BLOCK", "nope"):
        spec = CompileSpec("s", _scale_kernel, SCALE_SIG, {"BLOCK": 8}, divisible_by_16=(bad,))
        with pytest.raises(ValueError, match=repr(bad)):
            divisibility_attrs(spec, _full_signature(spec))
