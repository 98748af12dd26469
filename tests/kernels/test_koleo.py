"""Parity of the KoLeo Triton kernels (kernels/koleo.py) with koleo_loss_ref: forward loss,
neighbour indices, distances and the gradient, fp32 and bf16 (DESIGN.md parity rule), odd shapes,
batched groups, query windows (the distributed variant) and the multi-row-block path, on the
small path (split-K forward, what path="auto" runs for groups of <= SMALL_MAX_N rows) and the
fused path (one program per row block over all of D). On CPU the kernels run under the Triton
interpreter (tests/conftest.py); the interpreter's small-path tiles (16 rows, 32 columns, 16-wide
K steps, up to 4 K splits) make these shapes run several row blocks, column tiles, K splits and
chooser tiles."""

import pytest
import torch
from fastdino.kernels._utils import can_run_triton
from fastdino.kernels.koleo import (
    _COUNTERS,
    SMALL_MAX_N,
    _fwd_fused,
    _fwd_small,
    _koleo_bwd_op,
    _koleo_fwd_op,
    _pick,
    _small_fwd_config,
    koleo_fwd,
    koleo_loss,
    koleo_loss_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not can_run_triton(torch.empty(0, device=DEVICE)),
                                reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1)")

# (G, n, D, query_start, query_len): odd sizes, D = 384 (ViT-S), groups, a query window as
# KoLeoLossDistributed uses (a short one, and 50 rows at offset 20: several row blocks and
# chooser tiles), n = 200 (several row blocks: the counters + fixed-order sums), and
# DINOv3's per-rank groups with D reduced: 2 crops x 64 rows (ViT-L) and 2 x 16 (the 7B recipe)
SHAPES = [
    (1, 2, 7, 0, None),
    (1, 5, 384, 0, None),
    (2, 17, 7, 0, None),
    (3, 17, 384, 0, None),
    (1, 64, 384, 0, None),
    (2, 16, 33, 8, 5),
    (1, 100, 40, 20, 50),
    (1, 200, 16, 0, None),
    (2, 64, 96, 0, None),
    (2, 16, 256, 0, None),
]
PATHS = ["small", "fused"]


def _inputs(G, n, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G, n, D, generator=g).to(DEVICE, dtype)  # continuous data: no ties
    w = torch.randn(G, generator=g).to(DEVICE)  # upstream gradient per group
    return x, w


def _run(fn, x, w, q0, nq, dtype=None):
    """(loss [G], nn [G, nq], d [G, nq], dx) of `fn` on a copy of x (cast to `dtype`)."""
    xi = x.detach().to(dtype or x.dtype).requires_grad_(True)
    loss, nn_idx, d = fn(xi, query_start=q0, query_len=nq, return_details=True)
    (loss.float() * w).sum().backward()
    return loss.detach().double(), nn_idx, d.detach().double(), xi.grad.double()


def _path(path):
    return lambda x, **kw: koleo_loss(x, path=path, **kw)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("G,n,D,q0,nq", SHAPES)
def test_fp32_matches_fp64_reference(G, n, D, q0, nq, path):
    x, w = _inputs(G, n, D, torch.float32)
    loss, nn_idx, d, dx = _run(_path(path), x, w, q0, nq)
    loss_r, nn_r, d_r, dx_r = _run(koleo_loss_ref, x, w.double(), q0, nq, torch.float64)
    assert torch.equal(nn_idx.cpu(), nn_r.cpu())
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d, d_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_r, rtol=1e-5, atol=1e-5 * dx_r.abs().max().item())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("G,n,D,q0,nq", SHAPES)
def test_bf16_within_twice_the_torch_bf16_error(G, n, D, q0, nq, path):
    # DESIGN.md parity rule: max|kernel - ref_fp32| <= 2 max|torch_bf16 - ref_fp32| + atol, where
    # ref_fp32 is the reference on the same bf16 values upcast (here to fp64).
    x, w = _inputs(G, n, D, torch.bfloat16)
    loss, nn_idx, _, dx = _run(_path(path), x, w, q0, nq)
    loss_t, _, _, dx_t = _run(koleo_loss_ref, x, w, q0, nq)
    loss_r, nn_r, _, dx_r = _run(koleo_loss_ref, x, w.double(), q0, nq, torch.float64)
    # the kernel's dots accumulate exact bf16 products in fp32: it finds the true neighbours
    assert torch.equal(nn_idx.cpu(), nn_r.cpu())
    err, err_t = (loss - loss_r).abs().max(), (loss_t - loss_r).abs().max()
    assert err <= 2 * err_t + 1e-5, (err, err_t)
    gerr, gerr_t = (dx - dx_r).abs().max(), (dx_t - dx_r).abs().max()
    assert gerr <= 2 * gerr_t + 1e-5 * dx_r.abs().max(), (gerr, gerr_t)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_duplicate_rows_stay_finite(dtype, path):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 24, generator=g)
    x = torch.cat([base, base, torch.zeros(1, 24)]).to(DEVICE, dtype).requires_grad_(True)
    loss, nn_idx, d = koleo_loss(x, return_details=True, path=path)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # each copy's neighbour is its twin at d = ‖0 + eps·1‖ = eps·sqrt(D) (eps on the difference)
    assert nn_idx[:5].tolist() == list(range(5, 10))
    torch.testing.assert_close(d[:10].double().cpu(), torch.full((10,), 1e-8 * 24**0.5,
                               dtype=torch.float64), rtol=1e-3, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_deterministic_across_runs(path):
    x, w = _inputs(2, 80, 48, torch.float32, seed=2)  # several row blocks (and 3 K splits)
    a = _run(_path(path), x, w, 0, None)
    b = _run(_path(path), x, w, 0, None)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_auto_takes_the_small_path_for_small_groups():
    # the documented choice: groups of <= SMALL_MAX_N rows -> the small kernels both ways (on a
    # GPU too: the rule does not depend on the device); larger ones -> the model's fused / split
    # (the interpreter: fused)
    cpu = torch.device("cpu")
    for n in (2, 16, 64, SMALL_MAX_N):
        assert _pick("auto", 2, n, n, 1024, torch.bfloat16, cpu) == ("small", "small")
    assert _pick("auto", 1, 64, 4096, 1024, torch.bfloat16, cpu) == ("fused", "fused")
    assert _pick("small", 1, 4096, 4096, 64, torch.float32, cpu) == ("small", "small")
    assert _pick("split", 2, 16, 16, 64, torch.float32, cpu) == ("split", "sorted")


@pytest.mark.parametrize("splits", [1, 3, 6])
def test_small_path_k_splits_agree_with_the_fused_path(splits):
    # 1 split (no counter), 3 (one partial-load step), 6 (two steps, the second masked: the
    # interpreter loads 4 partials per step) over 3 row blocks and 2 column tiles: the same
    # neighbours and per-row scalars as the fused kernel (fp32 sums in another order)
    x, _ = _inputs(2, 40, 96, torch.float32, seed=7)
    assert _small_fwd_config(2, 40, 40, 96, torch.float32, splits)["KS"] == splits
    small = _fwd_small(x, 1e-8, 0, 40, splits=splits)
    fused = _fwd_fused(x, 1e-8, 0, 40)
    assert torch.equal(small[1], fused[1])
    for a, b in zip(small, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_small_splits_override_reaches_the_launch(monkeypatch):
    # koleo.SMALL_SPLITS (the bench's triton_ks1 A/B) sets the forward's K splits of every call:
    # one split gives the heuristic's neighbours and loss; unset, the heuristic splits again
    from fastdino.kernels import koleo

    x, _ = _inputs(2, 40, 96, torch.float32, seed=7)
    seen = []
    real = koleo._small_fwd_config
    monkeypatch.setattr(koleo, "_small_fwd_config",
                        lambda *a: seen.append(a[-1]) or real(*a))
    base = koleo_loss(x, path="small", return_details=True)
    monkeypatch.setattr(koleo, "SMALL_SPLITS", 1)
    one = koleo_loss(x, path="small", return_details=True)
    assert seen == [None, 1]
    assert torch.equal(base[1], one[1])
    torch.testing.assert_close(base[0], one[0], rtol=1e-6, atol=1e-7)


def test_small_path_ties_resolve_to_the_lowest_index():
    # ±1 entries in D = 48: every dot and norm is an integer (exact in fp32 in any order, in any
    # K split), so tied candidates tie bit for bit. Rows 0..31 repeat at 32..63 and 64..95: the two
    # other copies of a row lie in different 32-column tiles and tie at cosine 1; with 3 K splits
    # the tie survives the split sums; the first copy must win (torch.argmax's rule)
    g = torch.Generator().manual_seed(4)
    third = torch.randint(0, 2, (1, 32, 48), generator=g).float() * 2 - 1
    x = torch.cat([third, third, third], dim=1).to(DEVICE)
    _, nn_idx, d, *_ = _fwd_small(x, 1e-8, 0, 96, splits=3)
    first = torch.arange(32)
    assert torch.equal(nn_idx[0].cpu(), torch.cat([first + 32, first, first]))
    _, nn_ref, _ = koleo_loss_ref(x.double(), return_details=True)
    assert torch.equal(nn_idx.cpu(), nn_ref.cpu())
    torch.testing.assert_close(d.double().cpu(), torch.full((1, 96), 1e-8 * 48**0.5,
                               dtype=torch.float64), rtol=1e-3, atol=0)


def test_small_path_leaves_its_counters_zero():
    # the forward's counters are not reset by a memset per call: the programs that consume them
    # reset them. Several groups, row blocks and K splits, twice (the second call reuses them)
    x, _ = _inputs(3, 50, 64, torch.float32, seed=8)
    first = _fwd_small(x, 1e-8, 0, 50, splits=4)
    bufs = [b for b in _COUNTERS.values()]
    assert bufs and all(int(b.abs().sum()) == 0 for b in bufs)
    again = _fwd_small(x, 1e-8, 0, 50, splits=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(int(b.abs().sum()) == 0 for b in _COUNTERS.values())


@pytest.mark.parametrize("path", ["small", "fused"])
def test_fwd_bwd_launch_only_the_two_kernels(path, count_launches):
    """The per-rank KoLeo (2 crops x 64 rows) forward and backward are one kernel each and no
    torch kernel besides: in particular no zero-filled gradients of the non-differentiable
    outputs (nn_idx, d), two memsets per backward, i.e. two more nodes of a CUDA-graphed step."""
    x, _ = _inputs(2, 64, 32, torch.float32, seed=9)
    x.requires_grad_(True)
    koleo_loss(x, path=path)  # first call: the counters buffer
    with count_launches() as count:
        loss = koleo_loss(x, path=path)
        (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    name = "_koleo_small" if path == "small" else "_koleo"
    assert count.launches == [f"{name}_fwd_kernel", f"{name}_bwd_kernel"]
    fills = {"zeros", "zeros_like", "zero_", "fill_", "full", "full_like", "new_zeros"}
    assert not fills & set(count.ops), count.ops
    assert torch.isfinite(grad).all()


def test_two_dim_input_returns_a_scalar():
    x, _ = _inputs(1, 9, 12, torch.float32)
    loss = koleo_loss(x[0])
    assert loss.dim() == 0
    torch.testing.assert_close(loss, koleo_loss_ref(x[0]), rtol=1e-5, atol=1e-6)


def test_custom_ops_pass_opcheck():
    x, _ = _inputs(2, 6, 8, torch.float32)
    torch.library.opcheck(_koleo_fwd_op, (x, 1e-8, 0, 6, "auto"))
    loss, nn_idx, d, t, u, rinv = koleo_fwd(x, 1e-8, 0, 6)
    torch.library.opcheck(_koleo_bwd_op, (torch.ones(2, device=DEVICE), x, rinv, nn_idx, d, t, u,
                                          1e-8, 0, 6, "auto"))


def test_traces_under_torch_compile():
    # aot_eager: traces through the fake implementations and the autograd.Function without
    # generating C++ (fast on CPU); fullgraph proves there is no graph break
    x, w = _inputs(2, 6, 8, torch.float32)
    compiled = torch.compile(lambda t: koleo_loss(t), backend="aot_eager", fullgraph=True)
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (compiled(xc) * w).sum().backward()
    (koleo_loss(xe) * w).sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="at least 2 rows"):
        koleo_loss(torch.randn(1, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"fp32/bf16"):
        koleo_loss(torch.randn(4, 8, device=DEVICE, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"D >= 1"):  # not a ZeroDivisionError in the launcher
        koleo_loss(torch.randn(4, 0, device=DEVICE))
