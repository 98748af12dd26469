"""The GPU launch grids of the DINO / iBOT loss kernels at the issue's shapes (pure arithmetic of
the launch heuristics, no GPU and no interpreter): every streaming pass puts at least 2 programs
per SM on a 132-SM H100 / H200 and splits K at most MAX_SPLITS ways, so the few-row DINO CLS
passes still fill the GPU (the KoLeo lesson: a sub-wave grid is slow whatever the kernel)."""

from __future__ import annotations

import pytest
import torch
import triton
from fastdino.kernels import dino_loss as dl
from fastdino.kernels import sinkhorn as sk

from bench.bench_dino_loss import masked_counts
from bench.registry import get

SMS = 132


def _shapes():
    """(name, student rows R, teacher rows N, K, J) of every student and teacher pass."""
    out = []
    for model in ("vitl16", "vit7b16"):
        s = get(model)
        b = s.batch_per_gpu
        m = sum(masked_counts(s))
        out += [(f"{model}-dino-global", 2 * b, 2 * b, s.dino_K, 1),
                (f"{model}-dino-local", s.n_local * b, 2 * b, s.dino_K, 2),
                (f"{model}-ibot", m, m, s.ibot_K, 1)]
    return out


@pytest.fixture(autouse=True)
def gpu_heuristics(monkeypatch):
    """The launchers' GPU branch (is_interpreter() False), on meta tensors."""
    monkeypatch.setattr(dl, "is_interpreter", lambda: False)
    monkeypatch.setattr(sk, "is_interpreter", lambda: False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,r,n,k,j", _shapes())
def test_student_grid_fills_gpu(name, r, n, k, j, dtype):
    block_r, block_k, k_per_split, n_splits = dl._config(r, k, torch.empty(0, dtype=dtype), j)
    programs = n_splits * triton.cdiv(r, block_r)
    assert programs >= 2 * SMS, (name, programs)
    assert 1 <= n_splits <= dl.MAX_SPLITS
    assert k_per_split % block_k == 0 and (n_splits - 1) * k_per_split < k  # no empty split


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,r,n,k,j", _shapes())
def test_teacher_grids_fill_gpu(name, r, n, k, j, dtype):
    t = torch.empty(n, k, device="meta", dtype=dtype)
    block_n, block_k = sk._col_config(t)
    assert triton.cdiv(k, block_k) >= 2 * SMS, name  # column pass: one program per K block
    block_n, block_k, k_per_split, n_splits = sk._row_config(t)
    programs = n_splits * triton.cdiv(n, block_n)
    assert programs >= 2 * SMS, (name, programs)
    assert 1 <= n_splits <= sk.MAX_SPLITS
    assert (n_splits - 1) * k_per_split < k
