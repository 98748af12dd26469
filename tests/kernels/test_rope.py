"""Parity of the fused RoPE kernels (kernels/rope.py) with rope_ref and with the model's own RoPE
path (fastdino/layers/attention.py + rope_position_encoding.py): forward q, k, v and the qkv
gradient, both layouts, fp32 (rtol 1e-5) and bf16 (DESIGN.md rule, bench.parity.judge), odd
token counts, prefix 5 / 1 / 0, a non-square grid, the train-time rescale. On CPU the kernels run
under the Triton interpreter (tests/kernels/conftest.py)."""

import pytest
import torch
from fastdino.kernels._utils import can_run_triton, is_interpreter
from fastdino.kernels.rope import _rope_bwd_op, _rope_fwd_op, rope_bwd, rope_qkv, rope_ref

from bench.parity import judge
from fastdino.layers.attention import SelfAttention
from fastdino.layers.attn_backend import attention_ref
from fastdino.layers.rope_position_encoding import RopePositionEmbedding, apply_rope_to_patches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not can_run_triton(torch.empty(0, device=DEVICE)),
                                reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1)")

# (B, H, d_h, n_prefix, (grid h, grid w)): patch counts 4, 9, 36 (+5: a DINOv3 local crop with
# 4 registers), a non-square 3x5 grid with CLS only, no prefix at all; d_h 16 and 64 (ViT-S/B/L)
SHAPES = [
    (2, 2, 16, 5, (2, 2)),
    (1, 3, 16, 0, (3, 3)),
    (2, 2, 64, 5, (6, 6)),
    (3, 3, 16, 1, (3, 5)),
]
LAYOUTS = ("bhnd", "bnhd")


def _tables(H, d_h, grid, train=False, seed=0):
    """(cos, sin) [hw, d_h] fp32 from the model's RopePositionEmbedding (train: random rescale)."""
    rope = RopePositionEmbedding(H * d_h, H, rescale_coords=2.0 if train else None, device=DEVICE)
    rope.reset_parameters()
    rope.train(train)
    torch.manual_seed(seed)
    sin, cos = rope(H=grid[0], W=grid[1])
    return cos, sin


def _inputs(B, H, d_h, n_prefix, grid, dtype, layout="bhnd", seed=0):
    g = torch.Generator().manual_seed(seed)
    N = n_prefix + grid[0] * grid[1]
    qkv = torch.randn(B, N, 3 * H * d_h, generator=g).to(DEVICE, dtype)
    a, b = (H, N) if layout == "bhnd" else (N, H)
    cot = torch.randn(3, B, a, b, d_h, generator=g).to(DEVICE)  # cotangents of q, k, v (fp32)
    return qkv, cot


def _fwd_bwd(fn, qkv, cos, sin, H, n_prefix, layout, cot, dtype=None):
    """(q, k, v, d qkv) of `fn` on a copy of qkv cast to `dtype`; cotangents cast to q's dtype."""
    x = qkv.detach().to(dtype or qkv.dtype).requires_grad_(True)
    outs = fn(x, cos, sin, H, n_prefix, layout)
    torch.autograd.backward(outs, [c.to(o.dtype) for c, o in zip(cot, outs, strict=True)])
    return [o.detach() for o in outs] + [x.grad]


def _close(name, got, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B,H,d_h,n_prefix,grid", SHAPES)
def test_fp32_matches_reference(B, H, d_h, n_prefix, grid, layout):
    qkv, cot = _inputs(B, H, d_h, n_prefix, grid, torch.float32, layout)
    cos, sin = _tables(H, d_h, grid)
    got = _fwd_bwd(rope_qkv, qkv, cos, sin, H, n_prefix, layout, cot)
    ref = _fwd_bwd(rope_ref, qkv, cos, sin, H, n_prefix, layout, cot)
    for name, k, r in zip(("q", "k", "v", "dqkv"), got, ref, strict=True):
        assert k.shape == r.shape and k.is_contiguous(), name
        _close(name, k, r)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B,H,d_h,n_prefix,grid", SHAPES)
def test_bf16_within_twice_the_torch_bf16_error(B, H, d_h, n_prefix, grid, layout):
    # DESIGN.md: max|kernel - ref_fp32| <= 2 max|torch_bf16 - ref_fp32| + atol, ref_fp32 = rope_ref
    # on the same bf16 values upcast; under the interpreter too the kernel's bf16 stores round to
    # nearest (kernels/_rounding.py), so no truncation allowance
    qkv, cot = _inputs(B, H, d_h, n_prefix, grid, torch.bfloat16, layout)
    cos, sin = _tables(H, d_h, grid)
    truth = _fwd_bwd(rope_ref, qkv, cos, sin, H, n_prefix, layout, cot, torch.float32)
    lowp = _fwd_bwd(rope_ref, qkv, cos, sin, H, n_prefix, layout, cot)
    got = _fwd_bwd(rope_qkv, qkv, cos, sin, H, n_prefix, layout, cot)
    for name, k, lp, t in zip(("q", "k", "v", "dqkv"), got, lowp, truth, strict=True):
        assert k.dtype == torch.bfloat16, name
        err_k, err_t, _, bound, ok, note = judge(k, lp, t, torch.bfloat16, 0.0, 1e-6,
                                                 is_interpreter())
        assert ok, f"{name}: error {err_k:.3g} > bound {bound:.3g} (torch {err_t:.3g}) {note}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_matches_the_model_rope_path(dtype, train):
    # the q, k, v the model builds today (attention.py: reshape -> unbind -> transpose ->
    # apply_rope_to_patches), with the train-time rescale of the tables when `train`; both paths
    # round once from fp32 to nearest (the interpreter too: kernels/_rounding.py), so they agree
    # up to fp32 rounding-order flips of one bf16 ulp
    B, H, d_h, n_prefix, grid = 2, 2, 16, 5, (3, 5)
    qkv, cot = _inputs(B, H, d_h, n_prefix, grid, dtype)
    cos, sin = _tables(H, d_h, grid, train=train)

    def model_path(x, cos, sin, H, n_prefix, layout):
        q, k, v = (t.transpose(1, 2) for t in x.reshape(B, x.shape[1], 3, H, d_h).unbind(2))
        q, k = apply_rope_to_patches(q, k, (sin, cos))
        return q, k, v

    got = _fwd_bwd(rope_qkv, qkv, cos, sin, H, n_prefix, "bhnd", cot)
    ref = _fwd_bwd(model_path, qkv, cos, sin, H, n_prefix, "bhnd", cot)
    ulp = torch.finfo(dtype).eps if dtype == torch.bfloat16 else 1e-6
    for name, k, r in zip(("q", "k", "v", "dqkv"), got, ref, strict=True):
        _close(name, k.float(), r.float(), rtol=max(1e-5, ulp))


def test_drop_in_for_the_attention_layer():
    # SelfAttention.compute_attention (torch backend) == attention over rope_qkv's q, k, v
    B, H, d_h, n_prefix, grid = 2, 2, 16, 5, (2, 3)
    D = H * d_h
    qkv, _ = _inputs(B, H, d_h, n_prefix, grid, torch.float32)
    cos, sin = _tables(H, d_h, grid)
    layer = SelfAttention(D, H, attn_impl="torch").to(DEVICE)
    layer.backend = "torch"
    x1, x2 = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    want = layer.compute_attention(x1, (sin, cos))
    q, k, v = rope_qkv(x2, cos, sin, H, n_prefix)
    got = attention_ref(q, k, v).transpose(1, 2).reshape(B, -1, D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)


def test_prefix_tokens_and_v_pass_through_bit_exact():
    B, H, d_h, n_prefix, grid = 2, 3, 16, 5, (3, 3)
    qkv, _ = _inputs(B, H, d_h, n_prefix, grid, torch.bfloat16)
    cos, sin = _tables(H, d_h, grid)
    q, k, v = rope_qkv(qkv, cos, sin, H, n_prefix, layout="bnhd")
    parts = qkv.reshape(B, qkv.shape[1], 3, H, d_h)  # [B, N, 3, H, d_h]
    assert torch.equal(q[:, :n_prefix], parts[:, :n_prefix, 0])
    assert torch.equal(k[:, :n_prefix], parts[:, :n_prefix, 1])
    assert torch.equal(v, parts[:, :, 2])
    assert not torch.equal(q[:, n_prefix:], parts[:, n_prefix:, 0])  # the patches did rotate


def test_backward_is_the_inverse_rotation():
    # DINOv3's tables have equal halves, so the rotation is orthogonal: the backward applied to
    # the forward's output gives the input back (checks the kernels against each other, not the ref)
    B, H, d_h, n_prefix, grid = 2, 2, 64, 5, (2, 3)
    qkv, _ = _inputs(B, H, d_h, n_prefix, grid, torch.float32)
    cos, sin = _tables(H, d_h, grid, train=True)
    for layout in LAYOUTS:
        q, k, v = rope_qkv(qkv, cos, sin, H, n_prefix, layout)
        torch.testing.assert_close(rope_bwd(q, k, v, cos, sin, n_prefix, layout), qkv,
                                   rtol=1e-5, atol=1e-5)


def test_strided_qkv_and_gradients():
    # qkv as a token slice of a bigger buffer (row strides != shape), non-contiguous cotangents
    B, H, d_h, n_prefix, grid = 2, 2, 16, 1, (2, 2)
    big, _ = _inputs(B, H, d_h, n_prefix + 2, grid, torch.float32)  # N + 2 tokens
    cos, sin = _tables(H, d_h, grid)
    N = n_prefix + 4
    cot = torch.randn(3, B, N, H, d_h, device=DEVICE).transpose(2, 3)  # bhnd views, strided
    got = _fwd_bwd(rope_qkv, big[:, 2:], cos, sin, H, n_prefix, "bhnd", cot)
    ref = _fwd_bwd(rope_ref, big[:, 2:], cos, sin, H, n_prefix, "bhnd", cot)
    for k, r in zip(got, ref, strict=True):
        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-6)


def test_packed_output_is_the_stacked_tuple():
    B, H, d_h, n_prefix, grid = 1, 2, 16, 5, (2, 2)
    qkv, cot = _inputs(B, H, d_h, n_prefix, grid, torch.float32, "bnhd")
    cos, sin = _tables(H, d_h, grid)
    x = qkv.clone().requires_grad_()
    packed = rope_qkv(x, cos, sin, H, n_prefix, "bnhd", packed=True)
    assert packed.shape == (3, B, n_prefix + 4, H, d_h)
    packed.backward(cot)
    ref = _fwd_bwd(rope_ref, qkv, cos, sin, H, n_prefix, "bnhd", cot)
    torch.testing.assert_close(packed.detach(), torch.stack(ref[:3]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref[3], rtol=1e-5, atol=1e-6)


def test_custom_ops_pass_opcheck():
    B, H, d_h, n_prefix, grid = 1, 2, 16, 5, (2, 2)
    qkv, cot = _inputs(B, H, d_h, n_prefix, grid, torch.float32)
    cos, sin = _tables(H, d_h, grid)
    for layout in LAYOUTS:
        torch.library.opcheck(_rope_fwd_op, (qkv, cos, sin, H, n_prefix, layout))
    dq, dk, dv = cot.unbind(0)
    torch.library.opcheck(_rope_bwd_op, (dq, dk, dv, cos, sin, n_prefix, "bhnd"))


def test_traces_under_torch_compile():
    # aot_eager traces the fake implementations and RoPEFn without generating C++ (fast on CPU);
    # fullgraph proves there is no graph break
    B, H, d_h, n_prefix, grid = 1, 2, 16, 5, (2, 2)
    qkv, cot = _inputs(B, H, d_h, n_prefix, grid, torch.float32)
    cos, sin = _tables(H, d_h, grid)
    fn = torch.compile(lambda x: rope_qkv(x, cos, sin, H, n_prefix), backend="aot_eager",
                       fullgraph=True)
    got = _fwd_bwd(lambda x, *a: fn(x), qkv, cos, sin, H, n_prefix, "bhnd", cot)
    ref = _fwd_bwd(rope_ref, qkv, cos, sin, H, n_prefix, "bhnd", cot)
    for k, r in zip(got, ref, strict=True):
        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-6)


def test_errors_name_the_bad_input():
    qkv = torch.randn(1, 9, 3 * 2 * 16, device=DEVICE)
    cos, sin = _tables(2, 16, (2, 2))
    with pytest.raises(ValueError, match="layout"):
        rope_qkv(qkv, cos, sin, 2, 5, layout="nhd")
    with pytest.raises(ValueError, match="n_prefix"):
        rope_qkv(qkv, cos, sin, 2, 4)
    with pytest.raises(ValueError, match="num_heads"):
        rope_qkv(qkv, cos, sin, 5, 5)
    with pytest.raises(ValueError, match="d_h"):
        rope_qkv(qkv, cos[:, :8], sin[:, :8], 2, 5)
    with pytest.raises(ValueError, match="require grad"):
        rope_qkv(qkv, cos.requires_grad_(), sin, 2, 5)
    with pytest.raises(ValueError, match="d_h=24"):  # d_h/2 not a power of two: reference only
        rope_qkv(torch.randn(1, 9, 3 * 24, device=DEVICE), *_tables(1, 24, (2, 2)), 1, 5)


@pytest.mark.parametrize("H", [6, 3])
def test_gpu_launch_configs_split_heads_and_tokens(H, monkeypatch):
    # the GPU heuristic (several head blocks, H not a power of two, token-major backward tiles for
    # [B, H, N, d_h] gradients, head-major for [B, N, H, d_h] ones) run under the interpreter
    import fastdino.kernels.rope as rope_mod

    monkeypatch.setattr(rope_mod, "is_interpreter", lambda: False)
    assert rope_mod._config(H, 16, 10**6)["BLOCK_H"] < H
    B, d_h, n_prefix, grid = 2, 16, 5, (3, 3)
    for layout in LAYOUTS:
        qkv, cot = _inputs(B, H, d_h, n_prefix, grid, torch.float32, layout)
        cos, sin = _tables(H, d_h, grid)
        got = _fwd_bwd(rope_qkv, qkv, cos, sin, H, n_prefix, layout, cot)
        ref = _fwd_bwd(rope_ref, qkv, cos, sin, H, n_prefix, layout, cot)
        for name, k, r in zip(("q", "k", "v", "dqkv"), got, ref, strict=True):
            _close(name, k, r)


def test_backbone_with_fused_rope_matches_the_reference_backbone():
    """build_backbone(kernels_impl="triton") routes every block's RoPE through the kernel (list
    forward with a masked global crop type and a local crop type, train mode) and gives the same
    outputs and parameter gradients as the reference path."""
    from fastdino.config import load_config
    from fastdino.models import build_backbone

    cfg = load_config(None, ["model.arch=vit_test", "model.drop_path_rate=0.0",
                             "model.rope_rescale=null"])
    torch.manual_seed(0)
    fused = build_backbone(cfg.model, kernels_impl="triton")
    ref = build_backbone(cfg.model, kernels_impl="torch")
    ref.load_state_dict(fused.state_dict())
    assert all(blk.attn.kernels_impl == "triton" for blk in fused.blocks)
    g, l = torch.randn(2, 3, 32, 48), torch.randn(4, 3, 16, 16)
    masks = torch.zeros(2, 6, dtype=torch.bool)
    masks[0, :3] = True
    outs = [m.forward_features_list([g, l], [masks, None]) for m in (fused, ref)]
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        for a, b in zip(outs[0], outs[1], strict=True):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    for o in outs:
        sum(d["x_norm_patchtokens"].square().sum() for d in o).backward()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_every_gpu_config_is_a_compiled_spec_for_its_arch():
    """The launch config the launcher picks for each shipped head shape, dtype, tile order and GPU
    family is a compile spec listed for that family (so the compile report checks exactly what
    runs); sm_80 and fp32 take the 8-warp tiles."""
    from fastdino.kernels import rope

    specs = rope.compile_specs()
    for H, d_h in rope._SHIPPED_HEADS:
        for fp32 in (False, True):
            for token_major in (False, True):
                for arch in (90, 80):
                    cfg = rope._gpu_config(H, d_h, token_major, fp32, arch)
                    match = [s for s in specs if s.num_warps == cfg["num_warps"]
                             and all(s.constexprs[k] == v for k, v in cfg.items()
                                     if k != "num_warps")
                             and (",fp32," if fp32 else ",bf16,") in s.name]
                    assert any(arch in s.archs for s in match), (H, d_h, fp32, token_major, arch)
                    assert cfg["num_warps"] == (4 if arch == 90 and not fp32 else 8)


def test_launch_uses_the_device_family(monkeypatch):
    from fastdino.kernels import rope

    seen = []
    real = rope._gpu_config
    monkeypatch.setattr(rope, "_gpu_config", lambda *a, **k: seen.append(a) or real(*a, **k))
    monkeypatch.setattr(rope, "arch_family", lambda device: 80)
    qkv = torch.randn(1, 5, 3 * 2 * 16, device=DEVICE)
    sin, cos = torch.randn(4, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE)
    rope.rope_fwd(qkv, cos, sin, 2, 1)
    assert seen and seen[-1][-1] == 80
