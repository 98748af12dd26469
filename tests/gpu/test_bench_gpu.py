"""The benchmark harness on CUDA: do_bench timing and peak memory, the measured roofline, parity of
the harness self-test kernel at a DINOv3 shape, the NVML sampler and fastdino.profile on a tiny
config. No timed assertions: only that numbers exist, are finite and are consistent."""

from __future__ import annotations

import math

import pytest
import torch

from bench.bench_selftest import cases as selftest_cases
from bench.harness import run_case
from bench.parity import check_case
from bench.roofline import derived_metric, measure

pytestmark = pytest.mark.gpu


def _case(dtype):
    return next(c for c in selftest_cases(quick=False, on_gpu=True) if c.dtype == dtype)


def test_do_bench_rows_and_peak_memory():
    case = _case(torch.bfloat16)
    rows = run_case(case, torch.device("cuda"), ("fwd", "fwd+bwd"), ["torch", "triton"], True)
    assert len(rows) == 4
    for r in rows:
        assert r.error is None, r.error
        t = r.timing
        assert t.timer in ("do_bench", "do_bench_cudagraph")
        assert 0 < t.p20 <= t.median <= t.p80 and math.isfinite(t.p80)
        assert r.peak_mem_mb is not None and r.peak_mem_mb >= 0


def test_measured_roofline_and_metric():
    roof = measure(quick=True)
    assert roof.copy_gbps > 0 and roof.gemm_tflops > 0
    m = derived_metric(_case(torch.float32), "fwd", 1.0, roof)
    assert m["name"] == "GB/s" and m["pct_roofline"] == pytest.approx(
        100 * m["value"] / roof.copy_gbps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selftest_parity_on_cuda(dtype):
    rows = check_case(_case(dtype), torch.device("cuda"))
    assert rows and all(r.passed for r in rows), rows


def test_nvml_sampler_collects():
    pytest.importorskip("pynvml", reason="nvidia-ml-py not installed on this GPU machine")
    import time

    from fastdino.profile import NvmlSampler

    s = NvmlSampler(torch.cuda.current_device(), interval=0.02)
    assert s.available, s.why
    s.start()
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        a = a @ a.T / 64
    torch.cuda.synchronize()
    time.sleep(0.1)
    s.stop()
    summary = s.summary()
    assert summary is not None and summary["n_samples"] >= 1
    assert summary["mem_used_mib"]["max"] > 0 and summary["sm_clock_mhz"]["max"] > 0


def test_profile_smoke_config_on_cuda(tmp_path):
    from fastdino.config import load_config
    from fastdino.profile import profile

    cfg = load_config("configs/smoke.yaml", [f"train.output_dir={tmp_path}", "train.resume=none"])
    r = profile(cfg, steps=2, warmup=1, fixed_batch=True)
    assert r["gpu"] != "cpu" and r["images_per_s_per_gpu"] > 0
    # the breakdown comes from separate steps synchronised at every phase boundary
    assert r["phase_steps"] >= 1 and r["phase_step_s"] > 0
    assert r["phase_step_s"] >= sum(v for k, v in r["phases_s"].items() if k != "other") - 1e-9
    assert r["phases_s"]["student_forward"] > 0 and r["phases_s"]["backward"] > 0
    assert r["peak_bf16_tflops"] is None or r["mfu"] > 0
