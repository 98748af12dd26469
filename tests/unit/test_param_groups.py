"""Parameter groups of SPEC.md §3.3 on the real backbone + heads."""

import pytest

from fastdino.config import load_config
from fastdino.meta_arch import build_student
from fastdino.param_groups import build_param_groups, param_multipliers


def test_multipliers_by_name():
    L, lam, pe = 4, 0.9, 0.2
    m = lambda n: param_multipliers(n, L, lam, pe)  # noqa: E731
    assert m("backbone.patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.2 * lam ** 5)
    assert m("backbone.patch_embed.proj.bias")["wd_multiplier"] == 0.0
    for tok in ("cls_token", "storage_tokens", "mask_token"):  # layer 0 and weight decay ON
        assert m(f"backbone.{tok}") == {"lr_multiplier": pytest.approx(lam ** 5),
                                        "wd_multiplier": 1.0, "is_last_layer": False}
    assert m("backbone.blocks.0.attn.qkv.weight")["lr_multiplier"] == pytest.approx(lam ** 4)
    assert m("backbone.blocks.3.mlp.fc1.weight")["lr_multiplier"] == pytest.approx(lam ** 1)
    assert m("backbone.blocks.2.ls1.gamma")["wd_multiplier"] == 0.0
    assert m("backbone.blocks.2.norm1.weight")["wd_multiplier"] == 0.0
    assert m("backbone.norm.weight") == {"lr_multiplier": 1.0, "wd_multiplier": 0.0,
                                         "is_last_layer": False}
    assert m("dino_head.mlp.0.weight") == {"lr_multiplier": 1.0, "wd_multiplier": 1.0,
                                           "is_last_layer": False}
    assert m("ibot_head.last_layer.weight")["is_last_layer"] is True


def test_groups_cover_every_trainable_param_once():
    cfg = load_config("configs/smoke.yaml", [])
    student = build_student(cfg)
    groups = build_param_groups(student, student.backbone.n_blocks, 0.9, 0.2)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))  # fused: one group per distinct multiplier triple
    # depth 4: layers 0..5 x wd on/off, patch_embed separately, last layers
    last = [g for g in groups if g["is_last_layer"]]
    assert sorted(n for g in last for n in g["names"]) == ["dino_head.last_layer.weight",
                                                          "ibot_head.last_layer.weight"]
    for g in groups:
        for n in g["names"]:
            assert param_multipliers(n, 4, 0.9, 0.2) == {
                "lr_multiplier": g["lr_multiplier"], "wd_multiplier": g["wd_multiplier"],
                "is_last_layer": g["is_last_layer"]}
