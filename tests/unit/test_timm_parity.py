"""Output parity with timm's DINOv3 models (`timm.models.eva.Eva`) through
fastdino.models.timm_convert, both ways, and the registry table checked against timm itself.

Weights are perturbed everywhere (LayerScale 0.7, LayerNorm gains in [0.5, 1.5], biases and
matrices N(0, 0.1)) so that every block matters; both models run in fp32 eval.
"""

from __future__ import annotations

import pytest
import torch
from timm_helpers import import_timm

from fastdino.layers.ffn_layers import ffn_for_width
from fastdino.models.state_dict_io import load_backbone_state_dict
from fastdino.models.timm_convert import (
    TIMM_DINOV3_ARCHS,
    backbone_from_timm_config,
    from_timm_state_dict,
    timm_config_from_backbone,
    to_timm_state_dict,
)
from fastdino.models.vision_transformer import DinoVisionTransformer


@pytest.fixture(scope="module")
def timm():
    return import_timm()


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and not name.endswith("bias"):
                p.uniform_(0.5, 1.5)  # LayerScale, LayerNorm gains
            else:
                p.normal_(0.0, 0.1)


def _ours(ffn_layer: str, **extra) -> DinoVisionTransformer:
    model = DinoVisionTransformer(embed_dim=64, depth=2, num_heads=4, ffn_layer=ffn_layer,
                                  ffn_ratio=4.0, layerscale_init=0.7, **extra).eval()
    _perturb(model)
    return model


def _assert_same_tokens(timm_model, ours, H=64, W=96) -> None:
    """timm's forward_features is the normed [CLS, registers, patches]; its pooled output (the
    exported global_pool "token") is the CLS token."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        ref = timm_model.forward_features(x)
        pooled = timm_model(x)
        out = ours.forward_features(x)
    n = 1 + ours.n_storage_tokens
    torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, n:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["x_norm_clstoken"], pooled, rtol=1e-5, atol=1e-5)
    assert ref.shape[1] == n + (H // 16) * (W // 16)


CASES = {
    "mlp": ("mlp", {}),
    "swiglu": ("swiglu", {}),
    "7b_like": ("swiglu64", {"qkv_bias": False, "n_storage_tokens": 2}),
}


@pytest.mark.parametrize("case", CASES)
def test_ours_to_timm_output_parity(timm, case):
    ffn_layer, extra = CASES[case]
    ours = _ours(ffn_layer, **extra)
    cfg = timm_config_from_backbone(ours)
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    model.load_state_dict(to_timm_state_dict(ours.state_dict()), strict=True)
    _assert_same_tokens(model, ours)


def test_a_wrong_mapping_is_seen(timm):
    """The comparison above fails when two tensors are swapped (q / v bias, LayerScales)."""
    ours = _ours("mlp")
    cfg = timm_config_from_backbone(ours)
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    sd = to_timm_state_dict(ours.state_dict())
    for a, b in (("blocks.0.attn.q_bias", "blocks.0.attn.v_bias"),
                 ("blocks.1.gamma_1", "blocks.1.gamma_2")):
        wrong = dict(sd, **{a: sd[b], b: sd[a]})
        model.load_state_dict(wrong, strict=True)
        with pytest.raises(AssertionError):
            _assert_same_tokens(model, ours)


@pytest.mark.parametrize("name", [
    "vit_small_patch16_dinov3",  # no qkv bias: also loaded into a backbone that has them
    "vit_small_plus_patch16_dinov3_qkvb",
])
def test_timm_to_ours_output_parity(timm, name):
    small = dict(embed_dim=64, depth=2, num_heads=4, init_values=0.7)
    model = timm.create_model(name, pretrained=False, global_pool="token", **small).eval()
    _perturb(model)
    # built from the timm config, and (first case) a backbone with qkv biases: timm's non-_qkvb
    # models are the released weights with all-zero biases, restored as zeros
    for extra in ({}, {"qkv_bias": True}):
        ours = backbone_from_timm_config({"architecture": name, "model_args": small}, **extra)
        load_backbone_state_dict(ours, model.state_dict())
        _assert_same_tokens(model, ours.eval())


def test_round_trip_is_exact():
    ours = _ours("swiglu")
    sd = ours.state_dict()
    back = from_timm_state_dict(to_timm_state_dict(sd))
    dropped = {"mask_token", "rope_embed.periods"}
    assert set(back) == {k for k in sd if not k.endswith("bias_mask")} - dropped
    for k, v in back.items():
        expected = sd[k] * sd[k.replace(".bias", ".bias_mask")] if k.endswith("qkv.bias") else sd[k]
        torch.testing.assert_close(v, expected, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", sorted(TIMM_DINOV3_ARCHS))
def test_registry_matches_timm(timm, name):
    """Each registered timm DINOv3 model and our backbone built from its name hold the same
    tensors under the conversion (so released timm weights load strictly)."""
    model = timm.create_model(name, pretrained=False, device="meta")
    ours = backbone_from_timm_config({"architecture": name}, device="meta")
    converted = to_timm_state_dict(ours.state_dict())
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == theirs
    # and the export names it back to the same registry entry
    assert timm_config_from_backbone(ours)["architecture"] == name


def test_conversion_errors():
    with pytest.raises(ValueError, match="learned position embedding"):
        to_timm_state_dict({"pos_embed": torch.zeros(1, 5, 8)})
    ours = _ours("mlp", mask_k_bias=False)  # an unmasked, non-zero key bias
    with pytest.raises(ValueError, match="unmasked non-zero key bias"):
        to_timm_state_dict(ours.state_dict())
    with pytest.raises(ValueError, match=r"'vit_base_patch16_224' is not a DINOv3 model"):
        backbone_from_timm_config({"architecture": "vit_base_patch16_224"})
    cfg = timm_config_from_backbone(_ours("mlp"), mean=(0.43, 0.41, 0.3), std=(0.2, 0.2, 0.2))
    assert cfg["pretrained_cfg"]["mean"] == [0.43, 0.41, 0.3]  # e.g. the satellite statistics
    with pytest.raises(ValueError, match="LayerNorm eps"):
        timm_config_from_backbone(_ours("mlp", norm_eps=1e-6))
    with pytest.raises(ValueError, match="width of 100 is not reachable"):
        ffn_for_width(64, 100, gated=True, aligns=(64,))


def test_released_layout_loads_as_weights(timm, tmp_path):
    """What the hub holds for timm/vit_small_patch16_dinov3.lvd1689m (config.json naming the
    architecture, model.safetensors in timm names, no qkv biases) loads as --weights, as a folder
    and as a bare file with --arch vit_small (whose qkv biases are then restored as zeros)."""
    import json

    from safetensors.torch import save_file

    from fastdino.eval.weights import load_eval_backbone

    name = "vit_small_patch16_dinov3"
    model = timm.create_model(name, pretrained=False, global_pool="token").eval()
    _perturb(model)
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"architecture": name, "num_classes": 0, "num_features": 384,
         "pretrained_cfg": {"license": "dinov3-license"}}))
    for weights, arch in ((folder, None), (folder / "model.safetensors", "vit_small")):
        ours, info = load_eval_backbone(weights, arch=arch)
        assert (ours.blocks[0].attn.qkv.bias is not None) == (arch == "vit_small")
        _assert_same_tokens(model, ours, H=48, W=32)
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224"}))
    with pytest.raises(ValueError, match="allowed are timm's DINOv3 models"):
        load_eval_backbone(folder)


@pytest.mark.parametrize("name, registers", [("vit_small_patch14_dinov2", 0),
                                             ("vit_small_patch14_reg4_dinov2", 4)])
def test_dinov2_export_loads_in_timm(timm, name, registers):
    """A DINOv2-architecture backbone exports the official DINOv2 names (no --format timm: timm's
    own checkpoint filter for its vit_*_patch14_dinov2 models reads them), as the README says."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    from fastdino.models.state_dict_io import to_dinov2_names

    ours = _dinov2_backbone(registers)
    _perturb(ours)
    model = timm.create_model(name, pretrained=False, img_size=56, embed_dim=64, depth=2,
                              num_heads=4).eval()
    model.load_state_dict(checkpoint_filter_fn(to_dinov2_names(ours.state_dict()), model),
                          strict=True)
    _assert_dinov2_parity(model, ours, registers)


def _dinov2_backbone(registers: int, ffn: str = "mlp") -> DinoVisionTransformer:
    """A small DINOv2-architecture backbone (patch 14, learned positions on a 4 x 4 grid), with
    the resize rule of timm's / the official register models."""
    return DinoVisionTransformer(
        embed_dim=64, depth=2, num_heads=4, patch_size=14, pos_embed="learned", pos_embed_grid=4,
        n_storage_tokens=registers, mask_k_bias=False, norm_eps=1e-6, ffn_layer=ffn,
        ffn_ratio=4.0 if ffn == "mlp" else 132 / 64, layerscale_init=0.7,
        interpolate_offset=0.0 if registers else 0.1, interpolate_antialias=bool(registers),
    ).eval()


def _assert_dinov2_parity(model, ours, registers: int) -> None:
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = model.forward_features(x)
        out = ours.forward_features(x)
    torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, 1 + registers:], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("name, ffn", [("vit_small_patch14_reg4_dinov2", "mlp"),
                                       ("vit_giant_patch14_reg4_dinov2", "swiglu"),
                                       ("vit_small_patch14_dinov2", "mlp")])
def test_timm_dinov2_weights_load(timm, name, ffn):
    """timm's DINOv2 models into a DINOv2-architecture backbone: the register models' folded CLS
    position and (ViT-g) packed SwiGLU unfold exactly; the others are the official names."""
    registers = 4 if "reg4" in name else 0
    small = dict(img_size=56, embed_dim=64, depth=2, num_heads=4)
    if ffn == "swiglu":
        small["mlp_ratio"] = 2.75  # packed [gate; up] of 2 x 88: a multiple of 8, as ours
    model = timm.create_model(name, pretrained=False, **small).eval()
    _perturb(model)
    ours = _dinov2_backbone(registers, ffn)
    load_backbone_state_dict(ours, model.state_dict())
    _assert_dinov2_parity(model, ours, registers)
