"""bench/bench_attention.py and bench/bench_student.py: the FLOP formulas against a hand count and
torch's FlopCounterMode, the DINOv3 shapes of the GPU cases (token counts with CLS + registers,
crop counts, batch), and the CPU quick cases: every provider passes the parity rule against
`torch` (forward and gradients), a wrong attention is caught, and every provider times without
error. Runs on CPU (the Triton RoPE under the interpreter, tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench import bench_attention as ba
from bench import bench_student as bs
from bench.harness import run_case
from bench.parity import check_case
from bench.registry import get
from fastdino.models.backbones import ARCH_TABLE

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# FLOP model


def test_attention_flops_hand_count():
    # 2 sequences of 201 tokens, 6 heads, d = 64. Per (sequence, head): q·kᵀ is 201·201·64
    # multiply-adds = 2,585,664 MACs = 5,171,328 FLOPs, P·v the same: 10,342,656 FLOPs.
    # x 12 (sequence, head) pairs = 124,111,872. Backward: x 2.5 = 310,279,680.
    fwd, bwd = ba.attention_flops([(2, 201)], 6, 64)
    assert fwd == 124_111_872
    assert bwd == 310_279_680
    # crop types add: 8 local sequences of 41 tokens, 6 heads:
    # 8·6·4·41²·64 = 192·1681·64 = 20,656,128
    fwd2, _ = ba.attention_flops([(2, 201), (8, 41)], 6, 64)
    assert fwd2 == 124_111_872 + 20_656_128


def test_attention_flops_match_flop_counter():
    # torch's own count of the two batched matmuls of the eager attention (independent of ours)
    q, k, v = (torch.randn(2, 6, 201, 64) for _ in range(3))
    with FlopCounterMode(display=False) as fc:
        ba.attention_math(q, k, v)
    assert fc.get_total_flops() == ba.attention_flops([(2, 201)], 6, 64)[0]


def test_fa3_anchor_and_target():
    ref = ba.fa3_reference(64)
    assert ref["fa3_ref_tflops"] == 197.0 and ref["fa3_ref_head_dim"] == 64
    assert ref["target_tflops"] == pytest.approx(0.6 * 197.0, abs=0.05)
    assert ba.fa3_reference(128)["fa3_ref_tflops"] == 430.0
    assert "KERNELS.md" in ref["fa3_ref_source"]


def test_block_flops_match_flop_counter():
    # the block case's model count (fastdino.profile.vit_block_flops per crop type) equals what
    # torch counts in the `torch` provider's forward (attn_impl=torch: explicit matmuls)
    case = _cpu_case(ba, "block")
    inputs = case.make_inputs(CPU, case.dtype)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        case.providers["torch"](**inputs)
    assert fc.get_total_flops() == case.flops_fwd
    assert case.flops_bwd == 2 * case.flops_fwd


def test_student_flops_match_flop_counter():
    case = _cpu_case(bs, "student")
    inputs = case.make_inputs(CPU, case.dtype)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        case.providers["torch"](**inputs)
    assert fc.get_total_flops() == case.flops_fwd


# ------------------------------------------------------------------------------------------------
# Shapes of the GPU cases (built without a GPU: nothing is allocated until make_inputs)


def test_gpu_attention_case_shapes():
    by_name = {c.name: c for c in ba.cases(quick=False, on_gpu=True)}
    for m in ("vits16", "vitb16", "vitl16"):
        s = get(m)
        B = s.batch_per_gpu
        assert B == 64
        # 1 CLS + 4 registers + (224/16)² = 201; + (96/16)² = 41
        glob, loc = [2 * B, 1 + 4 + 196], [8 * B, 1 + 4 + 36]
        assert by_name[f"{m}-op-global"].params["crops"] == [glob]
        assert by_name[f"{m}-op-local"].params["crops"] == [loc]
        multi = by_name[f"{m}-op-multicrop"]
        assert multi.params["crops"] == [glob, loc]
        assert multi.params["tokens"] == 2 * B * 201 + 8 * B * 41
        assert multi.params["head_dim"] == 64 and multi.params["num_heads"] == s.num_heads
        assert by_name[f"{m}-block"].params["crops"] == [glob, loc]
    seven = by_name["vit7b16-op-global"].params
    assert seven["crops"] == [[32, 1 + 4 + 256]] and seven["head_dim"] == 128
    for c in by_name.values():
        assert c.dtype == torch.bfloat16 and {"torch", "triton", "sdpa"} <= set(c.providers)


def test_gpu_quick_order_most_important_first():
    names = [c.name for c in ba.cases(quick=True, on_gpu=True)]
    assert names[:3] == ["vitl16-op-global", "vitl16-op-multicrop", "vitl16-block"]
    assert names[3] == "vitb16-op-global"
    student = bs.cases(quick=True, on_gpu=True)
    assert student[0].name == "vits16-student"
    assert {"sdpa", "triton", "torch"} <= set(student[0].providers)  # the target's two sides


def test_gpu_student_case_shapes():
    for case in bs.cases(quick=False, on_gpu=True):
        s = get(case.name.split("-")[0])
        D, depth, heads = ARCH_TABLE[case.params["arch"]][:3]
        assert (D, depth, heads) == (s.embed_dim, s.depth, s.num_heads)  # registry == arch
        B = case.params["images"]
        assert B == s.batch_per_gpu
        assert case.params["crops"] == [[2 * B, 201], [8 * B, 41]]
        assert case.flops_fwd == bs.student_flops(case.params["arch"], B, 224, 96, 8)
        assert case.flops_bwd == 2 * case.flops_fwd


# ------------------------------------------------------------------------------------------------
# The CPU quick cases: parity of every provider, a wrong attention caught, timing runs


def _cpu_case(module, kind: str):
    cases = module.cases(quick=True, on_gpu=False)
    return next(c for c in cases if kind in c.name or kind == c.op)


@pytest.mark.parametrize("module,kind", [(ba, "multicrop"), (ba, "block"), (bs, "student")])
def test_cpu_quick_every_provider_passes_parity(module, kind):
    case = _cpu_case(module, kind)
    providers = case.extra["check_providers"]
    assert "triton" in providers and "sdpa" in providers
    # torch_compile (per-block compile of the sdpa path) is left out: Inductor's CPU compile
    # takes ~10 s here, and it compiles the `sdpa` provider checked just above
    for p in (p for p in providers if p != "torch_compile"):
        rows = check_case(case, CPU, provider=p)
        assert rows and all(r.passed for r in rows), (p, [(r.quantity, r.err_kernel, r.bound)
                                                          for r in rows])
        assert {r.quantity for r in rows} >= {"forward", *(f"grad:{n}" for n in case.grad_inputs)}


def _wrong_sdpa(q, k, v, *args, **kwargs):
    return F.softmax(q @ k.transpose(-2, -1), dim=-1) @ v  # no 1/sqrt(d) scale


@pytest.mark.parametrize("module,kind", [(ba, "multicrop"), (ba, "block"), (bs, "student")])
def test_cpu_parity_catches_a_wrong_attention(module, kind, monkeypatch):
    # the truth never calls SDPA (math attention / attn_impl=torch), so a broken SDPA shows in the
    # `sdpa` provider: the cases' shapes and LayerScale = 1 make the attention visible
    case = _cpu_case(module, kind)
    monkeypatch.setattr(F, "scaled_dot_product_attention", _wrong_sdpa)
    if module is ba and kind == "multicrop":
        case.providers["sdpa"] = ba.per_crop_provider(_wrong_sdpa, case.params["num_heads"],
                                                      [tuple(c) for c in case.params["crops"]])
    rows = check_case(case, CPU, provider="sdpa")
    assert not all(r.passed for r in rows)


@pytest.fixture
def one_thread():
    # as `python -m bench` on CPU: on a shared machine an OpenMP barrier waiting for a descheduled
    # worker turns each ms-sized call into a 10-25 ms outlier
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cpu_quick_cases_time_every_provider(one_thread):
    for module in (ba, bs):
        for case in module.cases(quick=True, on_gpu=False):
            names = [p for p in case.providers if p != "torch_compile"]  # compile: too slow here
            rows = run_case(case, CPU, modes=("fwd+bwd",), providers=names, quick=True)
            assert [r.provider for r in rows] == names
            assert all(r.error is None and r.timing.median > 0 for r in rows), \
                [(r.provider, r.error) for r in rows]


def test_cpu_triton_provider_runs_the_triton_rope(monkeypatch):
    # "triton" in the block / student cases means kernels_impl=triton: the fused RoPE must run
    import fastdino.kernels.rope as rope_mod

    calls = []
    real = rope_mod.rope_qkv

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(rope_mod, "rope_qkv", counting)
    case = _cpu_case(ba, "block")
    inputs = case.make_inputs(CPU, case.dtype)
    case.providers["sdpa"](**inputs)
    assert not calls
    case.providers["triton"](**inputs)
    assert len(calls) == 2  # one per crop type


# ------------------------------------------------------------------------------------------------
# The summary readers of a device run


def _rec(op, case, provider, mode, ms, tflops, params):
    return {"kind": "bench", "op": op, "case": case, "provider": provider, "mode": mode,
            "ms": {"median": ms}, "metric": {"value": tflops}, "params": params}


def test_summaries():
    p = {"kind": "op", **ba.fa3_reference(64)}
    txt = ba.summarize([_rec("attention", "vitl16-op-global", "flash_attn", "fwd", 0.1, 137.9, p),
                        _rec("attention", "vitl16-op-global", "sdpa", "fwd", 0.2, 59.1, p),
                        _rec("attention", "vitl16-op-global", "sdpa", "bwd", 0.2, 59.1, p)])
    lines = txt.splitlines()
    assert "70.0" in lines[1] and "MET" in lines[1]  # 137.9 / 197 = 70 %
    assert "30.0" in lines[2] and "below" in lines[2]
    assert "30.0" in lines[3] and "below" not in lines[3]  # the anchor is a forward number
    sp = {"images": 64}
    txt = bs.summarize([_rec("student", "vits16-student", "sdpa", "fwd+bwd", 130.0, 1, sp),
                        _rec("student", "vits16-student", "triton", "fwd+bwd", 100.0, 1, sp)])
    last = txt.splitlines()[-1]
    assert "1.30" in last and "target MET" in last and "640.0" in last  # 64 / 0.1 s
