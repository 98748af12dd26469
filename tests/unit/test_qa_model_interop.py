"""Backbone presets and weight interop against the official DINOv3 layouts (hub backbones.py):
`--arch` builds the released layout, the training-only `local_cls_norm` does not block a load,
the hub's ViT-L+ exists, bad inputs are one-line errors, and Hugging Face parity holds for
intermediate layers at sizes that are not multiples of the patch."""

from __future__ import annotations

import pytest
import torch

from fastdino.eval.weights import load_eval_backbone, resolve_model_config
from fastdino.models import backbones
from fastdino.models.backbones import build_backbone, vit_test
from fastdino.models.state_dict_io import load_backbone_state_dict


def _perturbed(model, seed=0):
    """Every tensor random, LayerScale large, so a wrong or skipped key shows in the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("arch", ["vit_7b", "vit_small", "vit_huge_plus", "vit_large_plus"])
def test_eval_arch_builds_the_released_layout(arch):
    """--arch vit_7b once built qkv biases and no local_cls_norm (ModelConfig's defaults over the
    arch's official values): the released 7B file then failed with 82 key mismatches."""
    got = build_backbone(resolve_model_config(arch=arch), device="meta")
    official = getattr(backbones, arch)(device="meta")
    assert {k: v.shape for k, v in got.state_dict().items()} == {
        k: v.shape for k, v in official.state_dict().items()}


def test_vit_large_plus_is_the_hub_vitl16plus():
    """hubconf's dinov3_vitl16plus: D 1024, 24 blocks, 16 heads, SwiGLU ratio 6 align 8."""
    m = backbones.vit_large_plus(device="meta")
    blk = m.blocks[0]
    assert (m.embed_dim, m.n_blocks, m.num_heads, m.n_storage_tokens) == (1024, 24, 16, 4)
    assert blk.mlp.w1.out_features == 4096 and blk.mlp.align_to == 8
    assert blk.attn.qkv.bias is not None and hasattr(blk.attn.qkv, "bias_mask")
    assert m.local_cls_norm is None and m.norm.eps == 1e-5
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == 403.9


def test_sat_layout_loads_without_local_cls_norm(tmp_path, caplog):
    """The SAT ViT-L file holds local_cls_norm (training only): --arch vit_large once refused it
    as unexpected keys."""
    ref = _perturbed(vit_test(untie_global_and_local_cls_norm=True))
    torch.save(ref.state_dict(), tmp_path / "sat.pth")
    with caplog.at_level("INFO", logger="fastdino.models"):
        model, _ = load_eval_backbone(tmp_path / "sat.pth", arch="vit_test")
    assert model.local_cls_norm is None
    assert "local_cls_norm" in caplog.text and "dropped" in caplog.text
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)["x_norm_clstoken"],
                                   ref.forward_features(x)["x_norm_clstoken"], rtol=0, atol=0)


def test_weights_without_local_cls_norm_start_it_from_norm(caplog):
    """Hugging Face and timm files drop local_cls_norm; into a 7B-like backbone (which has one)
    the load once failed on the missing keys. Now it starts from the file's final norm."""
    src = _perturbed(vit_test())
    target = vit_test(untie_global_and_local_cls_norm=True)
    with caplog.at_level("INFO", logger="fastdino.models"):
        load_backbone_state_dict(target, src.state_dict())
    assert "no local_cls_norm" in caplog.text
    for p in ("weight", "bias"):
        torch.testing.assert_close(getattr(target.local_cls_norm, p), getattr(src.norm, p),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing keys"):  # anything else is still strict
        sd = {k: v for k, v in src.state_dict().items() if k != "norm.bias"}
        load_backbone_state_dict(vit_test(untie_global_and_local_cls_norm=True), sd)


@pytest.mark.parametrize("shape, masks, match", [
    ((1, 3, 8, 8), None, r"images have shape \(1, 3, 8, 8\).*patch size 16"),
    ((1, 1, 32, 32), None, r"expected \[B, 3, H, W\]"),
    ((3, 32, 32), None, r"images have shape \(3, 32, 32\)"),
    ((2, 3, 32, 32), torch.ones(2, 4, dtype=torch.long), "masks have dtype torch.int64"),
])
def test_bad_inputs_are_one_line_errors(shape, masks, match):
    model = vit_test().eval()
    with pytest.raises(ValueError, match=match):
        model.forward_features(torch.randn(shape), masks)


def test_hf_config_with_another_activation_is_refused():
    """fastdino's MLP is exact GELU and its SwiGLU uses SiLU: a Hugging Face config whose gated
    MLP says gelu would load but give other outputs."""
    transformers = pytest.importorskip("transformers", reason="transformers is the interop extra")
    from fastdino.models.hf_convert import backbone_from_hf_config

    cfg = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       use_gated_mlp=True, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act 'gelu'.*allowed is 'silu'"):
        backbone_from_hf_config(cfg)


@pytest.mark.parametrize("H, W", [(50, 83), (17, 100)])
def test_hf_parity_of_intermediate_layers_at_floored_sizes(H, W):
    """Both floor a side that is not a multiple of 16 (the convolution); get_intermediate_layers
    (normed, reshaped, with CLS and registers) equals HF's hidden states through its final norm."""
    transformers = pytest.importorskip("transformers", reason="transformers is the interop extra")
    from fastdino.models.hf_convert import hf_config_from_backbone, to_hf_state_dict
    from fastdino.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(0)
    ours = DinoVisionTransformer(embed_dim=64, depth=3, num_heads=4, ffn_layer="swiglu",
                                 ffn_ratio=6.0, layerscale_init=0.7).eval()
    _perturbed(ours)
    hf = transformers.DINOv3ViTModel(hf_config_from_backbone(ours)).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        states = hf(pixel_values=x, output_hidden_states=True).hidden_states  # embeddings + 3
        got = ours.get_intermediate_layers(x, n=[0, 2], reshape=True, return_class_token=True,
                                           return_extra_tokens=True)
        ref = [hf.norm(states[i + 1]) for i in (0, 2)]
    h, w = H // 16, W // 16
    for (patches, cls, regs), r in zip(got, ref, strict=True):
        assert patches.shape == (1, 64, h, w)
        torch.testing.assert_close(patches.flatten(2).transpose(1, 2), r[:, 5:],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cls, r[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(regs, r[:, 1:5], rtol=1e-5, atol=1e-5)


def test_untie_cls_and_patch_norms_is_the_official_option(tmp_path):
    """The official untie_cls_and_patch_norms: `cls_norm` normalises CLS + storage tokens, `norm`
    the patches, in eval and in get_intermediate_layers. Such weights once failed to load
    (unexpected cls_norm keys); they now load under --arch, and HF / timm exports refuse them."""
    from fastdino.models.hf_convert import hf_config_from_backbone
    from fastdino.models.timm_convert import timm_config_from_backbone, to_timm_state_dict

    ref = _perturbed(vit_test(untie_cls_and_patch_norms=True))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = ref.forward_features(x)
        (patches, cls), = ref.get_intermediate_layers(x, n=1, return_class_token=True)
    pre = out["x_prenorm"]
    torch.testing.assert_close(out["x_norm_clstoken"], ref.cls_norm(pre[:, 0]))
    torch.testing.assert_close(out["x_norm_patchtokens"], ref.norm(pre[:, 5:]))
    assert not torch.allclose(out["x_norm_clstoken"], ref.norm(pre[:, 0]), atol=1e-3)
    torch.testing.assert_close(cls, out["x_norm_clstoken"], rtol=0, atol=0)
    torch.testing.assert_close(patches, out["x_norm_patchtokens"], rtol=0, atol=0)

    torch.save(ref.state_dict(), tmp_path / "untied.pth")
    model, _ = load_eval_backbone(tmp_path / "untied.pth", arch="vit_test")
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)["x_norm_clstoken"],
                                   out["x_norm_clstoken"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="cls_norm"):
        to_timm_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="cls_norm"):
        timm_config_from_backbone(ref)
    pytest.importorskip("transformers", reason="transformers is the interop extra")
    with pytest.raises(ValueError, match="cls_norm"):
        hf_config_from_backbone(ref)


def test_hf_export_names_fit_transformers_4():
    """transformers 4.x (the interop extra allows >= 4.56) keeps DINOv3ViTModel's layers at the
    top (`layer.i`), 5.x under `model.`: the export once loaded 5.x names only, so every layer
    was missing on 4.x. A 4.x-shaped stand-in (the same modules, `layer` at the top) now takes
    the converted weights strictly and gives the backbone's outputs."""
    transformers = pytest.importorskip("transformers", reason="transformers is the interop extra")
    from fastdino.export import hf_names_of
    from fastdino.models.hf_convert import hf_config_from_backbone, to_hf_state_dict

    ours = _perturbed(vit_test())
    v5 = transformers.DINOv3ViTModel(hf_config_from_backbone(ours)).eval()

    class V4(torch.nn.Module):  # transformers 4.x's attribute layout of DINOv3ViTModel
        def __init__(self):
            super().__init__()
            self.embeddings, self.rope_embeddings = v5.embeddings, v5.rope_embeddings
            self.layer, self.norm = v5.model.layer, v5.norm

    v4 = V4()
    hf_sd = to_hf_state_dict(ours.state_dict())
    v4.load_state_dict(hf_names_of(v4, hf_sd), strict=True)
    assert hf_names_of(v5, hf_sd) == hf_sd  # 5.x: unchanged
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(v5(pixel_values=x).pooler_output, ours(x),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [0.0, None, -1e-5])
def test_layerscale_init_must_be_positive(value):
    """The official layerscale null / 0 means no LayerScale (Identity); fastdino always has one,
    so 0 silently zeroed every residual branch and None failed deep inside the init."""
    with pytest.raises(ValueError, match="layerscale_init = .* allowed is a float > 0"):
        vit_test(layerscale_init=value)
