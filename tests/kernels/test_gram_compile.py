"""The Gram kernels compiled the way real launches compile them (no GPU needed).

tests/kernels/test_compile.py compiles every shipped spec for sm_90 and sm_80 as written; this
file adds what a real launch adds and checks what the tile choice in kernels/gram.py promises:
- the runtime's divisibility specialisation: pointers 16-byte aligned and D % 16 == 0
  (`spec.divisible_by_16`, passed as ASTSource attrs exactly as triton's JIT does), so registers,
  spills and shared memory are those of the pipelined, vectorised code the GPU runs;
- each spec on the architectures whose launcher can pick it (`tiles=sm80` specs, the 4-warp set
  `auto_tiles` launches, on sm_90 and sm_80; the 8-warp sm_90 set (forced by tiles="sm90") on
  sm_90, and on sm_80 too where sm_80 has no tiles of its own);
- on sm_80, no two warps compute the same MMA fragments: for every dot of M×N rows×columns with
  warpsPerCTA [wm, wn] and mma.sync m16n8, wm·16 <= M and wn·8 <= N (the TTGIR's layouts).
bf16 and fp32 (fp16 ships bf16's tiles). The compile runs in one subprocess with TRITON_INTERPRET
unset (interpreted kernels cannot be compiled): this file run as a script.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
DTYPES = ("bf16", "fp32")


def _specs():
    from fastdino.kernels import gram

    return [s for s in gram.compile_specs() if any(f"[{ty}," in s.name or f"[{ty}]" in s.name
                                                   for ty in DTYPES)]


def _targets(spec, names: set[str]) -> list[int]:
    """The architectures whose launcher picks this spec's tiles."""
    if spec.name.endswith(",tiles=sm80]"):  # the 4-warp set: auto on every GPU
        return [90, 80]
    return [90] if spec.name[:-1] + ",tiles=sm80]" in names else [90, 80]  # 8 warps: forced


def _mma_dots(ttgir: str) -> list[dict]:
    """Every dot with an MMA accumulator: shape, warpsPerCTA, instrShape, MMA version."""
    def ints(body: str, key: str) -> list[int]:
        return [int(x) for x in re.search(key + r" = \[([^\]]*)\]", body)[1].split(",")]

    layouts = {}
    for name, body in re.findall(r"^(#\w+) = #ttg\.nvidia_mma<\{([^}]*)\}>", ttgir, re.M):
        layouts[name] = dict(version=int(re.search(r"versionMajor = (\d+)", body)[1]),
                             warps=ints(body, "warpsPerCTA"), instr=ints(body, "instrShape"))
    dots = []
    for line in ttgir.splitlines():
        if "tt.dot " in line or "warp_group_dot " in line:
            m = re.search(r"-> tensor<(\d+)x(\d+)xf32, (#\w+)>", line)
            if m and m[3] in layouts:
                dots.append(dict(shape=[int(m[1]), int(m[2])], **layouts[m[3]]))
    return dots


def _compile_all(out: Path) -> None:
    """Compile each spec for its target architectures with the runtime's attrs; write JSON."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(REPO))
    from bench.compile_report import SHARED_LIMIT, _full_signature, resource_usage

    specs = _specs()
    names = {s.name for s in specs}
    rows = []
    # (spec, arch, attrs): each spec with the runtime's hints, plus one without (the odd-D path)
    jobs = []
    for spec in specs:
        args = list(spec.fn.arg_names)
        attrs = {(args.index(n),): [["tt.divisibility", 16]] for n in spec.divisible_by_16}
        jobs += [(spec, cc, attrs, spec.name) for cc in _targets(spec, names)]
        if spec.name == "gram_pp_fwd[bf16,clamp=0]":
            jobs.append((spec, 90, {}, spec.name + "@unaligned"))
    for spec, cc, attrs, name in jobs:
        src = ASTSource(fn=spec.fn, signature=_full_signature(spec),
                        constexprs=dict(spec.constexprs), attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": spec.num_warps,
                                    "num_stages": spec.num_stages})
        rows.append(dict(name=name, arch=cc, **{**resource_usage(k.asm["cubin"]),
                                                "shared": int(k.metadata.shared)},
                         shared_limit=SHARED_LIMIT[cc],
                         dots=_mma_dots(k.asm["ttgir"]),
                         cp_async=k.asm["ptx"].count("cp.async.cg.shared.global")))
    out.write_text(json.dumps(rows, indent=1))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gram_compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), f"{proc.stdout}\n{proc.stderr}"
    return {(r["name"], r["arch"]): r for r in json.loads(out.read_text())}


def _cases() -> list[tuple[str, int]]:
    specs = _specs()
    names = {s.name for s in specs}
    return [(s.name, cc) for s in specs for cc in _targets(s, names)]


@pytest.mark.parametrize("name,arch", _cases(), ids=[f"{n}-sm{a}" for n, a in _cases()])
def test_real_path_compiles_without_spills(report, name, arch):
    r = report[(name, arch)]
    assert r["reg"] > 0  # cuobjdump really read the cubin
    assert r.get("stack", 0) == 0 and r.get("local", 0) == 0, f"{name} sm_{arch} spills: {r}"
    assert r["shared"] <= r["shared_limit"], r


def test_sm80_tiles_compute_each_mma_fragment_once(report):
    checked = 0
    for (name, arch), r in report.items():
        if arch != 80 or name.endswith("@unaligned"):
            continue
        for d in r["dots"]:
            assert d["version"] == 2, (name, d)  # mma.sync m16n8 on sm_80
            (m, n), (wm, wn) = d["shape"], d["warps"]
            assert wm * d["instr"][0] <= m and wn * d["instr"][1] <= n, \
                f"{name}: {wm}x{wn} warps on a {m}x{n} tile repeat fragments ({d})"
            checked += 1
    assert checked >= 20  # every bf16 P×P / D×D dot was seen (fp32 dots are FMA, no MMA)


def test_divisibility_hints_reach_the_compiler(report):
    # with aligned pointers and D % 16 == 0 the operand loads become 16-byte cp.async copies
    # (software pipelining); the odd-D path (no hints) has none
    assert report[("gram_pp_fwd[bf16,clamp=0]", 90)]["cp_async"] > 0
    assert report[("gram_pp_fwd[bf16,clamp=0,tiles=sm80]", 80)]["cp_async"] > 0
    assert report[("gram_pp_fwd[bf16,clamp=0]@unaligned", 90)]["cp_async"] == 0


if __name__ == "__main__":
    _compile_all(Path(sys.argv[1]))
