"""ConvNeXt distillation students (fastdino/models/convnext.py): the official parameter layout (so
the released dinov3_convnext_* weights load and an exported student loads in the official code),
CLS and patch tokens on the teacher's patch grid, the layer-wise decay numbering, the config
rules, a distillation run from a ViT teacher that exports (official layout, Hugging Face) and
evaluates, and the Hugging Face DINOv3ConvNextModel names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_distillation import STEP, teacher_run  # noqa: F401 - the ViT teacher run fixture
from test_trainer_step import SMALL, SMOKE

from fastdino.config import ConfigError, load_config
from fastdino.models.convnext import CONVNEXT_ARCHS, build_convnext
from fastdino.param_groups import build_param_groups, layer_id

CNX = ["model.arch=convnext_test", "model.depth=null", "model.embed_dim=null",
       "model.num_heads=null"]


def test_convnext_tiny_has_the_official_layout():
    m = build_convnext("convnext_tiny", device="meta")
    sd = m.state_dict()
    depths, dims = CONVNEXT_ARCHS["convnext_tiny"]
    # the official module tree: stem (conv, LN), downsamplings (LN, conv), stages of blocks
    assert sd["downsample_layers.0.0.weight"].shape == (96, 3, 4, 4)
    assert sd["downsample_layers.0.1.weight"].shape == (96,)
    assert sd["downsample_layers.1.0.weight"].shape == (96,)
    assert sd["downsample_layers.1.1.weight"].shape == (192, 96, 2, 2)
    assert sd["stages.2.8.dwconv.weight"].shape == (384, 1, 7, 7)
    assert sd["stages.3.2.pwconv1.weight"].shape == (3072, 768)
    assert sd["stages.3.2.pwconv2.weight"].shape == (768, 3072)
    assert sd["stages.0.0.gamma"].shape == (96,) and sd["norm.weight"].shape == (768,)
    block = [d * 49 + d + 2 * d + 4 * d * d + 4 * d + 4 * d * d + d + d for d in dims]
    want = (3 * 96 * 16 + 96 + 2 * 96 + sum(n * b for n, b in zip(depths, block, strict=True))
            + sum(2 * dims[i] + 4 * dims[i] * dims[i + 1] + dims[i + 1] for i in range(3))
            + 2 * dims[-1])
    assert sum(v.numel() for v in sd.values()) == want
    assert (m.embed_dim, m.n_blocks, m.patch_size) == (768, 18, 16)


def test_tokens_are_the_last_map_on_the_patch_grid():
    torch.manual_seed(0)
    m = build_convnext("convnext_test").eval()
    x = torch.randn(2, 3, 96, 96)  # map 3 x 3 (stride 32), patch grid 6 x 6 (16 px)
    with torch.no_grad():
        out = m.forward_features(x)
        fmap = m._map(x)
        grid = F.interpolate(fmap, size=(6, 6), mode="bilinear", align_corners=False)
        want = m.norm(torch.cat([fmap.mean((-2, -1))[:, None], grid.flatten(2).mT], 1))
        torch.testing.assert_close(out["x_norm_clstoken"], want[:, 0])
        torch.testing.assert_close(out["x_norm_patchtokens"], want[:, 1:])
        assert out["x_storage_tokens"].shape == (2, 0, 48)
        # the dense evaluations' form: the same tokens as a [B, D, h, w] map
        (dense,) = m.get_intermediate_layers(x, n=1, reshape=True, norm=True)
        assert dense.shape == (2, 48, 6, 6)
        torch.testing.assert_close(dense.flatten(2).mT, out["x_norm_patchtokens"])
        # the training call: a list of crops, unmasked
        g, loc = m([x, x[:, :, :32, :32]], [None, None], is_training=True)
        torch.testing.assert_close(g["x_norm_clstoken"], out["x_norm_clstoken"])
        assert loc["x_norm_patchtokens"].shape == (2, 4, 48)
    with pytest.raises(ValueError, match="not masked"):
        m.forward_features(x, torch.zeros(2, 36, dtype=torch.bool))


def test_layerwise_decay_counts_the_blocks_of_all_stages():
    depths = (3, 3, 9, 3)
    assert layer_id("downsample_layers.0.0.weight", 18, depths) == 0  # the stem: layer 0
    assert layer_id("stages.0.0.gamma", 18, depths) == 1
    assert layer_id("downsample_layers.1.1.weight", 18, depths) == 4  # with stage 1's first
    assert layer_id("stages.1.0.dwconv.weight", 18, depths) == 4
    assert layer_id("stages.3.2.pwconv2.bias", 18, depths) == 18
    assert layer_id("norm.weight", 18, depths) == 19
    from fastdino.meta_arch import Student
    from fastdino.models import build_head

    cfg = load_config(SMOKE, SMALL)  # (the heads' sizes only)
    backbone = build_convnext("convnext_test")
    student = Student(backbone, build_head(cfg.dino.head, 48), build_head(cfg.ibot.head, 48))
    groups = build_param_groups(student, backbone.n_blocks, 0.5, 0.2)
    mult = {n: g["lr_multiplier"] for g in groups for n in g["names"]}
    assert mult["backbone.stages.0.0.pwconv1.weight"] == 0.5 ** 4  # 4 blocks: 1 -> 0.5^(5-1)
    assert mult["backbone.stages.3.0.pwconv1.weight"] == 0.5
    assert mult["backbone.norm.weight"] == mult["dino_head.mlp.0.weight"] == 1.0


def test_config_rules_name_the_key():
    with pytest.raises(ConfigError, match="model.arch.*unless distillation.enabled"):
        load_config(SMOKE, [*SMALL, *CNX])
    distill = ["distillation.enabled=true", "distillation.teacher=t"]
    with pytest.raises(ConfigError, match="model.embed_dim.*null for model.arch=convnext_test"):
        load_config(SMOKE, [*SMALL, *CNX, "model.embed_dim=64", *distill])
    with pytest.raises(ConfigError, match="optim.lora_rank.*0 for a ConvNeXt"):
        load_config(SMOKE, [*SMALL, *CNX, *distill, "optim.lora_rank=4"])
    with pytest.raises(ConfigError, match="model.compile.*false for model.arch"):
        load_config(SMOKE, [*SMALL, *CNX, *distill, "model.compile=true"])


def test_a_convnext_student_distils_from_a_vit_teacher_and_evaluates(tmp_path,
                                                                     teacher_run):  # noqa: F811
    from fastdino.eval.weights import load_eval_backbone
    from fastdino.export import export_hf
    from fastdino.train import Trainer

    out = tmp_path / "run"
    cfg = load_config(SMOKE, [*SMALL, *CNX, *STEP, "distillation.enabled=true",
                              f"distillation.teacher={teacher_run}", f"train.output_dir={out}",
                              "train.resume=none", "train.max_iterations=2", "train.log_every=1",
                              "model.drop_path_rate=0.1"])
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.arch.student.backbone.state_dict().items()}
    history = trainer.train()
    assert [h["iteration"] for h in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["total_loss"])) and h["ibot_loss"] > 0
               for h in history)
    after = trainer.arch.student.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it learned
    # the run's exported teacher (the student's EMA) is what evaluation loads, by the run's config
    backbone, info = load_eval_backbone(out, device="cpu")
    assert info.arch.startswith("convnext-D48-L4-p16")
    ema = trainer.arch.teacher.backbone
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(x)["x_norm_clstoken"],
                                   ema.eval().forward_features(x)["x_norm_clstoken"])
    # Hugging Face: a DINOv3ConvNextModel folder whose CLS (pooler output) is ours, and which
    # fastdino evaluates again
    pytest.importorskip("transformers", reason="the Hugging Face export is the interop extra")
    import transformers

    export_hf(out, tmp_path / "hf")
    hf = transformers.DINOv3ConvNextModel.from_pretrained(tmp_path / "hf").eval()
    again, info = load_eval_backbone(tmp_path / "hf", device="cpu")
    assert "dinov3_convnext" in info.source
    with torch.no_grad():
        want = ema.forward_features(x)["x_norm_clstoken"]
        torch.testing.assert_close(hf(pixel_values=x).pooler_output, want)
        torch.testing.assert_close(again.forward_features(x)["x_norm_clstoken"], want)
    # the exported file in the official layout: the official ConvNeXt also registers its final
    # norm as norms[3], so its state dict (and the released weights) hold it twice
    official = build_convnext("convnext_test")
    official.norms = torch.nn.ModuleList([torch.nn.Identity()] * 3 + [official.norm])
    sd = torch.load(out / "teacher_backbone.pth", weights_only=True)
    official.load_state_dict(sd, strict=True)
    torch.testing.assert_close(sd["norms.3.weight"], sd["norm.weight"])
    # ... and such a file loads back here (the alias dropped), but not with two different norms
    from fastdino.models.state_dict_io import load_backbone_state_dict
    mine = build_convnext("convnext_test")
    load_backbone_state_dict(mine, official.state_dict())
    torch.testing.assert_close(mine.norm.weight, official.norm.weight)
    sd["norms.3.weight"] = sd["norms.3.weight"] + 1
    with pytest.raises(ValueError, match="norms.3.weight differs from norm.weight"):
        load_backbone_state_dict(mine, sd)


def test_hugging_face_names_cover_every_parameter_both_ways():
    transformers = pytest.importorskip("transformers", reason="the interop extra")
    from fastdino.models.hf_convnext import (
        from_hf_convnext_state_dict,
        hf_convnext_config_from_backbone,
        to_hf_convnext_state_dict,
    )

    ours = build_convnext("convnext_test")
    hf = transformers.DINOv3ConvNextModel(hf_convnext_config_from_backbone(ours))
    hf_sd = to_hf_convnext_state_dict(ours.state_dict())
    assert set(hf_sd) == set(hf.state_dict())  # every HF parameter, none left over
    hf.load_state_dict(hf_sd, strict=True)
    back = from_hf_convnext_state_dict(hf.state_dict())
    assert set(back) == set(ours.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    # patch size 32: our patch grid is the map, so the patch tokens match too
    ours32 = build_convnext("convnext_test")
    ours32.patch_size = 32
    ours32.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = ours32.eval().forward_features(x)
        want = torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1)
        torch.testing.assert_close(hf.eval()(pixel_values=x).last_hidden_state, want)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_convnext("convnext_test", drop_path_rate=0.0).train()
    ckpt = build_convnext("convnext_test", activation_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for m in (plain, ckpt):
        out = m.forward_features(x)
        (out["x_norm_clstoken"].square().sum() + out["x_norm_patchtokens"].sum()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)
    # and it recomputes: the checkpointed forward keeps no block activations for the backward
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        ckpt.forward_features(x)["x_norm_clstoken"].sum()
    n_ckpt = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        plain.forward_features(x)["x_norm_clstoken"].sum()
    assert n_ckpt < sum(saved) / 2
