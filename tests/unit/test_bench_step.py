"""`python -m bench step --impls`: kernels.impl values, each optionally +compile (model.compile)."""

import pytest

from bench import bench_step


@pytest.mark.parametrize("impl,expected", [("triton", ("triton", False)),
                                           ("torch+compile", ("torch", True)),
                                           ("triton+compile", ("triton", True))])
def test_impl_names(impl, expected):
    assert bench_step._parse_impl(impl) == expected


@pytest.mark.parametrize("impl", ["cuda", "triton+compil", "triton+", "+compile"])
def test_bad_impl_names_are_refused(impl):
    with pytest.raises(ValueError, match="allowed are triton, torch, each optionally"):
        bench_step._parse_impl(impl)


def test_compile_variant_reaches_the_config():
    on = bench_step._config("smoke", "torch+compile", on_gpu=False)
    off = bench_step._config("smoke", "torch", on_gpu=False)
    assert on.model.compile and not off.model.compile
    assert on.kernels.impl == off.kernels.impl == "torch"
