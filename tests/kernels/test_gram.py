"""Parity of the Triton Gram loss (kernels/gram.py) against the fp64 reference, forward and
student gradient, under the DESIGN.md rule: max|kernel - ref64| <= 2·max|torch_lowp - ref64| + atol,
where torch_lowp is `gram_loss_ref` computed in the input precision. Correlated inputs
(t = s + small noise) are where cancellation bites; independent ones are the easy case."""

import pytest
import torch
from fastdino.kernels import gram
from fastdino.kernels.gram import gram_loss, gram_loss_ref

from fastdino.losses.gram_loss import GramLoss

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (form, clamp kwargs): the tiled P×P form with each clamp option, and the D×D form (no clamp)
VARIANTS = {
    "pp": ("pp", {}),
    "pp-remove_neg": ("pp", {"remove_neg": True}),
    "pp-remove_only_teacher_neg": ("pp", {"remove_only_teacher_neg": True}),
    "dd": ("dd", {}),
}
# odd sizes and a real one (196 = ViT/16 at 224 px); D = 7 leaves most of a tile masked
SHAPES = [(1, 5, 7), (3, 5, 64), (3, 37, 7), (1, 37, 64), (1, 196, 64)]


def make_inputs(shape, dtype, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g)
    t = s + noise * torch.randn(*shape, generator=g) if noise else torch.randn(*shape, generator=g)
    return s.to(DEV, dtype), t.to(DEV, dtype)  # built on the CPU (same numbers on every device)


def loss_and_grad(fn, s, t, **kw):
    s = s.detach().clone().requires_grad_()
    loss = fn(s, t, **kw)
    loss.backward()
    return loss.detach().double(), s.grad.double()


def check_parity(s, t, img_level, variant, atol_rel, **kernel_kw):
    form, clamp = VARIANTS[variant]
    ref_l, ref_g = loss_and_grad(gram_loss_ref, s.double(), t.double(), img_level=img_level,
                                 **clamp)
    low_l, low_g = loss_and_grad(gram_loss_ref, s, t, img_level=img_level,
                                 compute_dtype=s.dtype, **clamp)
    k_l, k_g = loss_and_grad(gram_loss, s, t, img_level=img_level, form=form, **clamp,
                             **kernel_kw)
    assert k_l.dtype == ref_l.dtype and torch.isfinite(k_g).all()
    err_l, base_l = (k_l - ref_l).abs().item(), (low_l - ref_l).abs().item()
    assert err_l <= 2 * base_l + atol_rel * ref_l.abs().item() + 1e-12, (err_l, base_l,
                                                                         ref_l.item())
    err_g, base_g = (k_g - ref_g).abs().max().item(), (low_g - ref_g).abs().max().item()
    assert err_g <= 2 * base_g + atol_rel * ref_g.abs().max().item(), (err_g, base_g)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("img_level", [True, False], ids=["per_image", "flattened"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_fp32_correlated(shape, img_level, variant):
    s, t = make_inputs(shape, torch.float32, noise=1e-2)
    check_parity(s, t, img_level, variant, atol_rel=1e-5)


# every variant × mode at one odd shape, correlated (1e-3: heavy cancellation) and independent, and
# the cancellation-heavy case at P = 196 (noise 1e-2 in bf16: test_parity_at_gpu_tile_configs)
BF16_CASES = [((3, 37, 64), lvl, noise) for lvl in (True, False)
              for noise in (1e-3, None)] + [((1, 196, 64), True, 1e-3)]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape,img_level,noise", BF16_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{'img' if c[1] else 'flat'}-{c[2]}"
                              for c in BF16_CASES])
def test_parity_bf16(shape, img_level, noise, variant):
    s, t = make_inputs(shape, torch.bfloat16, noise=noise, seed=1)
    check_parity(s, t, img_level, variant, atol_rel=1e-6)


@pytest.mark.parametrize("variant", ["pp", "dd"])
def test_parity_fp32_independent_and_zero_row(variant):
    # a zero student row takes F.normalize's eps branch (gradient g / eps)
    s, t = make_inputs((2, 37, 7), torch.float32, noise=None, seed=2)
    s[1, 3] = 0.0
    check_parity(s, t, True, variant, atol_rel=1e-5)


@pytest.fixture(params=[90, 80], ids=["sm90_tiles", "sm80_tiles"])
def gpu_tiles(request, monkeypatch):
    """Run the launchers' shipped GPU tile configurations (gram._pp_gpu, _dd_fwd_gpu, _dd_bwd_gpu)
    of sm_90 or sm_80, whatever the device: under the interpreter (its own configurations take D
    in one step and rows in one or a few blocks; the GPU ones take D = 80 in steps of 16 or 32,
    the last one ragged, and dÂ's D loop (BLOCK_N) differs from S's (BLOCK_D)), and on a GPU, so
    that one card checks both tile sets."""
    arch = request.param
    monkeypatch.setattr(gram, "_pp_config", lambda pe, d, work, clamp, bwd=False, **_:
                        gram._pp_gpu(work, clamp, bwd, arch))
    monkeypatch.setattr(gram, "_dd_config", lambda pe, d, work, bwd=False, **_: (
        gram._dd_bwd_gpu(work, arch) if bwd else gram._dd_fwd_gpu(work, arch)))
    return arch


# 2 images of 75 rows (per image: a full 64-row block and an 11-row one; flattened: 3 blocks)
GPU_TILE_SHAPE = (2, 75, 80)


def _blocks(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k.startswith("BLOCK")}


def _sm80_blocks_differ(variant: str) -> bool:
    form, clamp = VARIANTS[variant]
    c = gram.CLAMP_NEG if clamp.get("remove_neg") else (
        gram.CLAMP_TEACHER_NEG if clamp else gram.CLAMP_NONE)
    pick = ((lambda a, bwd: gram._pp_gpu(torch.bfloat16, c, bwd, a)) if form == "pp" else
            (lambda a, bwd: (gram._dd_bwd_gpu if bwd else gram._dd_fwd_gpu)(torch.bfloat16, a)))
    return any(_blocks(pick(80, bwd)) != _blocks(pick(90, bwd)) for bwd in (False, True))


# fp32 (FMA dots) ships the same tiles on both architectures: sm_80's only for bf16. Under the
# interpreter warps do not exist, so sm_80 tiles run only where their block sizes differ.
TILE_CASES = [(90, dt, v) for dt in (torch.float32, torch.bfloat16) for v in VARIANTS]
TILE_CASES += [(80, torch.bfloat16, v) for v in VARIANTS
               if torch.cuda.is_available() or _sm80_blocks_differ(v)]


@pytest.mark.parametrize("gpu_tiles,dtype,variant", TILE_CASES, indirect=["gpu_tiles"],
                         ids=[f"sm{a}_tiles-{str(d)[6:]}-{v}" for a, d, v in TILE_CASES])
def test_parity_at_gpu_tile_configs(gpu_tiles, dtype, variant):
    s, t = make_inputs(GPU_TILE_SHAPE, dtype, noise=1e-2, seed=5)
    for img_level in (True, False):
        check_parity(s, t, img_level, variant, atol_rel=1e-5 if dtype == torch.float32 else 1e-6)


PP_VARIANTS = [v for v in VARIANTS if VARIANTS[v][0] == "pp"]


@pytest.mark.parametrize("gpu_tiles", [90, 80], indirect=True, ids=["sm90_tiles", "sm80_tiles"])
@pytest.mark.parametrize("pp_backward", ["stored", "recompute"])
@pytest.mark.parametrize("variant", PP_VARIANTS)
def test_pp_backward_paths(gpu_tiles, pp_backward, variant):
    # the P×P backward from the W the forward stored (its off-diagonal tiles written twice, once
    # transposed; 2 row blocks of 64 at P = 75) and from recomputed S, at the shipped GPU tiles;
    # per image (W [2, 75, 75]) and flattened (W [1, 150, 150], 3 row blocks)
    s, t = make_inputs(GPU_TILE_SHAPE, torch.bfloat16, noise=1e-2, seed=8)
    for img_level in (True, False):
        check_parity(s, t, img_level, variant, atol_rel=1e-6, pp_backward=pp_backward)


@pytest.mark.parametrize("variant", PP_VARIANTS)
def test_stored_w_is_the_recomputed_one(variant):
    # fp32 (exact products): the two backwards agree to rounding, and W really is stored by the
    # forward (the op's saved output), symmetric
    s, t = make_inputs((2, 37, 48), torch.float32, noise=1e-2, seed=9)
    _, g_stored = loss_and_grad(gram_loss, s, t, pp_backward="stored", **VARIANTS[variant][1])
    _, g_recomp = loss_and_grad(gram_loss, s, t, pp_backward="recompute",
                                **VARIANTS[variant][1])
    torch.testing.assert_close(g_stored, g_recomp, rtol=1e-5, atol=1e-9)
    clamp = {"pp": 0, "pp-remove_neg": gram.CLAMP_NEG,
             "pp-remove_only_teacher_neg": gram.CLAMP_TEACHER_NEG}[variant]
    *_, w = torch.ops.fastdino.gram_fwd(s, t, True, clamp, gram.FORM_PP, 0, True)
    assert w.shape == (2, 37, 37) and w.abs().max() > 0
    # symmetric up to rounding (within a diagonal tile S_pq and S_qp are separate accumulations)
    torch.testing.assert_close(w, w.mT, rtol=0, atol=1e-6 * float(w.abs().max()))


def test_pp_backward_rule_and_validation():
    assert gram.stores_w(196, 1024) and gram.stores_w(1024, 1024)  # ViT-L 224 px; P = D
    assert not gram.stores_w(1025, 1024)  # W would outgrow F and E
    s, t = make_inputs((1, 5, 7), torch.float32, noise=None)
    with pytest.raises(ValueError, match="pp_backward"):
        gram_loss(s, t, pp_backward="cached")


@pytest.mark.parametrize("gpu_tiles", [90], indirect=True, ids=["sm90_tiles"])
@pytest.mark.parametrize("pp_backward", ["recompute", "stored"])
@pytest.mark.parametrize("variant", ["pp", "pp-remove_neg"])
def test_backward_is_bitwise_deterministic(gpu_tiles, variant, pp_backward):
    # the P×P backward has one program per row block of dÂ that adds the column blocks in a fixed
    # order (no atomics), so two runs agree bit for bit. On a GPU the shape is big enough for many
    # programs to run at once (where atomics would reorder the adds); the interpreter runs them
    # one by one, so there it checks the shipped tiles' loop structure, not the scheduling.
    shape = (4, 256, 256) if torch.cuda.is_available() else GPU_TILE_SHAPE
    s, t = make_inputs(shape, torch.bfloat16, noise=1e-2, seed=6)
    form, clamp = VARIANTS[variant]
    grads = [loss_and_grad(gram_loss, s, t, img_level=False, form=form, **clamp,
                           pp_backward=pp_backward)[1] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


# The normalisation pre-pass and its backward (`_row_config`): under the interpreter rows of D <= 64
# take the one-pass kernel, wider ones the two-pass loop, 4 rows per program (15 rows: a partial
# block); row_pass="loop" forces one row per program and two passes at every D.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("row_pass", ["auto", "loop"])
@pytest.mark.parametrize("d", [7, 80], ids=["D7_one_pass", "D80_two_pass"])
@pytest.mark.parametrize("variant", ["pp-remove_neg", "dd"])
def test_row_kernels_each_path(variant, d, row_pass, dtype):
    s, t = make_inputs((3, 5, d), dtype, noise=1e-2, seed=11)
    for img_level in (True, False):
        check_parity(s, t, img_level, variant, atol_rel=1e-5 if dtype == torch.float32 else 1e-6,
                     row_pass=row_pass)


# The GPU row configurations themselves (`_row_gpu`), whatever the device: D = 384 runs 8 rows of
# a 512-wide block (the last 128 columns masked, 13 rows: a partial block), D = 4100 the two-pass
# loop over 1024-wide chunks (one row per program, the last chunk ragged).
@pytest.mark.parametrize("shape", [(1, 13, 384), (1, 3, 4100)], ids=["D384", "D4100"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_kernels_at_gpu_configs(shape, dtype, monkeypatch):
    monkeypatch.setattr(gram, "_row_config", gram._row_gpu)
    assert gram._row_gpu(shape[-1])["ONE_PASS"] == (shape[-1] <= gram.ROW_MAX_ONE_PASS)
    s, t = make_inputs(shape, dtype, noise=1e-2, seed=12)
    check_parity(s, t, True, "pp", atol_rel=1e-5 if dtype == torch.float32 else 1e-6)


# The backwards that are one GEMM (D×D: FE·[M1; M2]; P×P with a stored W: W ŝ) through torch.bmm
# (cuBLAS on CUDA, fp32 math on the CPU) against the fp64 reference and the Triton GEMMs, per
# image and flattened, at odd and GPU-tile shapes.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 5, 7), GPU_TILE_SHAPE], ids=["3x5x7", "2x75x80"])
@pytest.mark.parametrize("variant", ["dd", "pp"])
def test_backward_gemm_bmm(variant, shape, dtype):
    s, t = make_inputs(shape, dtype, noise=1e-2, seed=13)
    kw = {"pp_backward": "stored"} if variant == "pp" else {}
    for img_level in (True, False):
        check_parity(s, t, img_level, variant, atol_rel=1e-6, backward_gemm="bmm", **kw)
        _, g_bmm = loss_and_grad(gram_loss, s, t, img_level=img_level, form=variant,
                                 backward_gemm="bmm", **kw)
        _, g_tri = loss_and_grad(gram_loss, s, t, img_level=img_level, form=variant,
                                 backward_gemm="triton", **kw)
        # same products, fp32 sums in another order: one rounding of the output dtype apart
        assert torch.allclose(g_bmm, g_tri, rtol=2e-2, atol=1e-3 * g_tri.abs().max().item())


def test_backward_gemm_is_validated():
    s, t = make_inputs((1, 5, 7), torch.float32, noise=0)
    with pytest.raises(ValueError, match="backward_gemm='gemm' is invalid"):
        gram_loss(s, t, form="dd", backward_gemm="gemm")
    with pytest.raises(ValueError, match="needs bf16/fp16 inputs"):
        gram_loss(s, t, form="dd", backward_gemm="bmm")  # fp32 keeps the IEEE Triton dot


def test_row_pass_is_validated():
    s, t = make_inputs((1, 5, 7), torch.float32, noise=0)
    with pytest.raises(ValueError, match="row_pass='rows'.*auto | loop"):
        gram_loss(s, t, row_pass="rows")


def test_choose_form_rule():
    # P×P costs 8·P²·D (fwd 2, deterministic bwd 6), D×D 8·P·D² (fwd 4 over the symmetric block
    # pairs, bwd 4): D×D exactly when P >= D and no clamp is set
    assert gram.choose_form(196, 1024, gram.CLAMP_NONE) == gram.FORM_PP  # ViT-L 224
    assert gram.choose_form(256, 4096, gram.CLAMP_NONE) == gram.FORM_PP  # 7B 256
    assert gram.choose_form(1023, 1024, gram.CLAMP_NONE) == gram.FORM_PP
    assert gram.choose_form(1024, 1024, gram.CLAMP_NONE) == gram.FORM_DD  # ViT-L 512 px
    assert gram.choose_form(4096, 1024, gram.CLAMP_NONE) == gram.FORM_DD  # high-res
    assert gram.choose_form(64 * 196, 1024, gram.CLAMP_NONE) == gram.FORM_DD  # flattened batch
    assert gram.choose_form(4096, 1024, gram.CLAMP_NEG) == gram.FORM_PP  # clamps need P×P


@pytest.mark.parametrize("gpu_tiles", [90, 80], indirect=True, ids=["sm90_tiles", "sm80_tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dd_row_splits_match_the_reference(gpu_tiles, dtype, monkeypatch):
    # the split D×D forward (raw blocks of each row split to a scratch buffer, summed in order by
    # the finish launch) at 32-row splits: per image 75 rows = 3 splits, the last one ragged;
    # flattened 150 rows = 5. The D = 80 of GPU_TILE_SHAPE gives 2 column blocks at BLOCK_K = 64,
    # so the off-diagonal pair's transposed M1 / M2 stores run too.
    monkeypatch.setattr(gram, "_dd_splits", lambda programs, pe, device: (gram.cdiv(pe, 32), 32))
    s, t = make_inputs(GPU_TILE_SHAPE, dtype, noise=1e-2, seed=7)
    for img_level in (True, False):
        check_parity(s, t, img_level, "dd", atol_rel=1e-5 if dtype == torch.float32 else 1e-6)


def test_dd_split_rule(monkeypatch):
    # rows are split only for grids under two waves; the split count minimises waves × rows per
    # program (at most DD_MAX_SPLITS, >= DD_SPLIT_MIN_ROWS rows each), rows rounded to 64
    monkeypatch.setattr(gram, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    # ViT-L flattened: 136 pairs; waves × rows for 1..4 splits = 2·12544, 3·6272, 4·4182, 5·3136
    assert gram._dd_splits(136, 64 * 196, cuda) == (4, 3136)
    assert gram._dd_splits(8 * 136, 4096, cuda) == (1, 4096)  # 8 images at 1024 px: 8.2 waves
    assert gram._dd_splits(136, 1500, cuda) == (1, 1500)  # two splits would stream < 1024 rows
    assert gram._dd_splits(136, 64 * 196, torch.device("cpu")) == (1, 64 * 196)


@pytest.mark.parametrize("capability,family", [((8, 0), 80), ((8, 6), 80), ((8, 9), 80),
                                               ((9, 0), 90), ((10, 0), 90), ((12, 0), 80)])
def test_device_arch_picks_the_mma_family(monkeypatch, capability, family):
    # per-warp mma.sync parts (A100, RTX 30/40, consumer Blackwell) get the sm_80 tiles,
    # warpgroup-MMA parts (H100, B200) the sm_90 ones
    gram._cuda_arch.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    try:
        assert gram.device_arch(torch.device("cuda", 0)) == family
    finally:
        gram._cuda_arch.cache_clear()


def test_tiles_choice_is_validated_and_forced_tiles_agree():
    s, t = make_inputs((1, 20, 16), torch.float32, noise=1e-2)
    with pytest.raises(ValueError, match="tiles"):
        gram_loss(s, t, tiles="sm75")
    # under the interpreter both run its own tiles; on a GPU the two shipped sets (same math)
    a, b = (gram_loss(s, t, tiles=x) for x in ("sm90", "sm80"))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_dd_form_rejects_clamp():
    s, t = make_inputs((1, 5, 7), torch.float32, noise=None)
    with pytest.raises(ValueError, match="form='dd'"):
        gram_loss(s, t, remove_neg=True, form="dd")


def test_loss_is_deterministic_and_module_dispatches_to_triton():
    s, t = make_inputs((2, 37, 64), torch.bfloat16, noise=1e-2, seed=3)
    a = gram_loss(s, t)
    b = gram_loss(s, t)
    assert torch.equal(a, b)  # per-tile partials summed in a fixed order
    triton_loss = GramLoss(impl="triton")(s, t)
    torch_loss = GramLoss(impl="torch")(s, t)
    assert torch.equal(triton_loss, a)
    assert triton_loss.item() == pytest.approx(torch_loss.item(), rel=1e-2)


@pytest.mark.parametrize("form", [gram.FORM_PP, gram.FORM_DD])
def test_opcheck_custom_ops(form):
    s, t = make_inputs((1, 20, 16), torch.float32, noise=1e-2)
    for store_w in ((False, True) if form == gram.FORM_PP else (False,)):
        for row_loop in (False, True):
            torch.library.opcheck(torch.ops.fastdino.gram_fwd.default,
                                  (s, t, True, 0, form, 0, store_w, row_loop))
        _, *saved = torch.ops.fastdino.gram_fwd(s, t, True, 0, form, 0, store_w)
        torch.library.opcheck(torch.ops.fastdino.gram_bwd.default,
                              (torch.ones((), device=DEV), s, *saved, True, 0, form, 0))
    if form == gram.FORM_DD:  # the bmm backward (half precision only) and the FE layout
        s, t = (x.to(torch.bfloat16) for x in (s, t))
        _, *saved = torch.ops.fastdino.gram_fwd(s, t, True, 0, form, 0, False)
        assert saved[2].shape == (1, 20, 32) and saved[3].numel() == 0  # FE = [F | E], no E
        torch.library.opcheck(torch.ops.fastdino.gram_bwd.default,
                              (torch.ones((), device=DEV), s, *saved, True, 0, form, 0, False,
                               True))


def test_compiled_matches_eager():
    s, t = make_inputs((2, 20, 16), torch.float32, noise=1e-2, seed=4)
    fn = torch.compile(lambda x, y: gram_loss(x, y, remove_neg=True), backend="aot_eager",
                       fullgraph=True)
    eager_l, eager_g = loss_and_grad(lambda x, y: gram_loss(x, y, remove_neg=True), s, t)
    comp_l, comp_g = loss_and_grad(fn, s, t)
    assert torch.equal(comp_l, eager_l)
    torch.testing.assert_close(comp_g, eager_g, rtol=1e-6, atol=1e-12)
