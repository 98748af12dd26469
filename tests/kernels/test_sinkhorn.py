"""Parity of the streaming Sinkhorn-Knopp and softmax-centering teacher kernels with their
references (kernels/sinkhorn.py), under the Triton interpreter on CPU (the compiled kernels on a
GPU). fp32: rtol 1e-5. bf16 logits: the DESIGN.md rule, max|kernel - ref_fp32| <=
2·max|torch_bf16 - ref_fp32| + atol, where torch_bf16 is the reference fed the same bf16 logits."""

from __future__ import annotations

import pytest
import torch
from fastdino.kernels import sinkhorn as sk

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# odd sizes, a single row, a K that is not a multiple of the block, and DINOv3's K = 65,536
# with few rows (the CLS case the K split exists for), kept small for the interpreter
SHAPES = [(1, 1000), (3, 1000), (37, 4096), (4, 65536)]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _assert_fp32(out: torch.Tensor, ref: torch.Tensor) -> None:
    # rtol 1e-5 on each entry, with an atol of 1e-5 of the largest entry (the probabilities of
    # near-empty prototypes are ~1e-30 and carry relative rounding of exp2 vs exp only)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-5,
                               atol=1e-5 * float(ref.abs().max()) + 1e-12)


def _assert_rule(out: torch.Tensor, ref32: torch.Tensor, torch_lowp: torch.Tensor,
                 atol: float) -> None:
    err, err_torch = _max_err(out, ref32), _max_err(torch_lowp, ref32)
    assert err <= 2 * err_torch + atol, f"kernel err {err:.3e} > 2 x torch err {err_torch:.3e}"


def _logits(n: int, k: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, k, generator=g)).to(DEV)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_parity(n, k, dtype):
    temp = 0.04
    t = _logits(n, k)
    ref32 = sk.sinkhorn_knopp_ref(t, temp)
    targets = sk.sinkhorn_knopp(t.to(dtype), temp)
    probs = targets.materialize()
    ent_ref = sk.TeacherTargets(probs=ref32).entropy()
    if dtype == torch.float32:
        _assert_fp32(probs, ref32)
        torch.testing.assert_close(targets.entropy(), ent_ref, rtol=1e-5, atol=1e-5)
    else:
        ref_lowp = sk.sinkhorn_knopp_ref(t.to(dtype), temp)
        _assert_rule(probs, ref32, ref_lowp, atol=1e-6)
        _assert_rule(targets.entropy(), ent_ref, sk.TeacherTargets(probs=ref_lowp).entropy(),
                     atol=1e-5)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(n, device=DEV), rtol=0, atol=1e-5)


def test_sinkhorn_launches_three_per_iteration(count_launches):
    """The DINO CLS teacher (few rows, one rank) is host-bound: Sinkhorn-Knopp is a column pass,
    a row pass and its merge per iteration, and no torch compute op between them (allocations
    and views only): the column passes update col_shift in place, log(K/N_total) is cached."""
    t = _logits(8, 1000)
    sk.sinkhorn_knopp(t, 0.07)  # first call: the cached log-scale tensor
    with count_launches() as count:
        targets = sk.sinkhorn_knopp(t, 0.07)
    assert count.launches == ["_teacher_col_kernel", "_teacher_row_kernel",
                              "_row_merge_kernel"] * 3
    assert set(count.ops) <= {"empty", "select", "slice", "view", "detach"}, count.ops
    _assert_fp32(targets.materialize(), sk.sinkhorn_knopp_ref(t, 0.07))


@pytest.mark.parametrize("iters,n_total", [(1, None), (5, 50.0)])
def test_sinkhorn_iterations_and_n_total(iters, n_total):
    t = _logits(37, 1000, seed=1)
    ref = sk.sinkhorn_knopp_ref(t, 0.07, n_iterations=iters, n_total=n_total)
    _assert_fp32(sk.sinkhorn_knopp(t, 0.07, iters, n_total).materialize(), ref)


def test_sinkhorn_huge_logits_stay_finite():
    temp = 0.04
    t = _logits(8, 1000, scale=6.0, seed=2)  # |t/τ| up to ~700: exp overflows without the shift
    assert float((t / temp).abs().max()) > 100
    targets = sk.sinkhorn_knopp(t, temp)
    probs = targets.materialize()
    assert torch.isfinite(probs).all() and torch.isfinite(targets.entropy())
    # exponents of magnitude ~700 amplify the fp32 rounding of t/τ to ~700·2^-24 ≈ 4e-5 relative
    # in both implementations, hence rtol 2e-4 here
    ref = sk.sinkhorn_knopp_ref(t, temp)
    torch.testing.assert_close(probs, ref, rtol=2e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("n,k", [(3, 1000), (37, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_center_parity(n, k, dtype):
    temp = 0.04
    t = _logits(n, k, seed=3)
    center = 0.3 * _logits(1, k, seed=4)
    ref32 = sk.softmax_center_ref(t, center, temp)
    targets, col_sum = sk.softmax_center(t.to(dtype), center, temp)
    # the fused batch statistic: the column sum of the logits as given (bf16 values, fp32 sum)
    torch.testing.assert_close(col_sum, sk.center_batch_sum_ref(t.to(dtype)), rtol=1e-5,
                               atol=1e-5)
    ent_ref = sk.TeacherTargets(probs=ref32).entropy()
    if dtype == torch.float32:
        _assert_fp32(targets.materialize(), ref32)
        torch.testing.assert_close(targets.entropy(), ent_ref, rtol=1e-5, atol=1e-5)
    else:
        ref_lowp = sk.softmax_center_ref(t.to(dtype), center, temp)
        _assert_rule(targets.materialize(), ref32, ref_lowp, atol=1e-6)
        _assert_rule(targets.entropy(), ent_ref, sk.TeacherTargets(probs=ref_lowp).entropy(),
                     atol=1e-5)


def test_teacher_ops_opcheck():
    """The torch.library registrations: fake impls agree with the real ones (torch.compile)."""
    t = _logits(5, 300, seed=5)
    cs, rs = torch.zeros(300, device=DEV), torch.zeros(5, device=DEV)
    log_scale = torch.zeros(1, device=DEV)
    for mode in (sk._MODE_LSE, sk._MODE_SUMEXP):
        torch.library.opcheck(torch.ops.fastdino.teacher_col_pass.default,
                              (t, cs, rs, log_scale, 1.0, mode, False))
    torch.library.opcheck(torch.ops.fastdino.teacher_col_pass.default,
                          (t, cs.clone(), rs, log_scale, 1.0, sk._MODE_SUMEXP, True))
    for colsum, ent in ((True, True), (False, False)):
        torch.library.opcheck(torch.ops.fastdino.teacher_row_pass.default,
                              (t, cs, 1.0, colsum, ent))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_multirank_host_path(monkeypatch, dtype):
    """The path taken with several ranks (column statistics returned raw, merged and all-reduced
    on the host, col_shift updated there) on one process: same targets as the in-kernel update."""
    t = _logits(37, 4096, seed=7).to(dtype)
    in_kernel = sk.sinkhorn_knopp(t, 0.04)
    monkeypatch.setattr(sk, "_update_in_kernel", lambda world: False)
    host = sk.sinkhorn_knopp(t, 0.04)
    _assert_fp32(host.materialize(), in_kernel.materialize())
    torch.testing.assert_close(host.row_entropy, in_kernel.row_entropy, rtol=1e-5, atol=1e-5)
    _assert_fp32(host.materialize(), sk.sinkhorn_knopp_ref(t.float(), 0.04)) \
        if dtype == torch.float32 else None


def test_sinkhorn_max_splits(monkeypatch):
    """Few rows and a large grid target: the row pass splits K MAX_SPLITS ways and the merge
    kernel reads a full [rows, MAX_SPLITS] tile."""
    monkeypatch.setattr(sk, "_INTERP_TARGET", 10**6)
    t = _logits(4, 131072, seed=8)  # 128 K blocks of 1024 (interpreter): 128 splits
    assert sk._row_config(t)[3] == sk.MAX_SPLITS
    targets = sk.sinkhorn_knopp(t, 0.04)
    ref = sk.sinkhorn_knopp_ref(t, 0.04)
    _assert_fp32(targets.materialize(), ref)
    torch.testing.assert_close(targets.entropy(), sk.TeacherTargets(probs=ref).entropy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 48), (1, 80), (2, 64), (64, 1)])
def test_softmax_center_rejects_a_center_of_another_shape(shape):
    """The kernel reads K entries of the center: a short one would be read out of bounds."""
    with pytest.raises(ValueError, match=r"center must be \[64\] or \[1, 64\]"):
        sk.softmax_center(_logits(3, 64, seed=12), torch.zeros(shape, device=DEV), 0.04)


def test_sinkhorn_no_rows():
    """A rank with no teacher rows (e.g. no masked patch) gets empty targets, not a crash."""
    targets = sk.sinkhorn_knopp(_logits(0, 300, seed=9), 0.04, n_total=4.0)
    assert targets.row_shift.shape == (0,) and targets.col_shift.shape == (300,)
    assert targets.materialize().shape == (0, 300)


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_teacher_targets_trace_under_torch_compile(centering):
    """Inside torch.compile the registered ops (fake impls, the in-place col_shift update) stand
    in for the launchers: same targets as eager (aot_eager: graph capture without a toolchain)."""
    t, center = _logits(6, 1000, seed=10), 0.3 * _logits(1, 1000, seed=11)

    def targets(t):
        if centering == "sinkhorn_knopp":
            f = sk.sinkhorn_knopp(t, 0.04)
        else:
            f = sk.softmax_center(t, center, 0.04)[0]
        return f.col_shift, f.row_shift, f.row_entropy

    compiled = torch.compile(targets, backend="aot_eager", fullgraph=True)
    for a, e in zip(compiled(t), targets(t), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Row-pass variants (kernels/sinkhorn.py ROW_VARIANTS; the GPU A/B of bench/bench_sk_pass.py picks
# the default). Each variant runs the whole Sinkhorn-Knopp (first pass: its fallback when it is a
# fixed-shift one; later passes: itself, with the previous row_shift as the bound) and softmax
# centering, against the references. K = 4096 is a multiple of every variant's tile (their FAST
# path); K = 1000 is not, and runs the masked baseline tile_8x256 whatever the variant; N = 37
# leaves a partial row block.
# ------------------------------------------------------------------------------------------------

VARIANTS = list(sk.ROW_VARIANTS)


def _check_sk(t32: torch.Tensor, dtype: torch.dtype, temp: float, variant: str) -> None:
    """The fp32 truth is the reference on the unrounded logits t32 (bf16: the DESIGN.md rule
    against the reference fed the same bf16 logits, as test_sinkhorn_parity)."""
    t = t32.to(dtype)
    ref32 = sk.sinkhorn_knopp_ref(t32, temp)
    targets = sk.sinkhorn_knopp(t, temp, row_variant=variant)
    probs = targets.materialize()
    ent_ref = sk.TeacherTargets(probs=ref32).entropy()
    if t.dtype == torch.float32:
        _assert_fp32(probs, ref32)
        torch.testing.assert_close(targets.entropy(), ent_ref, rtol=1e-5, atol=1e-5)
    else:
        ref_lowp = sk.sinkhorn_knopp_ref(t, temp)
        _assert_rule(probs, ref32, ref_lowp, atol=1e-6)
        _assert_rule(targets.entropy(), ent_ref, sk.TeacherTargets(probs=ref_lowp).entropy(),
                     atol=1e-5)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(t.shape[0], device=DEV), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,k,dtype", [(37, 4096, torch.float32), (37, 4096, torch.bfloat16),
                                       (5, 1000, torch.float32)])
def test_row_variant_sinkhorn_parity(variant, n, k, dtype):
    t32 = _logits(n, k, seed=20)
    plan = sk._row_plan(t32, variant, has_bound=True)
    # the variant itself runs (no silent fallback), unless K leaves a partial tile
    assert plan.variant.name == (variant if k == 4096 else "tile_8x256")
    assert plan.fast == plan.variant.fast
    _check_sk(t32, dtype, 0.04, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_row_variant_softmax_center_parity(variant):
    """Centering has no row bound: fixed-shift variants run their fallback (column sum fused)."""
    n, k, temp = 37, 4096, 0.04
    t32 = _logits(n, k, seed=21)
    t = t32.to(torch.bfloat16)
    center = 0.3 * _logits(1, k, seed=22)
    ref32 = sk.softmax_center_ref(t32, center, temp)
    targets, col_sum = sk.softmax_center(t, center, temp, row_variant=variant)
    torch.testing.assert_close(col_sum, sk.center_batch_sum_ref(t), rtol=1e-5, atol=1e-5)
    ref_lowp = sk.softmax_center_ref(t, center, temp)
    _assert_rule(targets.materialize(), ref32, ref_lowp, atol=1e-6)
    _assert_rule(targets.entropy(), sk.TeacherTargets(probs=ref32).entropy(),
                 sk.TeacherTargets(probs=ref_lowp).entropy(), atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_row_variant_huge_logits_stay_finite(variant):
    temp = 0.04
    t = _logits(8, 1024, scale=6.0, seed=23)  # |t/τ| up to ~700 (K = 1024: the FAST path)
    assert float((t / temp).abs().max()) > 100
    targets = sk.sinkhorn_knopp(t, temp, row_variant=variant)
    probs = targets.materialize()
    assert torch.isfinite(probs).all() and torch.isfinite(targets.entropy())
    ref = sk.sinkhorn_knopp_ref(t, temp)  # rtol 2e-4: see test_sinkhorn_huge_logits_stay_finite
    torch.testing.assert_close(probs, ref, rtol=2e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if sk.ROW_VARIANTS[v].state == "fixed"])
def test_fixed_shift_is_an_exact_bound(variant):
    """The fixed-shift variants' claim (sinkhorn_knopp's docstring): from the second row pass on,
    u = previous row_shift - log(K/N_total) bounds y = t·inv_temp - col_shift from above and
    Σ_k exp(y - u) >= 1/N_total. Checked on the column state of a real run (host path: the
    column passes return their statistics), with n_total != N (iBOT: the all-reduced count)."""
    n, k, temp, n_total = 37, 1000, 0.04, 50.0
    t = _logits(n, k, scale=3.0, seed=24)
    log_scale = torch.full((1,), float(torch.log(torch.tensor(k / n_total))), device=DEV)
    col_shift = torch.empty(k, device=DEV)
    sk.teacher_col_pass(t, col_shift, log_scale, log_scale, 1 / temp, sk._MODE_LSE, True)
    row_shift, _, _ = sk.teacher_row_pass(t, col_shift, 1 / temp, False, False, "tile_8x256")
    for _ in range(2):
        sk.teacher_col_pass(t, col_shift, row_shift, log_scale, 1 / temp, sk._MODE_SUMEXP, True)
        y = t.double() / temp - col_shift.double()
        u = (row_shift - log_scale).double()
        assert float((y.amax(dim=1) - u).max()) <= 1e-4
        assert float(torch.exp(y - u[:, None]).sum(dim=1).min()) >= 1 / n_total * (1 - 1e-4)
        fixed, _, _ = sk.teacher_row_pass(t, col_shift, 1 / temp, False, False, variant,
                                          row_shift, log_scale)
        ref = torch.logsumexp(y, dim=1).float()
        torch.testing.assert_close(fixed, ref, rtol=1e-6, atol=2e-5)
        row_shift = fixed


def test_fixed_shift_uses_the_bound():
    """The fixed-shift kernel really shifts by the bound: a bound 200 nats too high underflows
    every exp (row LSE -inf), where the running-max variants do not care."""
    t = _logits(8, 1024, seed=25)
    cs = torch.zeros(1024, device=DEV)
    too_high = torch.full((8,), 200.0, device=DEV)
    zero = torch.zeros(1, device=DEV)
    ok, _, _ = sk.teacher_row_pass(t, cs, 1.0, False, False, "tile_fast_16x256", too_high, zero)
    torch.testing.assert_close(ok, torch.logsumexp(t, dim=1), rtol=1e-6, atol=1e-5)
    for v in ("fixed_16x256", "lockstep_fixed_16x256"):
        bad, _, _ = sk.teacher_row_pass(t, cs, 1.0, False, False, v, too_high, zero)
        assert torch.isinf(bad).all() and (bad < 0).all(), v


def test_redo_recomputes_the_rows_a_loose_bound_loses():
    """loose_bound: a fixed-shift pass whose bound is 200 nats too high loses every term (as
    above); the redo launch recomputes exactly those rows, and leaves rows it resolved alone."""
    t = _logits(8, 1024, seed=25)
    cs = torch.zeros(1024, device=DEV)
    bound = torch.full((8,), 200.0, device=DEV)
    bound[:3] = t[:3].amax(dim=1)  # rows 0-2: a tight bound, resolved by the fixed pass
    zero = torch.zeros(1, device=DEV)
    out, _, _ = sk.teacher_row_pass(t, cs, 1.0, False, False, "fixed_32x256", bound, zero,
                                    loose_bound=True)
    torch.testing.assert_close(out, torch.logsumexp(t, dim=1), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="loose_bound"):
        sk.teacher_row_pass(t, cs, 1.0, False, True, "fixed_32x256", bound, zero,
                            loose_bound=True)


def _spy_loose(monkeypatch) -> list[bool]:
    """Record the loose_bound argument of every row pass sinkhorn_knopp makes."""
    seen, real = [], sk.teacher_row_pass

    def spy(*args, **kw):
        seen.append(args[8] if len(args) > 8 else kw.get("loose_bound", False))
        return real(*args, **kw)

    monkeypatch.setattr(sk, "teacher_row_pass", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_row_pass_with_the_loose_bound(monkeypatch, dtype):
    """The first SK row pass with the fixed shift -log(K/N_total), as teachers of
    LOOSE_BOUND_MIN_BYTES or more run it (forced here): parity with the reference."""
    monkeypatch.setattr(sk, "LOOSE_BOUND_MIN_BYTES", 0)
    seen = _spy_loose(monkeypatch)
    _check_sk(_logits(9, 1024, seed=26), dtype, 0.04, "fixed_32x256")
    assert seen == [True, False, False]  # the first of 3 row passes ran with the loose bound


def _sk_log64(t: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """SK in the log domain in fp64 (the factorised form of the module header; the reference
    works in fp32 and flushes a sample that every prototype prefers others to)."""
    x = t.double() / temp
    log_scale = torch.log(torch.tensor(x.shape[1] / x.shape[0], dtype=torch.float64))
    col = torch.logsumexp(x, dim=0) + log_scale
    row = torch.logsumexp(x - col, dim=1)
    for _ in range(iters - 1):
        col = col + torch.logsumexp(x - col - row[:, None], dim=0) + log_scale
        row = torch.logsumexp(x - col, dim=1)
    return torch.exp(x - col - row[:, None])


def test_loose_bound_redo_resolves_a_dominated_sample(monkeypatch):
    """Sample 4 is ~250 nats (t/τ) under every prototype's LSE: under the loose bound its first
    row sum underflows to 0 and the redo recomputes it; the result matches fp64 SK. With the
    redo disabled that row comes out wrong (non-finite or far off)."""
    monkeypatch.setattr(sk, "LOOSE_BOUND_MIN_BYTES", 0)
    temp = 0.04
    t = _logits(9, 1024, seed=26)
    t[4] -= 10.0
    truth = _sk_log64(t, temp).float()
    probs = sk.sinkhorn_knopp(t, temp, row_variant="fixed_32x256").materialize()
    torch.testing.assert_close(probs, truth, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(sk, "REDO_BELOW", float("-inf"))  # no row is ever redone
    probs = sk.sinkhorn_knopp(t, temp, row_variant="fixed_32x256").materialize()
    assert not torch.allclose(probs[4], truth[4], rtol=1e-2, atol=1e-4)


def test_row_variant_fallbacks(monkeypatch):
    """Fixed-shift variants fall back without a bound; lockstep ones when K needs more than
    MAX_SPLITS chunks; unknown names are refused with the allowed list."""
    t = _logits(4, 4096)
    assert sk._row_plan(t, "fixed_16x256").variant.name == "tile_fast_16x256"
    assert sk._row_plan(t, "lockstep_fixed_16x256").variant.name == "lockstep_tile_16x256"
    wide = torch.empty(4, 2 * 256 * (sk.MAX_SPLITS + 1), device="meta")
    assert sk._row_plan(wide, "lockstep_fixed_16x256", True).variant.name == "tile_fast_16x256"
    small = _logits(3, 64)  # K below every fast tile: the masked kernel
    assert sk._row_plan(small, "fixed_16x256", True).variant.name == "tile_8x256"
    odd = torch.empty(4, 4096 + 256, device="meta")  # a multiple of 256, not of 512 (lockstep)
    assert sk._row_plan(odd, "fixed_16x256", True).variant.name == "fixed_16x256"
    assert sk._row_plan(odd, "lockstep_fixed_16x256", True).variant.name == "tile_8x256"
    with pytest.raises(ValueError, match="unknown row-pass variant 'nope'.*tile_8x256"):
        sk.teacher_row_pass(t, torch.zeros(4096, device=DEV), 1.0, False, False, "nope")
    with pytest.raises(ValueError, match="row_bound and log_scale go together"):
        sk.teacher_row_pass(t, torch.zeros(4096, device=DEV), 1.0, False, False, None,
                            torch.zeros(4, device=DEV))


def test_lockstep_row_groups(monkeypatch):
    """Several row groups (grid axis 1) interleave row blocks g, g + n_groups, ...: every row is
    covered exactly once (a partial last block included)."""
    monkeypatch.setattr(sk, "_INTERP_TARGET", 64)
    t = _logits(53, 2048, seed=26).to(torch.bfloat16)
    plan = sk._row_plan(t, "lockstep_tile_16x256")
    assert plan.n_groups == 4 and plan.n_splits == 4, plan  # 4 row blocks of 16, 4 chunks
    y = t.float() * 25.0
    lse, ent, colsum = sk.teacher_row_pass(t, torch.zeros(2048, device=DEV), 25.0, True, True,
                                           "lockstep_tile_16x256")
    torch.testing.assert_close(lse, torch.logsumexp(y, dim=1), rtol=1e-6, atol=1e-5)
    p = torch.softmax(y, dim=1)
    torch.testing.assert_close(ent, -torch.special.xlogy(p, p).sum(dim=1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(colsum, t.float().sum(dim=0), rtol=1e-5, atol=1e-5)


def test_teacher_row_op_with_bound_opcheck():
    t = _logits(5, 512, seed=27)
    cs = torch.zeros(512, device=DEV)
    torch.library.opcheck(torch.ops.fastdino.teacher_row_pass.default,
                          (t, cs, 1.0, False, True, "fixed_16x256",
                           torch.full((5,), 10.0, device=DEV), torch.zeros(1, device=DEV)))


def test_occupancy_rule():
    """Blocks per SM from registers / shared memory (sm_90: 64K registers, 64 warps, 228 KB)."""
    assert sk._occupancy(30, 15 * 1024, 8) == 8  # warp-limited (the shipped 8x256 row pass)
    assert sk._occupancy(58, 27 * 1024, 8) == 4  # 64 registers x 256 threads = 16K
    assert sk._occupancy(107, 51 * 1024, 8) == 2  # 112 x 256 = 28K
    assert sk._occupancy(40, 100 * 1024, 8) == 2  # shared-memory-limited
    assert sk._occupancy(255, 0, 32) == 1  # never 0


def test_one_wave_grid_at_the_ibot_shape(monkeypatch):
    """The GPU grid sizing at 3,771 x 65,536 (132 SMs): one_wave variants launch at most
    occupancy x SMs programs (no partly filled last wave); the shipped rule >= 8 per SM."""
    monkeypatch.setattr(sk, "is_interpreter", lambda: False)
    monkeypatch.setattr(sk, "_OCCUPANCY", {})
    t = torch.empty(3771, 65536, device="meta", dtype=torch.bfloat16)

    def programs(name, occ=None):
        if occ is not None:
            sk._OCCUPANCY[sk._occupancy_key(sk.ROW_VARIANTS[name], t, (False, False))] = occ
        p = sk._row_plan(t, name, has_bound=True)
        assert p.variant.name == name
        return p.n_splits * p.n_groups

    assert programs("tile_8x256") == 472 * 3  # 1.34 waves of 8 per SM (as shipped)
    assert programs("fixed_16x256") == 236 * 3 <= 6 * 132  # the estimate, 6 per SM
    assert programs("fixed_16x256", occ=4) == 236 * 2 <= 4 * 132  # after a launch measured 4
    assert programs("fixed_16x256_many") == 236 * 5  # >= 8 per SM: 2.2 waves of 4
    assert programs("lockstep_fixed_16x256") == 128 * 4 <= 4 * 132
    # 3 per SM (the entropy pass): one wave of 236 would leave 40 % of the slots empty, 2 waves
    # of 472 too; 3 splits = 708 programs fill 1.79 waves (89 %)
    assert programs("fixed_16x256", occ=3) == 236 * 3
    assert sk._full_waves(236, 396, 128) == 3 and sk._full_waves(8, 528, 128) == 57  # 86 %
    # 7B DINO CLS teacher, 32 rows: 16-row tiles cannot make 2 programs per SM -> the 8-row kernel
    few = torch.empty(32, 262144, device="meta", dtype=torch.bfloat16)
    assert sk._row_plan(few, "fixed_16x256", has_bound=True).variant.name == "tile_8x256"
