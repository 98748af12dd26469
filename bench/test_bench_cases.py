"""The harness's cases under pytest-benchmark, for regression tracking on CPU (references and
interpreter-sized Triton kernels) or on a GPU (the quick DINOv3 shapes). Same cases, inputs and
call closures as `python -m bench`; pytest-benchmark does the timing and the statistics (its
--benchmark-save / --benchmark-compare track changes). Quick cases only."""

from __future__ import annotations

import pytest
import torch

from bench._paths import ensure_importable

ensure_importable()

from bench.harness import (  # noqa: E402
    available_ops,
    fresh_inputs,
    grad_names,
    grad_output_like,
    load_cases,
    mode_fn,
)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _params():
    out = []
    for op in available_ops():
        try:
            cases = load_cases(op, quick=True, on_gpu=ON_GPU)
        except Exception as e:  # a module that does not import is a failing test, not a crash
            out.append(pytest.param(op, None, "torch", "fwd", e, id=f"{op}-IMPORT-ERROR"))
            continue
        for case in cases:
            for provider in [p for p in ("torch", "triton") if p in case.providers]:
                # only the modes the case runs (an op without a gradient has no fwd+bwd)
                for mode in [m for m in ("fwd", "fwd+bwd") if m in case.modes]:
                    out.append(pytest.param(op, case, provider, mode, None,
                                            id=f"{case.name}-{provider}-{mode}"))
    return out


@pytest.mark.parametrize("op,case,provider,mode,error", _params())
def test_case(benchmark, op, case, provider, mode, error):
    if error is not None:
        pytest.fail(f"bench/bench_{op}.py failed to load: {type(error).__name__}: {error}")
    base = case.make_inputs(DEVICE, case.dtype)
    fn = case.providers[provider]
    inputs = fresh_inputs(base)
    leaves = [inputs[k] for k in grad_names(case, inputs)]
    grad_out = grad_output_like(fn(**fresh_inputs(base))) if mode != "fwd" else None
    call = mode_fn(fn, inputs, mode, grad_out)

    def setup():
        for t in leaves:
            t.grad = None

    def run():
        call()
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.extra_info.update({"op": op, "case": case.name, "provider": provider, "mode": mode,
                                 "dtype": str(case.dtype), "params": case.params})
    # interpreted kernels take tens of ms per call: a fixed, small number of rounds
    rounds = 5 if (provider == "triton" and not ON_GPU) else 20
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1)
