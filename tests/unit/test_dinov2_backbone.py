"""DINOv2 backbones (SPEC.md §2.6; model.arch dinov2_*): the learned position embedding's resize
(the official offset rule and the plain size rule), output parity with Hugging Face's Dinov2Model
through DINOv2's checkpoint names, and those names (registers, fused SwiGLU, chunked blocks) read
and written."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdino.config import ConfigError, load_config
from fastdino.layers.pos_embed import interpolate_pos_embed
from fastdino.models import build_backbone
from fastdino.models.state_dict_io import (
    from_dinov2_names,
    load_backbone_state_dict,
    to_dinov2_names,
)

DINOV2 = ["model.arch=dinov2_vits14", "model.patch_size=14", "model.mask_k_bias=false",
          "model.n_storage_tokens=0", "model.norm_eps=1e-6", "crops.local_crops_size=98"]


def test_interpolation_follows_the_official_rules():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 5 * 5, 8)
    assert interpolate_pos_embed(pe, 5, 5) is pe  # the trained grid: untouched
    out = interpolate_pos_embed(pe, 3, 7, offset=0.1)
    grid = pe[:, 1:].reshape(1, 5, 5, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(3.1 / 5, 7.1 / 5), mode="bicubic")
    assert out.shape == (1, 1 + 21, 8) and torch.equal(out[:, 0], pe[:, 0])
    torch.testing.assert_close(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 21, 8))
    by_size = interpolate_pos_embed(pe, 3, 7, offset=0.0)
    want = F.interpolate(grid, size=(3, 7), mode="bicubic")
    torch.testing.assert_close(by_size[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 21, 8))
    assert (by_size - out).abs().max() > 1e-3  # the two rules do differ
    aa = interpolate_pos_embed(pe, 3, 7, offset=0.0, antialias=True)
    assert (aa - by_size).abs().max() > 1e-3


def _hf_to_dinov2(hf_sd: dict) -> dict:
    """HF Dinov2Model names -> DINOv2's own checkpoint names (what the hub .pth files hold)."""
    out = {"cls_token": hf_sd["embeddings.cls_token"],
           "mask_token": hf_sd["embeddings.mask_token"],
           "pos_embed": hf_sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": hf_sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": hf_sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": hf_sd["layernorm.weight"], "norm.bias": hf_sd["layernorm.bias"]}
    i = 0
    while f"encoder.layer.{i}.norm1.weight" in hf_sd:
        p, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for w in ("weight", "bias"):
                out[f"{b}{n}.{w}"] = hf_sd[f"{p}{n}.{w}"]
        for w in ("weight", "bias"):
            out[f"{b}attn.qkv.{w}"] = torch.cat([hf_sd[f"{p}attention.{x}_proj.{w}"]
                                                 for x in "qkv"])
            out[f"{b}attn.proj.{w}"] = hf_sd[f"{p}attention.o_proj.{w}"]
        out[f"{b}ls1.gamma"] = hf_sd[f"{p}layer_scale1.lambda1"]
        out[f"{b}ls2.gamma"] = hf_sd[f"{p}layer_scale2.lambda1"]
        i += 1
    return out


def test_output_parity_with_hugging_face_dinov2():
    transformers = pytest.importorskip("transformers", reason="transformers is the interop extra")
    hf_cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=128, image_size=56, patch_size=14,
                                       layer_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.Dinov2Model(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if p.ndim == 1 and "bias" not in name else p.normal_(0, 0.2)
    cfg = load_config(None, [*DINOV2, "model.embed_dim=32", "model.depth=2",
                             "model.num_heads=2", "model.pos_embed_grid=4",
                             "model.drop_path_rate=0"])
    ours = build_backbone(cfg.model).eval()
    load_backbone_state_dict(ours, _hf_to_dinov2(hf.state_dict()))  # strict
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state  # [CLS, patches], final layernorm
        got = ours.forward_features(x)
    torch.testing.assert_close(got["x_norm_clstoken"], ref[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["x_norm_patchtokens"], ref[:, 1:], rtol=1e-4, atol=1e-4)
    # another grid: HF resizes by size (offset 0, no antialias); ours does with offset 0
    ours.interpolate_offset = 0.0
    x = torch.randn(1, 3, 42, 70)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        got = ours.forward_features(x)["x_norm_patchtokens"]
    torch.testing.assert_close(got, ref[:, 1:], rtol=1e-4, atol=1e-4)


def test_dinov2_checkpoint_names_round_trip():
    cfg = load_config(None, [*DINOV2, "model.embed_dim=48", "model.depth=2", "model.num_heads=2",
                             "model.ffn_layer=swiglu", "model.n_storage_tokens=4",
                             "model.pos_embed_grid=4"])
    bb = build_backbone(cfg.model)
    sd = bb.state_dict()
    official = to_dinov2_names(sd)
    assert "register_tokens" in official and "storage_tokens" not in official
    w12 = official["blocks.0.mlp.w12.weight"]
    assert w12.shape[0] == 2 * sd["blocks.0.mlp.w1.weight"].shape[0]
    assert "blocks.0.mlp.w1.weight" not in official
    back = from_dinov2_names(official)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # an FSDP-chunked DINOv2 training checkpoint: blocks.<chunk>.<i>. with the global index
    chunked = {(f"blocks.0.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v
               for k, v in official.items()}
    fresh = build_backbone(cfg.model)
    load_backbone_state_dict(fresh, {"teacher": {f"backbone.{k}": v for k, v in chunked.items()}})
    assert all(torch.equal(fresh.state_dict()[k], sd[k]) for k in sd)


def test_config_rules_and_training_forward():
    with pytest.raises(ConfigError, match=r"model.patch_size.*14 for model.arch=dinov2_vitl14"):
        load_config(None, ["model.arch=dinov2_vitl14"])
    cfg = load_config("configs/dinov2_vits14.yaml", ["model.depth=1"])
    bb = build_backbone(cfg.model).train()
    g, loc = torch.randn(2, 3, 224, 224), torch.randn(2, 3, 98, 98)
    masks = torch.zeros(2, 16 * 16, dtype=torch.bool)
    masks[:, :5] = True
    out = bb([g, loc], [masks, None], is_training=True)
    assert out[0]["x_norm_patchtokens"].shape == (2, 256, 384)
    assert out[1]["x_norm_patchtokens"].shape == (2, 49, 384)
    # (a plain sum of LayerNorm outputs is constant: weight it)
    (out[1]["x_norm_patchtokens"] * torch.randn(2, 49, 384)).sum().backward()
    grad = bb.pos_embed.grad
    assert grad is not None and grad[:, 1:].abs().sum() > 0  # through the 98 px resize


def test_trainer_steps_and_export_with_the_dinov2_architecture(tmp_path):
    """A training run of a (tiny) DINOv2-architecture student: finite steps, the learned
    position table trains, and the export carries DINOv2's names, which load back strictly."""
    from test_trainer_step import make_trainer

    from fastdino.export import export_backbone

    trainer, batch = make_trainer(
        tmp_path, "model.arch=dinov2_vits14", "model.patch_size=14", "model.mask_k_bias=false",
        "model.n_storage_tokens=4", "model.embed_dim=32", "model.num_heads=2",
        "crops.global_crops_size=56", "crops.local_crops_size=28", "optim.warmup_epochs=0",
        "optim.lr=0.01")
    student = trainer.arch.student
    pe0 = student.backbone.pos_embed.detach().clone()
    v = trainer.step(0, batch)
    assert torch.isfinite(v["total_loss"])
    assert not torch.equal(student.backbone.pos_embed.detach(), pe0)
    trainer.save(1)
    (path,) = export_backbone(trainer.out, tmp_path / "teacher.pth")
    sd = torch.load(path, weights_only=True)
    assert "pos_embed" in sd and "register_tokens" in sd and "storage_tokens" not in sd
    fresh = build_backbone(trainer.cfg.model)
    load_backbone_state_dict(fresh, sd)
    t = trainer.arch.teacher.backbone.state_dict()
    assert all(torch.equal(fresh.state_dict()[k], t[k]) for k in t)


def test_eval_loader_builds_the_dinov2_arch_by_name(tmp_path):
    """`--arch dinov2_vits14` alone gives the DINOv2 architecture (its preset's fields), so a
    released DINOv2 file loads strictly with DINOv2's names."""
    from fastdino.eval.weights import load_eval_backbone

    cfg = load_config("configs/dinov2_vits14.yaml")
    bb = build_backbone(cfg.model)
    torch.save(to_dinov2_names(bb.state_dict()), tmp_path / "dinov2_vits14_pretrain.pth")
    model, info = load_eval_backbone(tmp_path / "dinov2_vits14_pretrain.pth",
                                     arch="dinov2_vits14")
    assert model.patch_size == 14 and "p14" in info.arch
    assert all(torch.equal(model.state_dict()[k], v) for k, v in bb.state_dict().items())


@pytest.mark.parametrize("registers", [0, 4])
def test_hugging_face_dinov2_export_and_import(tmp_path, registers):
    """`fastdino export --format hf` of a DINOv2-architecture run writes Dinov2Model (or
    Dinov2WithRegistersModel) whose outputs equal the teacher's at the trained grid; the folder
    loads back (--weights) to the same backbone, with HF's own resize rule off the grid."""
    transformers = pytest.importorskip("transformers", reason="transformers is the interop extra")
    from test_trainer_step import make_trainer

    from fastdino.cli import main
    from fastdino.eval.weights import load_eval_backbone

    trainer, _ = make_trainer(
        tmp_path / "run", "model.arch=dinov2_vits14", "model.patch_size=14",
        "model.mask_k_bias=false", f"model.n_storage_tokens={registers}", "model.embed_dim=32",
        "model.num_heads=2", "model.ffn_layer=swiglu", "model.pos_embed_grid=4",
        "model.layerscale_init=0.5", "crops.global_crops_size=56", "crops.local_crops_size=28")
    trainer.save(1)
    assert main(["export", "--run", str(trainer.out), "--out", str(tmp_path / "hf"),
                 "--format", "hf"]) == 0
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    hf = cls.from_pretrained(tmp_path / "hf").eval()
    bb = trainer.arch.teacher.backbone.eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = bb.forward_features(x)
        out = hf(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out[:, 0], ref["x_norm_clstoken"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, 1 + registers:], ref["x_norm_patchtokens"], rtol=1e-4,
                               atol=1e-4)
    back, info = load_eval_backbone(tmp_path / "hf")
    assert "Hugging Face" in info.source and back.n_storage_tokens == registers
    t = bb.state_dict()
    assert all(torch.equal(back.state_dict()[k], t[k]) for k in t)
    y = torch.randn(1, 3, 42, 70)  # off the grid: HF's size rule, which `back` was built with
    with torch.no_grad():
        want = hf(pixel_values=y).last_hidden_state[:, 1 + registers:]
        got = back.forward_features(y)["x_norm_patchtokens"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
