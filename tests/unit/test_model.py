"""Behaviour of the DINOv3 backbone (fastdino.models.vision_transformer), on the tiny vit_test."""

import math

import pytest
import torch

from fastdino.config import ConfigError, ModelConfig
from fastdino.models import build_backbone, vit_test

B_G, B_L = 4, 6  # global / local crops per step


def _model(**kw):
    torch.manual_seed(0)
    model = vit_test(**kw)
    with torch.no_grad():  # LayerScale 1e-5 would make every block ~identity and hide bugs
        for blk in model.blocks:
            blk.ls1.gamma.fill_(0.5)
            blk.ls2.gamma.fill_(0.5)
        model.mask_token.normal_()
    return model


def _crops(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B_G, 3, 32, 48, generator=g), torch.randn(B_L, 3, 16, 32, generator=g)


def test_list_forward_shapes_with_masks():
    model = _model(drop_path_rate=0.5).train()
    g, l = _crops()
    masks = torch.zeros(B_G, 6, dtype=torch.bool)
    masks[:2, :3] = True
    out_g, out_l = model.forward_features_list([g, l], [masks, None])
    D, n = model.embed_dim, model.n_storage_tokens
    for out, b, N in ((out_g, B_G, 2 * 3), (out_l, B_L, 1 * 2)):
        assert out["x_norm_clstoken"].shape == (b, D)
        assert out["x_storage_tokens"].shape == (b, n, D)
        assert out["x_norm_patchtokens"].shape == (b, N, D)
        assert out["x_prenorm"].shape == (b, 1 + n + N, D)
    assert out_g["masks"] is masks and out_l["masks"] is None
    loss = sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].sum() for o in (out_g, out_l))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_mask_token_substituted():
    model = _model().eval()
    g, _ = _crops()
    masks = torch.zeros(B_G, 6, dtype=torch.bool)
    masks[0, [1, 4]] = True
    tokens, (h, w) = model.prepare_tokens_with_masks(g, masks)
    prefix = 1 + model.n_storage_tokens
    assert (h, w) == (2, 3)
    torch.testing.assert_close(tokens[0, prefix + 1], model.mask_token[0])
    torch.testing.assert_close(tokens[0, prefix + 4], model.mask_token[0])
    assert not torch.allclose(tokens[0, prefix + 0], model.mask_token[0])
    with torch.no_grad():
        masked = model.forward_features(g, masks)["x_norm_patchtokens"]
        plain = model.forward_features(g)["x_norm_patchtokens"]
        none_masked = model.forward_features(g, torch.zeros_like(masks))["x_norm_patchtokens"]
    torch.testing.assert_close(none_masked, plain, rtol=0, atol=0)
    assert not torch.allclose(masked[0], plain[0])  # image 0 had masked patches
    torch.testing.assert_close(masked[1:], plain[1:], rtol=0, atol=0)  # the others did not


def test_rope_rescale_only_in_training_and_per_block_per_crop_type():
    model = _model(drop_path_rate=0.0)
    g, l = _crops()
    draws = []
    orig = model.rope_embed.forward
    model.rope_embed.forward = lambda **kw: draws.append(orig(**kw)) or draws[-1]
    model.eval()
    with torch.no_grad():
        a = model.forward_features_list([g, l], [None, None])
        b = model.forward_features_list([g, l], [None, None])
    torch.testing.assert_close(a[0]["x_norm_clstoken"], b[0]["x_norm_clstoken"], rtol=0, atol=0)
    assert len(draws) == 2 * 2  # eval: once per crop type per forward
    draws.clear()
    model.train()
    with torch.no_grad():
        a = model.forward_features_list([g, l], [None, None])
        b = model.forward_features_list([g, l], [None, None])
    assert not torch.allclose(a[0]["x_norm_clstoken"], b[0]["x_norm_clstoken"])
    # train: one call per crop type per forward, holding one table per block
    assert len(draws) == 2 * 2
    for sin, cos in draws:
        assert sin.shape[0] == cos.shape[0] == model.n_blocks
        for i in range(model.n_blocks - 1):  # a fresh rescale per block
            assert not torch.allclose(sin[i], sin[i + 1])


def test_rope_draws_in_one_go_match_one_at_a_time():
    """n_draws tables are bit-identical to the official one-draw formula at each draw's rescale."""
    from fastdino.layers.rope_position_encoding import RopePositionEmbedding
    rope = RopePositionEmbedding(64, 4, rescale_coords=2.0)
    rope._init_weights()
    rope.train()
    torch.manual_seed(3)
    sin_k, cos_k = rope(H=3, W=5, n_draws=4)
    assert sin_k.shape == cos_k.shape == (4, 15, 16)
    torch.manual_seed(3)
    s = torch.empty(4).uniform_(-math.log(2.0), math.log(2.0)).exp()  # the same 4 draws
    ch, cw = (torch.arange(0.5, n) / n for n in (3, 5))
    coords = 2.0 * torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
    for i in range(4):  # the official module, one draw: coords * s, then the angles
        angles = 2 * math.pi * (coords * s[i])[:, :, None] / rope.periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        assert torch.equal(sin_k[i], torch.sin(angles)) and torch.equal(cos_k[i], torch.cos(angles))
    # eval: the deterministic table, repeated as a view
    rope.eval()
    sin_e, cos_e = rope(H=3, W=5, n_draws=4)
    sin_1, cos_1 = rope(H=3, W=5)
    assert sin_e.shape == (4, 15, 16) and all(torch.equal(sin_e[i], sin_1) for i in range(4))
    assert all(torch.equal(cos_e[i], cos_1) for i in range(4))


def test_rope_leaves_prefix_untouched_and_keeps_norms():
    from fastdino.layers.rope_position_encoding import apply_rope_to_patches
    model = _model().eval()
    sin, cos = model.rope_embed(H=2, W=3)
    q = torch.randn(2, 2, 5 + 6, 16)
    k = torch.randn(2, 2, 5 + 6, 16)
    q2, k2 = apply_rope_to_patches(q, k, (sin, cos))
    torch.testing.assert_close(q2[:, :, :5], q[:, :, :5], rtol=0, atol=0)
    torch.testing.assert_close(q2.norm(dim=-1), q.norm(dim=-1))  # a rotation
    assert not torch.allclose(q2[:, :, 5:], q[:, :, 5:])
    # separate normalisation: the first patch centre of a 2x3 grid is (0.25, 1/6) -> (-0.5, -2/3)
    d = 16
    periods = 100.0 ** (torch.arange(d // 4) * 4.0 / d)
    angles_h = 2 * torch.pi * (-0.5) / periods
    angles_w = 2 * torch.pi * (-2.0 / 3.0) / periods
    expected = torch.cat([angles_h, angles_w, angles_h, angles_w]).sin()
    torch.testing.assert_close(sin[0], expected)


def test_key_bias_has_no_effect_but_query_bias_does():
    model = _model().eval()
    g, _ = _crops()
    with torch.no_grad():
        ref = model(g)
        D = model.embed_dim
        for blk in model.blocks:
            blk.attn.qkv.bias[D:2 * D].normal_(std=3.0)
        torch.testing.assert_close(model(g), ref, rtol=0, atol=0)
        model.blocks[0].attn.qkv.bias[:D].normal_(std=3.0)
        assert not torch.allclose(model(g), ref)


def test_drop_path_identity_in_eval_and_matches_reference_in_train():
    model = _model(drop_path_rate=0.5)
    nodrop = _model(drop_path_rate=0.0)
    g, l = _crops()
    model.eval()
    nodrop.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(g), nodrop(g), rtol=0, atol=0)
    # Train mode, one block, written out as the official single-tensor reference (`_forward`).
    blk = model.blocks[0].train()
    x = torch.randn(B_G, 7, model.embed_dim)
    torch.manual_seed(3)
    (out,) = blk([x], [None])
    torch.manual_seed(3)
    s = max(int(B_G * 0.5), 1)
    i1 = torch.randperm(B_G)[:s]
    x_attn = torch.index_add(x, 0, i1, blk.ls1(blk.attn(blk.norm1(x[i1]))), alpha=B_G / s)
    i2 = torch.randperm(B_G)[:s]
    expected = torch.index_add(x_attn, 0, i2, blk.ls2(blk.mlp(blk.norm2(x_attn[i2]))),
                               alpha=B_G / s)
    torch.testing.assert_close(out, expected)
    untouched = [i for i in range(B_G) if i not in i1.tolist() and i not in i2.tolist()]
    for i in untouched:
        torch.testing.assert_close(out[i], x[i], rtol=0, atol=0)
    model.train()
    outs = model.forward_features_list([g, l], [None, None])
    assert outs[1]["x_norm_patchtokens"].shape == (B_L, 2, model.embed_dim)


def test_get_intermediate_layers_shapes():
    model = _model().eval()
    g, _ = _crops()
    D = model.embed_dim
    (last,) = model.get_intermediate_layers(g)
    assert last.shape == (B_G, 6, D)
    feats = model.get_intermediate_layers(g, n=2, reshape=True, return_class_token=True,
                                          return_extra_tokens=True)
    assert len(feats) == 2
    for patches, cls, extra in feats:
        assert patches.shape == (B_G, D, 2, 3)
        assert cls.shape == (B_G, D)
        assert extra.shape == (B_G, model.n_storage_tokens, D)
    # The last block, normed, is what forward_features returns.
    with torch.no_grad():
        ff = model.forward_features(g)
    torch.testing.assert_close(feats[-1][1], ff["x_norm_clstoken"])
    torch.testing.assert_close(feats[-1][0].flatten(2).transpose(1, 2), ff["x_norm_patchtokens"])
    (first,) = model.get_intermediate_layers(g, n=[0], norm=False)
    assert first.shape == (B_G, 6, D)


def test_local_cls_norm_only_on_local_crops_in_training():
    model = _model(untie_global_and_local_cls_norm=True, rope_rescale=None, drop_path_rate=0.0)
    with torch.no_grad():
        model.local_cls_norm.weight.fill_(3.0)
        model.local_cls_norm.bias.fill_(-1.0)
    g, l = _crops()
    prefix = 1 + model.n_storage_tokens
    model.train()
    with torch.no_grad():
        out_g, out_l = model.forward_features_list([g, l], [None, None])
        torch.testing.assert_close(out_l["x_norm_clstoken"],
                                   model.local_cls_norm(out_l["x_prenorm"][:, 0]))
        torch.testing.assert_close(out_l["x_storage_tokens"],
                                   model.local_cls_norm(out_l["x_prenorm"][:, 1:prefix]))
        torch.testing.assert_close(out_l["x_norm_patchtokens"],
                                   model.norm(out_l["x_prenorm"][:, prefix:]))
        torch.testing.assert_close(out_g["x_norm_clstoken"],
                                   model.norm(out_g["x_prenorm"][:, 0]))
        model.eval()
        out_g, out_l = model.forward_features_list([g, l], [None, None])
        torch.testing.assert_close(out_l["x_norm_clstoken"],
                                   model.norm(out_l["x_prenorm"][:, 0]))


def test_attn_impls_agree_and_flash_attn_is_explicit():
    from fastdino.layers.attn_backend import flash_attn_available
    g, _ = _crops()
    sdpa = _model(attn_impl="sdpa").eval()
    ref = _model(attn_impl="torch").eval()
    with torch.no_grad():
        torch.testing.assert_close(sdpa(g), ref(g), rtol=1e-5, atol=1e-5)
    if not flash_attn_available():
        with pytest.raises(ConfigError, match=r"'model.attn_impl' = 'flash_attn'.*installed"):
            vit_test(attn_impl="flash_attn")
    with pytest.raises(ValueError, match="attn_impl"):
        vit_test(attn_impl="xformers")


def test_activation_checkpointing_same_gradients():
    g, l = _crops()
    grads = []
    for ac in (False, True):
        model = _model(activation_checkpointing=ac, drop_path_rate=0.5).train()
        torch.manual_seed(5)
        outs = model.forward_features_list([g, l], [None, None])
        sum(o["x_norm_patchtokens"].square().sum() for o in outs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_build_backbone_overrides_and_errors():
    cfg = ModelConfig(arch="vit_test", embed_dim=48, depth=3, num_heads=3, ffn_layer="swiglu",
                      ffn_ratio=6.0, n_storage_tokens=0, qkv_bias=False, drop_path_rate=0.1,
                      norm_eps=1e-6, untie_global_and_local_cls_norm=True)
    model = build_backbone(cfg)
    assert (model.embed_dim, model.n_blocks, model.num_heads) == (48, 3, 3)
    assert model.n_storage_tokens == 0 and "storage_tokens" not in model.state_dict()
    blk = model.blocks[0]
    assert blk.mlp.w1.out_features == 192  # align_up(int(48*6*2/3), 8)
    assert blk.attn.qkv.bias is None and "blocks.0.attn.qkv.bias_mask" not in model.state_dict()
    assert blk.sample_drop_ratio == 0.1 and model.norm.eps == 1e-6
    assert model.local_cls_norm is not None
    out = model.eval().forward_features(torch.randn(2, 3, 32, 32))
    assert out["x_storage_tokens"].shape == (2, 0, 48)
    default = build_backbone(ModelConfig(arch="vit_test"))
    assert (default.embed_dim, default.n_blocks, default.num_heads) == (32, 2, 2)
    with pytest.raises(ValueError, match="vit_small"):
        build_backbone(ModelConfig(arch="vit_gigantic"))
