"""Output parity with Hugging Face `DINOv3ViTModel` through fastdino.models.hf_convert.

A small random HF model (nothing downloaded), every weight perturbed so that no block is close to
the identity (LayerScale 1e-5 would hide a wrong mapping), converted to ours; both run in fp32 eval.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the `interop` extra")

from fastdino.models.hf_convert import (  # noqa: E402
    backbone_from_hf_config,
    from_hf_state_dict,
    hf_config_from_backbone,
    to_hf_state_dict,
)
from fastdino.models.state_dict_io import load_backbone_state_dict  # noqa: E402
from fastdino.models.vision_transformer import DinoVisionTransformer  # noqa: E402


def _random_hf_model(gated: bool, seed: int = 0):
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=64, intermediate_size=96 if gated else 128, num_hidden_layers=2,
        num_attention_heads=4, num_register_tokens=4, use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu", layerscale_value=1e-5, layer_norm_eps=1e-5,
        rope_theta=100.0, image_size=64, patch_size=16)
    torch.manual_seed(seed)
    model = transformers.DINOv3ViTModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1") or (name.endswith(".weight") and p.ndim == 1):
                p.uniform_(0.5, 1.5)  # layer scales, LayerNorm gains
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_hf_to_ours_output_parity(gated):
    hf = _random_hf_model(gated)
    ours = backbone_from_hf_config(hf.config)
    load_backbone_state_dict(ours, from_hf_state_dict(hf.state_dict(), hf.config))
    ours.eval()
    n = 1 + hf.config.num_register_tokens
    torch.manual_seed(1)
    for H, W in ((64, 64), (64, 96)):  # square, and non-square (4x6 patches)
        x = torch.randn(2, 3, H, W)
        with torch.no_grad():
            ref = hf(pixel_values=x).last_hidden_state  # normed [CLS, registers, patches]
            out = ours.forward_features(x)
        torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["x_storage_tokens"], ref[:, 1:n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, n:], rtol=1e-5, atol=1e-5)
        assert out["x_norm_patchtokens"].shape[1] == (H // 16) * (W // 16)


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_hf_state_dict_round_trip(gated):
    hf = _random_hf_model(gated)
    hf_sd = hf.state_dict()
    back = to_hf_state_dict(from_hf_state_dict(hf_sd, hf.config))
    assert set(back) == set(hf_sd)
    for k in hf_sd:
        torch.testing.assert_close(back[k], hf_sd[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("ffn_layer, extra", [
    ("mlp", {}),
    ("swiglu", {}),
    ("swiglu64", {"qkv_bias": False, "n_storage_tokens": 0}),  # 7B-like: no qkv bias
    ("mlp", {"mask_k_bias": False}),  # unmasked key bias (HF key_bias=True)
], ids=["mlp", "swiglu", "7b_like", "k_bias"])
def test_ours_to_hf_parity_and_round_trip(ffn_layer, extra):
    torch.manual_seed(0)
    ours = DinoVisionTransformer(embed_dim=64, depth=2, num_heads=4, ffn_layer=ffn_layer,
                                 ffn_ratio=4.0, layerscale_init=0.7,
                                 **{"n_storage_tokens": 4, **extra}).eval()
    with torch.no_grad():  # non-trivial weights everywhere, including the (masked) k bias
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = ours.state_dict()
    hf = transformers.DINOv3ViTModel(hf_config_from_backbone(ours)).eval()
    hf.load_state_dict(to_hf_state_dict(sd), strict=True)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).pooler_output, ours(x),
                                   rtol=1e-5, atol=1e-5)
    back = from_hf_state_dict(to_hf_state_dict(sd), hf.config)
    assert set(back) == set(sd)
    load_backbone_state_dict(backbone_from_hf_config(hf.config), back)  # same architecture
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias") and k + "_mask" in sd:  # masked k third returns as zero
            v = v * sd[k + "_mask"]
        torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)


def test_load_backbone_state_dict_layouts_and_errors():
    torch.manual_seed(0)
    a = DinoVisionTransformer(embed_dim=32, depth=1, num_heads=2)
    b = DinoVisionTransformer(embed_dim=32, depth=1, num_heads=2)
    teacher = {f"backbone.{k}": v for k, v in a.state_dict().items()}
    teacher["dino_head.last_layer.weight"] = torch.zeros(3, 3)
    load_backbone_state_dict(b, {"teacher": teacher})
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)

    bad = dict(a.state_dict())
    del bad["cls_token"]
    bad["extra.weight"] = torch.zeros(1)
    bad["norm.weight"] = torch.zeros(5)
    with pytest.raises(ValueError) as e:
        load_backbone_state_dict(b, bad)
    msg = str(e.value)
    assert "missing keys (1): cls_token" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "norm.weight: file (5,) vs model (32,)" in msg
