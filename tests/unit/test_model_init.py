"""Meta-device build + NaN fill + init_weights, official key names and parameter counts."""

import math
import re

import pytest
import torch

from fastdino.config import HeadConfig
from fastdino.models import (
    DINOHead,
    build_head,
    vit_7b,
    vit_base,
    vit_small,
    vit_small_plus,
    vit_test,
)


def _nan_init(module):
    module.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.fill_(float("nan"))
    module.init_weights()
    return module


@pytest.mark.parametrize("kw", [
    {},
    {"ffn_layer": "swiglu64", "qkv_bias": False, "untie_global_and_local_cls_norm": True},
    {"n_storage_tokens": 0, "mask_k_bias": False},
], ids=["mlp", "7b_like", "no_registers"])
def test_no_nan_survives_init(kw):
    model = _nan_init(vit_test(device="meta", **kw))
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert not torch.isnan(t).any(), f"{name} was not initialised by init_weights()"


def test_init_values_follow_the_spec():
    torch.manual_seed(0)
    model = _nan_init(vit_test(device="meta"))
    sd = model.state_dict()
    D, d_h = model.embed_dim, model.embed_dim // model.num_heads
    assert torch.equal(sd["mask_token"], torch.zeros(1, D))
    assert torch.equal(sd["blocks.0.ls1.gamma"], torch.full((D,), 1e-5))
    assert torch.equal(sd["blocks.1.norm2.weight"], torch.ones(D))
    assert torch.equal(sd["norm.bias"], torch.zeros(D))
    assert torch.equal(sd["blocks.0.attn.qkv.bias"], torch.zeros(3 * D))
    assert torch.equal(sd["blocks.0.attn.qkv.bias_mask"],
                       torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)]))
    periods = 100.0 ** (2 * torch.arange(d_h // 4) / (d_h // 2))
    torch.testing.assert_close(sd["rope_embed.periods"], periods)
    bound = math.sqrt(1 / (3 * 16 * 16))
    for k in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert sd[k].abs().max() <= bound and sd[k].abs().max() > 0.5 * bound
    w = sd["blocks.0.mlp.fc1.weight"]
    assert abs(w.std().item() - 0.02) < 0.004
    assert abs(sd["cls_token"].std().item() - 0.02) < 0.01


def test_vit_small_state_dict_keys_are_the_official_ones():
    # Written from SPEC.md §4, not from the code.
    per_block = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.qkv.bias_mask",
        "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma",
    ]
    expected = {"cls_token": (1, 1, 384), "storage_tokens": (1, 4, 384), "mask_token": (1, 384),
                "patch_embed.proj.weight": (384, 3, 16, 16), "patch_embed.proj.bias": (384,),
                "rope_embed.periods": (16,), "norm.weight": (384,), "norm.bias": (384,)}
    shapes = {"attn.qkv.weight": (1152, 384), "attn.qkv.bias": (1152,),
              "attn.qkv.bias_mask": (1152,), "attn.proj.weight": (384, 384),
              "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,),
              "mlp.fc2.weight": (384, 1536)}
    for i in range(12):
        for k in per_block:
            expected[f"blocks.{i}.{k}"] = shapes.get(k, (384,))
    sd = vit_small(device="meta").state_dict()
    assert set(sd) == set(expected)
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k


def test_vit_7b_keys_have_swiglu_no_qkv_bias_and_local_cls_norm():
    sd = vit_7b(device="meta").state_dict()
    assert "blocks.0.attn.qkv.bias" not in sd and "blocks.0.attn.qkv.bias_mask" not in sd
    assert tuple(sd["blocks.39.mlp.w1.weight"].shape) == (8192, 4096)
    assert tuple(sd["blocks.39.mlp.w3.weight"].shape) == (4096, 8192)
    assert tuple(sd["rope_embed.periods"].shape) == (32,)
    assert {"local_cls_norm.weight", "local_cls_norm.bias"} <= set(sd)
    assert not any(re.search(r"fc[12]|pos_embed|register_tokens", k) for k in sd)


@pytest.mark.parametrize("factory, millions", [
    (vit_small, 21.6), (vit_small_plus, 28.7), (vit_base, 85.7), (vit_7b, 6716.0)])
def test_parameter_counts(factory, millions):
    model = factory(device="meta")  # no memory allocated
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - millions) / millions < 0.01, f"{factory.__name__}: {n:.2f}M"


def test_dino_head_keys_shapes_and_normalisation():
    torch.manual_seed(0)
    head = build_head(HeadConfig(n_prototypes=50, hidden_dim=64, bottleneck_dim=16), 32)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "mlp.0.weight": (64, 32), "mlp.0.bias": (64,), "mlp.2.weight": (64, 64),
        "mlp.2.bias": (64,), "mlp.4.weight": (16, 64), "mlp.4.bias": (16,),
        "last_layer.weight": (50, 16)}
    x = torch.randn(5, 32)
    z = head(x, no_last_layer=True)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(head(x), head(z, only_last_layer=True))
    assert head(x).shape == (5, 50)
    assert head.last_layer.bias is None


def test_dino_head_weight_norm_variant():
    head = _nan_init(DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16, nlayers=2,
                              weight_norm_last_layer=True, device="meta"))
    sd = head.state_dict()
    assert set(sd) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                       "last_layer.weight_g", "last_layer.weight_v"}
    assert torch.equal(sd["last_layer.weight_g"], torch.ones(50, 1))
    assert head.last_layer.weight_g.requires_grad  # trains and is EMA'd, as in DINOv2
    for name, t in head.named_parameters():
        assert not torch.isnan(t).any(), name
    z = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    logits = head(z, only_last_layer=True)
    assert logits.abs().max() <= 1.0 + 1e-5  # unit-norm prototypes against unit-norm inputs


def test_dino_head_nan_init():
    head = _nan_init(DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16, device="meta"))
    for name, t in head.named_parameters():
        assert not torch.isnan(t).any(), name
