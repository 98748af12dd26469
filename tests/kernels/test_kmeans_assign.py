"""Parity of the k-means assignment kernel (kernels/kmeans_assign.py) with kmeans_assign_ref:
indices, squared distances and the gradient of the distances, fp32 (exact indices on data without
near-ties) and bf16 / fp16 (indices may differ only where the reference's two best distances are
within fp32 rounding), odd shapes, exact ties, several row blocks and centroid tiles. On CPU the
kernel runs under the Triton interpreter (tests/kernels/conftest.py)."""

import pytest
import torch
from fastdino.kernels._utils import can_run_triton
from fastdino.kernels.kmeans_assign import (
    _kmeans_assign_op,
    kmeans_assign,
    kmeans_assign_fwd,
    kmeans_assign_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not can_run_triton(torch.empty(0, device=DEVICE)),
                                reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1)")

# (N, k, D): single point / centroid, odd sizes, D = 384 (ViT-S embeddings), and sizes that take
# several row blocks and several centroid tiles at the interpreter's 64-wide tiles
SHAPES = [(1, 1, 1), (7, 3, 5), (130, 23, 37), (67, 129, 384), (200, 70, 16)]


def _inputs(N, k, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randn(k, D, generator=g)


def _clustered(N, k, D, seed=0):
    """Points scattered around random centroids: every point's nearest centroid is clear."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(k, D, generator=g)
    labels = torch.randint(0, k, (N,), generator=g)
    return c[labels] + 0.3 * torch.randn(N, D, generator=g), c


def _two_best(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 best and second-best squared distances per row (the tie margin of the data)."""
    d = torch.cdist(x.double(), c.double()) ** 2  # [N, k]
    if c.shape[0] == 1:
        return d[:, 0], torch.full_like(d[:, 0], float("inf"))
    top = d.topk(2, dim=1, largest=False).values
    return top[:, 0], top[:, 1]


@pytest.mark.parametrize("N,k,D", SHAPES)
def test_fp32_exact_indices(N, k, D):
    x, c = _clustered(N, k, D)
    best, second = _two_best(x, c)
    scale = x.square().sum(1).double() + c.square().sum(1).max().double()
    assert bool(((second - best) > 1e-4 * scale).all()), "test data has near-ties: pick a seed"
    idx, dist2 = kmeans_assign(x.to(DEVICE), c.to(DEVICE))
    ref_idx, ref_dist2 = kmeans_assign_ref(x, c)
    assert idx.dtype == torch.int64 and dist2.dtype == torch.float32
    torch.testing.assert_close(idx.cpu(), ref_idx, rtol=0, atol=0)
    torch.testing.assert_close(dist2.cpu(), ref_dist2, rtol=1e-5, atol=1e-5 * scale.max().item())
    # and against the fp64 truth of the math: the expansion ‖x‖² - 2x·c + ‖c‖² in fp32 cancels
    # terms of size ‖x‖² + ‖c‖², so its error scales with those, not with the distance (on an
    # H200 a D = 384 row was off by 2.1e-5 of its distance, 2e-7 of its scale)
    err = (dist2.cpu().double() - best).abs()
    assert bool((err <= 1e-5 * scale + 1e-5 * best).all()), (err / scale).max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,k,D", SHAPES)
def test_half_inputs_fp32_accumulation(N, k, D, dtype):
    x, c = _inputs(N, k, D, seed=1)
    xl, cl = x.to(dtype), c.to(dtype)
    truth_idx, truth_d = kmeans_assign_ref(xl.float(), cl.float())  # same inputs, fp32 math
    idx, dist2 = kmeans_assign(xl.to(DEVICE), cl.to(DEVICE))
    idx, dist2 = idx.cpu(), dist2.cpu()
    best, second = _two_best(xl.float(), cl.float())
    # fp32 rounding of ‖x‖² - 2x·c + ‖c‖² accumulated over D terms
    tol = 4 * D * torch.finfo(torch.float32).eps * (
        xl.float().square().sum(1).double() + cl.float().square().sum(1).max().double())
    differ = idx != truth_idx
    assert bool(((second - best)[differ] <= tol[differ]).all()), \
        "an index differs where the reference's two best distances are well apart"
    # the chosen centroid is (to rounding) as close as the best one
    chosen = ((xl.double() - cl.double()[idx]) ** 2).sum(1)
    assert bool(((chosen - best) <= tol).all())
    assert bool(((dist2.double() - best).abs() <= tol + 1e-6).all())
    # PyTorch at the same precision is no closer to the truth than the kernel (DESIGN.md rule)
    lp_idx, lp_d = kmeans_assign_ref(xl, cl)
    assert (dist2 - truth_d).abs().max() <= 2 * (lp_d - truth_d).abs().max() + 1e-5


def test_exact_ties_pick_the_first_centroid():
    # duplicated centroids in different tiles (64 wide under the interpreter, 128 on the GPU)
    x, c = _inputs(90, 140, 24, seed=2)
    for dst, src in ((70, 3), (135, 3), (100, 99), (139, 10)):
        c[dst] = c[src]
    x[:5] = c[3]  # points exactly on a duplicated centroid
    idx, _ = kmeans_assign(x.to(DEVICE), c.to(DEVICE))
    ref_idx, _ = kmeans_assign_ref(x, c)
    later = torch.tensor([70, 135, 100, 139])
    assert not bool(torch.isin(idx.cpu(), later).any()), "a later duplicate won a tie"
    assert bool((idx.cpu()[:5] == 3).all())
    torch.testing.assert_close(idx.cpu(), ref_idx, rtol=0, atol=0)


@pytest.mark.parametrize("N,k,D", [(130, 23, 37), (67, 129, 33)])
def test_gradient_of_dist2(N, k, D):
    x, c = _inputs(N, k, D, seed=3)
    w = torch.randn(N, generator=torch.Generator().manual_seed(9))
    xr, cr = x.clone().requires_grad_(), c.clone().requires_grad_()
    (kmeans_assign_ref(xr, cr)[1] * w).sum().backward()
    xk, ck = x.to(DEVICE).requires_grad_(), c.to(DEVICE).requires_grad_()
    (kmeans_assign(xk, ck)[1] * w.to(DEVICE)).sum().backward()
    torch.testing.assert_close(xk.grad.cpu(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ck.grad.cpu(), cr.grad, rtol=1e-4, atol=1e-4)


def test_reference_chunking_changes_nothing():
    x, c = _inputs(101, 13, 9, seed=4)
    a = kmeans_assign_ref(x, c)
    b = kmeans_assign_ref(x, c, block_elems=13 * 7)  # 7 rows per chunk, a ragged last one
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-6)  # BLAS blocking may differ


def test_empty_input_and_bad_inputs():
    c = torch.randn(3, 4, device=DEVICE)
    idx, d = kmeans_assign_fwd(torch.empty(0, 4, device=DEVICE), c)
    assert idx.shape == (0,) and d.shape == (0,)
    with pytest.raises(ValueError, match="same D"):
        kmeans_assign(torch.randn(5, 3, device=DEVICE), c)
    with pytest.raises(ValueError, match="share one dtype"):
        kmeans_assign(torch.randn(5, 4, device=DEVICE).half(), c)
    with pytest.raises(ValueError, match="at least one centroid"):
        kmeans_assign(torch.randn(5, 4, device=DEVICE), c[:0])


def test_custom_op_passes_opcheck():
    x, c = _inputs(20, 6, 8, seed=5)
    torch.library.opcheck(_kmeans_assign_op, (x.to(DEVICE), c.to(DEVICE)))


def test_traces_under_torch_compile():
    # aot_eager: traces through the fake implementation and the autograd.Function without
    # generating C++ (fast on CPU); fullgraph proves there is no graph break
    x, c = _inputs(20, 6, 8, seed=6)

    def f(x, c):
        idx, d = kmeans_assign(x, c)
        return d.sum(), idx

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xc, xe = x.to(DEVICE).requires_grad_(), x.to(DEVICE).requires_grad_()
    lc, ic = compiled(xc, c.to(DEVICE))
    le, ie = f(xe, c.to(DEVICE))
    lc.backward()
    le.backward()
    torch.testing.assert_close(ic, ie)
    torch.testing.assert_close(xc.grad, xe.grad)


def test_curation_kmeans_on_the_kernel_matches_the_reference_path():
    # the curation k-means with impl="triton" (the kernel; fp16 rows on CUDA) and impl="torch"
    import numpy as np

    from fastdino.curation.kmeans import kmeans
    from fastdino.curation.rows import Rows

    x, _ = _clustered(150, 5, 12, seed=7)
    x16 = x.half().numpy()
    ours = kmeans(Rows(x16, DEVICE), 5, np.random.default_rng(0), n_iters=10, impl="triton")
    ref = kmeans(Rows(x16, DEVICE), 5, np.random.default_rng(0), n_iters=10, impl="torch")
    np.testing.assert_array_equal(ours.assignment, ref.assignment)
    atol = 1e-2 if DEVICE == "cuda" else 1e-5  # CUDA: fp16 rows into the kernel, fp32 on CPU
    torch.testing.assert_close(ours.centroids, ref.centroids, rtol=1e-3, atol=atol)
