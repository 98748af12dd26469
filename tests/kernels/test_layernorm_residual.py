"""Parity of the fused LayerScale + residual + LayerNorm kernels (kernels/layernorm_residual.py)
with layernorm_residual_ref and with the block's own unfused path (fastdino/layers/block.py):
forward y and LayerNorm(y), gradients to x, h, gamma, weight and bias; fp32 (rtol 1e-5), bf16
(DESIGN.md rule, bench.parity.judge) and the autocast mix (fp32 stream, bf16 branch, fp32 out);
odd and real ViT widths; deterministic parameter gradients; custom-op and torch.compile checks;
the block and the backbone with kernels.fuse_pointwise on == off. On CPU the kernels run under
the Triton interpreter (tests/conftest.py)."""

import pytest
import torch
from fastdino.kernels._utils import can_run_triton, is_interpreter
from fastdino.kernels.layernorm_residual import (
    _layernorm_residual_bwd_op,
    _layernorm_residual_fwd_op,
    layernorm_residual,
    layernorm_residual_ref,
)

from bench.parity import judge
from fastdino.layers.block import SelfAttentionBlock

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not can_run_triton(torch.empty(0, device=DEVICE)),
                                reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1)")

# (T rows, D): odd widths (100, a prime 97 with 1 row) and the real ones at few rows: ViT-S 384,
# ViT-B 768, ViT-L 1024, 7B 4096
SHAPES = [(7, 100), (1, 97), (5, 384), (3, 768), (3, 1024), (2, 4096)]
NAMES = ("y", "out", "dx", "dh", "dgamma", "dweight", "dbias")
BF16, F32 = torch.bfloat16, torch.float32


def _inputs(T, D, x_dtype, h_dtype, p_dtype, seed=0, scale_gamma=1.0):
    """x, h [T, D]; gamma, weight, bias [D] (non-trivial values); cotangents of y and out (fp32).
    x has a per-channel offset, as a residual stream does, so the mean matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g) + 2 * torch.randn(D, generator=g)
    h = torch.randn(T, D, generator=g)
    gamma = scale_gamma * torch.randn(D, generator=g)
    weight = 1 + 0.5 * torch.randn(D, generator=g)
    bias = 0.5 * torch.randn(D, generator=g)
    cot = (torch.randn(T, D, generator=g), torch.randn(T, D, generator=g))
    ts = [t.to(DEVICE, dt) for t, dt in ((x, x_dtype), (h, h_dtype), (gamma, p_dtype),
                                         (weight, p_dtype), (bias, p_dtype))]
    return ts, [c.to(DEVICE) for c in cot]


def _fwd_bwd(fn, ts, cot, dtypes=None):
    """[y, out, dx, dh, dgamma, dweight, dbias] of `fn` on copies of ts cast to `dtypes`."""
    leaves = [t.detach().to(d or t.dtype).requires_grad_(True)
              for t, d in zip(ts, dtypes or [None] * 5, strict=True)]
    y, out = fn(*leaves, 1e-5)
    torch.autograd.backward([y, out], [cot[0].to(y.dtype), cot[1].to(out.dtype)])
    return [y.detach(), out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("T,D", SHAPES)
def test_fp32_matches_reference(T, D):
    ts, cot = _inputs(T, D, F32, F32, F32)
    got = _fwd_bwd(layernorm_residual, ts, cot)
    ref = _fwd_bwd(layernorm_residual_ref, ts, cot)
    for name, k, r in zip(NAMES, got, ref, strict=True):
        assert k.shape == r.shape and k.dtype == r.dtype, name
        # parameter grads sum T rows: scale the tolerance with their size
        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5 * max(1.0, r.abs().max().item()),
                                   msg=lambda m, n=name: f"{n}: {m}")


# (x, y and out; h; params): bf16 training; autocast (fp32 stream and params, bf16 branch)
COMBOS = [(BF16, BF16, BF16), (F32, BF16, F32)]


@pytest.mark.parametrize("combo", COMBOS, ids=["bf16", "autocast-mix"])
@pytest.mark.parametrize("T,D", [(7, 100), (3, 768), (2, 4096)])
def test_low_precision_within_twice_the_torch_error(T, D, combo):
    # DESIGN.md: max|kernel - truth| <= 2 max|torch_lowp - truth| + atol, truth = the reference on
    # the same values upcast to fp32; bf16 stores round to nearest under the interpreter too
    ts, cot = _inputs(T, D, *combo)
    truth = _fwd_bwd(layernorm_residual_ref, ts, cot, [F32] * 5)
    lowp = _fwd_bwd(layernorm_residual_ref, ts, cot)
    got = _fwd_bwd(layernorm_residual, ts, cot)
    for name, k, lp, t in zip(NAMES, got, lowp, truth, strict=True):
        assert k.dtype == lp.dtype, name
        err_k, err_t, _, bound, ok, note = judge(k, lp, t, BF16, 0.0, 1e-5, is_interpreter())
        assert ok, f"{name}: error {err_k:.3g} > bound {bound:.3g} (torch {err_t:.3g}) {note}"


def test_normalises_the_stream_as_stored():
    # bf16 stream: out is LayerNorm of the rounded y the kernel returns (what the unfused block
    # normalises), not of the unrounded fp32 sum; checked through the fp32 statistics it saves
    from fastdino.kernels.layernorm_residual import layernorm_residual_fwd

    ts, _ = _inputs(4, 384, BF16, BF16, F32)
    yo, mean, rstd = layernorm_residual_fwd(*ts, 1e-5)
    y = yo[0].float()
    torch.testing.assert_close(mean, y.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, torch.rsqrt(y.var(1, unbiased=False) + 1e-5), rtol=1e-5,
                               atol=1e-6)


def test_packed_output_is_the_stacked_pair():
    ts, cot = _inputs(3, 40, F32, F32, F32)
    leaves = [t.clone().requires_grad_() for t in ts]
    yo = layernorm_residual(*leaves, packed=True)
    assert yo.shape == (2, 3, 40)
    yo.backward(torch.stack(cot))
    ref = _fwd_bwd(layernorm_residual_ref, ts, cot)
    torch.testing.assert_close(yo.detach(), torch.stack(ref[:2]), rtol=1e-5, atol=1e-6)
    for name, t, r in zip(NAMES[2:], leaves, ref[2:], strict=True):
        torch.testing.assert_close(t.grad, r, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_matches_the_unfused_block_math():
    # what the block computes today: y = x + ls1(a) (LayerScale, then the residual add), then
    # norm2 = nn.LayerNorm; fp32, so only summation order differs
    T, D = 6, 100
    ts, cot = _inputs(T, D, F32, F32, F32, scale_gamma=1e-2)

    def unfused(x, h, gamma, weight, bias, eps):
        y = x + h * gamma
        return y, torch.nn.functional.layer_norm(y, (D,), weight, bias, eps)

    got = _fwd_bwd(layernorm_residual, ts, cot)
    ref = _fwd_bwd(unfused, ts, cot)
    for name, k, r in zip(NAMES, got, ref, strict=True):
        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5 * max(1.0, r.abs().max().item()),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_parameter_gradients_are_deterministic_and_from_partial_sums(monkeypatch):
    # GPU launch config under the interpreter: 1-row programs, 2 programs striding over 9 rows, so
    # each partial row sums several row blocks; two runs give the same bits
    import fastdino.kernels.layernorm_residual as mod

    monkeypatch.setattr(mod, "is_interpreter", lambda: False)
    assert mod._config(768, 9, bwd=True)["BLOCK_M"] == 1
    ts, cot = _inputs(9, 768, F32, F32, F32)
    a = _fwd_bwd(layernorm_residual, ts, cot)
    b = _fwd_bwd(layernorm_residual, ts, cot)
    ref = _fwd_bwd(layernorm_residual_ref, ts, cot)
    for name, x, y, r in zip(NAMES, a, b, ref, strict=True):
        assert torch.equal(x, y), name
        torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-5 * max(1.0, r.abs().max().item()),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_batched_input_and_zero_rows():
    # [B, N, D] in, [B, N, D] out; T = 0 gives empty outputs and zero parameter gradients
    ts, cot = _inputs(6, 64, F32, F32, F32)
    x3 = ts[0].view(2, 3, 64)
    y, out = layernorm_residual(x3, ts[1].view(2, 3, 64), *ts[2:])
    ry, rout = layernorm_residual_ref(x3, ts[1].view(2, 3, 64), *ts[2:])
    assert y.shape == out.shape == (2, 3, 64)
    torch.testing.assert_close(out, rout, rtol=1e-5, atol=1e-5)
    e = [torch.empty(0, 64, device=DEVICE).requires_grad_(), torch.empty(0, 64, device=DEVICE)]
    params = [t.clone().requires_grad_() for t in ts[2:]]
    y, out = layernorm_residual(*e, *params)
    assert y.shape == out.shape == (0, 64)
    (y.sum() + out.sum()).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


def test_custom_ops_pass_opcheck():
    ts, cot = _inputs(3, 40, F32, F32, F32)
    torch.library.opcheck(_layernorm_residual_fwd_op, (*ts, 1e-5))
    yo, mean, rstd = _layernorm_residual_fwd_op(*ts, 1e-5)
    x, h, gamma, weight, bias = ts
    torch.library.opcheck(_layernorm_residual_bwd_op,
                          (cot[0], cot[1], yo[0], h, gamma, weight, bias, mean, rstd))


def test_traces_under_torch_compile():
    # aot_eager traces the fake implementations and the autograd.Function without generating
    # C++ (fast on CPU); fullgraph proves there is no graph break
    ts, cot = _inputs(4, 48, F32, F32, F32)
    fn = torch.compile(layernorm_residual, backend="aot_eager", fullgraph=True)
    got = _fwd_bwd(fn, ts, cot)
    ref = _fwd_bwd(layernorm_residual_ref, ts, cot)
    for name, k, r in zip(NAMES, got, ref, strict=True):
        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_errors_name_the_bad_input():
    ts, _ = _inputs(2, 16, F32, F32, F32)
    x, h, gamma, weight, bias = ts
    with pytest.raises(ValueError, match="same shape"):
        layernorm_residual(x, h[:, :8], gamma, weight, bias)
    with pytest.raises(ValueError, match="gamma"):
        layernorm_residual(x, h, gamma[:8], weight, bias)
    with pytest.raises(ValueError, match="bias"):
        layernorm_residual(x, h, gamma, weight, bias[:3])
    with pytest.raises(ValueError, match="fp32 or bf16"):
        layernorm_residual(x.double(), h.double(), gamma, weight, bias)
    wide = [torch.zeros(1, 4097, device=DEVICE)] * 2 + [torch.zeros(4097, device=DEVICE)] * 3
    with pytest.raises(ValueError, match="4096"):
        layernorm_residual(*wide)


# ------------------------------------------------------------------------------ the block


def _block(D=32, heads=2, drop_path=0.0, ffn="mlp", fuse=True, impl="triton"):
    torch.manual_seed(0)
    blk = SelfAttentionBlock(D, heads, ffn_ratio=2.0, ffn_layer=ffn, drop_path=drop_path,
                             attn_impl="torch", device=DEVICE)
    for m in blk.modules():  # non-trivial parameters (LayerScale 0.5, not 1e-5)
        for p in m.parameters(recurse=False):
            torch.nn.init.normal_(p, mean=0.5 if p.dim() == 1 else 0.0, std=0.2)
    blk.attn.qkv.reset_bias_mask()
    blk.set_pointwise_fusion(impl, fuse)
    return blk


def _block_run(blk, xs, seed=0):
    """Outputs and grads (inputs, then parameters) of the block on a global and a local crop type
    (list forward, no RoPE)."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    torch.manual_seed(seed)
    outs = blk(leaves, [None] * len(leaves))
    g = torch.Generator().manual_seed(7)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    params = list(blk.parameters())
    grads = torch.autograd.grad(loss, leaves + params)
    return [o.detach() for o in outs], list(grads)


def _block_inputs(D=32, dtype=F32):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, 9, D, generator=g).to(DEVICE, dtype),
            torch.randn(4, 5, D, generator=g).to(DEVICE, dtype)]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_block_with_fusion_equals_block_without(ffn, train):
    fused, plain = _block(ffn=ffn), _block(ffn=ffn, fuse=False)
    fused.train(train)
    plain.train(train)
    xs = _block_inputs()
    calls = []
    import fastdino.kernels.layernorm_residual as mod

    orig = mod.LayerNormResidualFn.apply
    try:
        mod.LayerNormResidualFn.apply = lambda *a: calls.append(1) or orig(*a)
        got_out, got_grad = _block_run(fused, xs)
    finally:
        mod.LayerNormResidualFn.apply = orig
    ref_out, ref_grad = _block_run(plain, xs)
    assert calls, "the fused kernel was not used"
    for a, b in zip(got_out, ref_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    names = ["x_global", "x_local"] + [n for n, _ in fused.named_parameters()]
    for n, a, b in zip(names, got_grad, ref_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_block_bf16_within_twice_the_torch_error():
    # the block in bf16 with fusion vs without, both against the fp32 block on the same values
    xs = _block_inputs(dtype=BF16)
    truth = _block_run(_block(fuse=False).float(), [x.float() for x in xs])
    lowp = _block_run(_block(fuse=False).to(BF16), xs)
    got = _block_run(_block().to(BF16), xs)
    for i, (k, lp, t) in enumerate(zip(got[0] + got[1], lowp[0] + lowp[1], truth[0] + truth[1],
                                       strict=True)):
        err_k, err_t, _, bound, ok, note = judge(k, lp, t, BF16, 0.0, 1e-5, is_interpreter())
        assert ok, f"quantity {i}: error {err_k:.3g} > bound {bound:.3g} (torch {err_t:.3g})"


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast case (the GPU runs the bf16 test)")
def test_block_under_autocast_fuses_the_fp32_stream():
    # the plain engine's bf16 mode: fp32 params and stream, bf16 Linear outputs under autocast;
    # norm2's output is fp32 on both paths, the branch h = attn(...) is bf16: the kernel computes
    # ls1 + residual + LayerNorm in fp32 as the unfused ops do
    xs = _block_inputs()
    with torch.autocast("cpu", dtype=BF16):
        got = _block_run(_block(), xs)
        ref = _block_run(_block(fuse=False), xs)
    # both round the same fp32 values to bf16 at the Linear inputs; a last-bit difference in the
    # LayerNorm flips some of those roundings: bf16-level agreement at each tensor's scale
    for a, b in zip(got[0] + got[1], ref[0] + ref[1], strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * b.abs().max().item())


def test_block_falls_back_while_drop_path_is_active(monkeypatch):
    # training with drop path: the branch is added to a rescaled subset of the samples, rows do
    # not line up, so the kernel must not run and the result is the unfused block's
    import fastdino.kernels.layernorm_residual as mod

    def boom(*a):
        raise AssertionError("fused kernel used under active drop path")

    monkeypatch.setattr(mod, "layernorm_residual", boom)
    fused, plain = _block(drop_path=0.5), _block(drop_path=0.5, fuse=False)
    xs = _block_inputs()
    got, ref = _block_run(fused, xs, seed=1), _block_run(plain, xs, seed=1)
    for a, b in zip(got[0] + got[1], ref[0] + ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flag_off_or_impl_torch_never_calls_the_kernel(monkeypatch):
    import fastdino.kernels.layernorm_residual as mod

    monkeypatch.setattr(mod, "layernorm_residual", None)  # calling it would raise TypeError
    for blk in (_block(fuse=False), _block(impl="torch")):
        _block_run(blk, _block_inputs())


def test_block_compiles_without_graph_breaks():
    # torch.compile(fullgraph=True) of the whole block (eval, aot_eager: no C++ on CPU) with the
    # fused kernels: our custom ops and Functions add no graph break; same result as eager
    blk = _block(ffn="swiglu").eval()
    blk.attn.backend = "torch"  # the backbone picks it outside the compiled blocks
    xs = _block_inputs()
    eager = _block_run(blk, xs)
    compiled = torch.compile(blk, backend="aot_eager", fullgraph=True)
    got = _block_run(compiled, xs)
    for a, b in zip(got[0] + got[1], eager[0] + eager[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_backbone_threads_the_flag():
    """build_backbone(fuse_pointwise=True): every block (and SwiGLU FFN) gets the flag, and the
    backbone's outputs and parameter gradients equal the unfused backbone's (eval, where the
    fusion applies in every block)."""
    from fastdino.config import load_config
    from fastdino.models import build_backbone

    cfg = load_config(None, ["model.arch=vit_test", "model.drop_path_rate=0.0",
                             "model.ffn_layer=swiglu", "model.rope_rescale=null"])
    torch.manual_seed(0)
    fused = build_backbone(cfg.model, device=DEVICE, kernels_impl="triton", fuse_pointwise=True)
    ref = build_backbone(cfg.model, device=DEVICE, kernels_impl="triton")
    ref.load_state_dict(fused.state_dict())
    assert all(b.fuse_pointwise and b.mlp.fuse_pointwise for b in fused.blocks)
    assert not any(b.fuse_pointwise or b.mlp.fuse_pointwise for b in ref.blocks)
    for m in (fused, ref):
        m.eval()
    g = torch.randn(2, 3, 32, 32, device=DEVICE)
    outs = [m.forward_features_list([g], [None])[0] for m in (fused, ref)]
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=1e-5, atol=1e-6)
    for o in outs:
        o["x_norm_patchtokens"].square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_block_declares_the_parameters_it_reads_outside_their_modules():
    """ZeRO-3 gathers a parameter when its owning module runs; the fused path reads ls1 and norm2
    without running them, so the block lists exactly those for parallel.py to register."""
    blk = _block(fuse=True)
    want = {id(p) for p in (blk.ls1.gamma, blk.norm2.weight, blk.norm2.bias)}
    assert {id(p) for p in blk.external_parameters()} == want
    assert _block(fuse=False).external_parameters() == []
