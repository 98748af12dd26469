"""CUDA only: the DINO / iBOT loss kernels, launched at a DINOv3 K (65,536, so K and the row
strides are divisible by 16 as in training), compile the way the performance model of
kernels/dino_loss.py and kernels/sinkhorn.py assumes: no register spills, and the `tl.range`
loop software-pipelined (shared memory holds STAGES-1 tiles of the streamed logits, i.e. the
loads are vectorised cp.async copies several tiles ahead). `bench compile-report` cannot see
this: it compiles without the runtime divisibility specialisation. No timing is asserted."""

from __future__ import annotations

import pytest
import torch
import triton
from fastdino.kernels import dino_loss as dl
from fastdino.kernels import sinkhorn as sk

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: checks the compiled kernels' spills and pipelining at a training shape "
           "(bench/device_check.sh runs it on the GPU machine)")

K = 65536


def _pipelined(kernel, tile_bytes: int, stages: int) -> None:
    assert kernel.n_spills == 0, f"{kernel.name}: {kernel.n_spills} spilled registers"
    assert kernel.metadata.shared >= (stages - 1) * tile_bytes, (
        f"{kernel.name}: {kernel.metadata.shared} B shared < {stages - 1} pipelined tiles of "
        f"{tile_bytes} B (loads not pipelined)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("j", [1, 2])
def test_soft_ce_kernels_pipelined(dtype, j):
    r, n = 512, 128
    s = torch.randn(r, K, device="cuda", dtype=dtype)
    t = torch.randn(n, K, device="cuda", dtype=dtype)
    cs, rs = torch.zeros(K, device="cuda"), torch.zeros(n, device="cuda")
    tidx = torch.randint(0, n, (r, j), device="cuda", dtype=torch.int32)
    block_r, block_k, k_per_split, n_splits = dl._config(r, K, s, j)
    grid = (n_splits, triton.cdiv(r, block_r))
    e = s.element_size()
    part = torch.empty(4, r, n_splits, device="cuda")
    fwd = dl._dino_soft_ce_fwd_kernel[grid](
        s, t, cs, rs, tidx, part, r, K, s.stride(0), t.stride(0), 10.0, 25.0, k_per_split,
        n_splits, J=j, BLOCK_R=block_r, BLOCK_K=block_k, STAGES=dl._STAGES,
        num_warps=dl._WARPS, num_stages=dl._STAGES)
    _pipelined(fwd, (1 + j) * block_r * block_k * e, dl._STAGES)
    stats = dl.dino_soft_ce_fwd(s, t, cs, rs, tidx, 10.0, 25.0)
    ds = torch.empty_like(s)
    g, w = torch.ones(r, device="cuda"), torch.ones(dl.MAX_SUMS, r, device="cuda")
    for block_g, grad in ((0, g), (dl.MAX_SUMS, g[:dl.MAX_SUMS])):  # per-row / weighted sums
        bwd = dl._dino_soft_ce_bwd_kernel[grid](
            s, t, cs, rs, tidx, stats, grad, w, ds, r, K, s.stride(0), t.stride(0),
            ds.stride(0), grad.stride(0), dl.MAX_SUMS, 1.0, 10.0, 25.0, k_per_split,
            BLOCK_G=block_g, J=j, BLOCK_R=block_r, BLOCK_K=block_k, STAGES=dl._STAGES,
            num_warps=dl._WARPS, num_stages=dl._STAGES)
        _pipelined(bwd, (1 + j) * block_r * block_k * e, dl._STAGES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [32, 1024])
def test_sinkhorn_kernels_pipelined(dtype, n):
    t = torch.randn(n, K, device="cuda", dtype=dtype)
    e = t.element_size()
    cs, rs = torch.zeros(K, device="cuda"), torch.zeros(n, device="cuda")
    log_scale = torch.zeros(1, device="cuda")
    block_n, block_k = sk._col_config(t)
    for mode in (sk._MODE_LSE, sk._MODE_SUMEXP):
        col = sk._teacher_col_kernel[(triton.cdiv(K, block_k),)](
            t, cs, rs, log_scale, cs, cs, n, K, t.stride(0), 25.0, MODE=mode, FINALIZE=True,
            BLOCK_N=block_n, BLOCK_K=block_k, STAGES=sk._STAGES, num_warps=sk._WARPS,
            num_stages=sk._STAGES)
        _pipelined(col, block_n * block_k * e, sk._STAGES)
    block_n, block_k, k_per_split, n_splits = sk._row_config(t)
    part = torch.empty(3, n, n_splits, device="cuda")
    for ent in (False, True):
        row = sk._teacher_row_kernel[(n_splits, triton.cdiv(n, block_n))](
            t, cs, part, cs, n, K, t.stride(0), 25.0, k_per_split, n_splits, WITH_COLSUM=False,
            ENTROPY=ent, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=sk._STAGES,
            num_warps=sk._WARPS, num_stages=sk._STAGES)
        _pipelined(row, block_n * block_k * e, sk._STAGES)
