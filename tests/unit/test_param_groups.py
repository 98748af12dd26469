"""Parameter groups of SPEC.md §3.3 on the real backbone + heads."""

import pytest

from fastdino.config import load_config
from fastdino.meta_arch import build_student
from fastdino.param_groups import build_param_groups, freeze_layers, layer_id, param_multipliers


def test_multipliers_by_name():
    L, lam, pe = 4, 0.9, 0.2
    m = lambda n: param_multipliers(n, L, lam, pe)  # noqa: E731
    assert m("backbone.patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.2 * lam ** 5)
    assert m("backbone.patch_embed.proj.bias")["wd_multiplier"] == 0.0
    for tok in ("cls_token", "storage_tokens", "mask_token"):  # layer 0 and weight decay ON
        assert m(f"backbone.{tok}") == {"lr_multiplier": pytest.approx(lam ** 5),
                                        "wd_multiplier": 1.0, "is_last_layer": False,
                                        "is_backbone": True}
    assert m("backbone.blocks.0.attn.qkv.weight")["lr_multiplier"] == pytest.approx(lam ** 4)
    assert m("backbone.blocks.3.mlp.fc1.weight")["lr_multiplier"] == pytest.approx(lam ** 1)
    assert m("backbone.blocks.2.ls1.gamma")["wd_multiplier"] == 0.0
    assert m("backbone.blocks.2.norm1.weight")["wd_multiplier"] == 0.0
    assert m("backbone.norm.weight") == {"lr_multiplier": 1.0, "wd_multiplier": 0.0,
                                         "is_last_layer": False, "is_backbone": True}
    assert m("dino_head.mlp.0.weight") == {"lr_multiplier": 1.0, "wd_multiplier": 1.0,
                                           "is_last_layer": False, "is_backbone": False}
    assert m("ibot_head.last_layer.weight")["is_last_layer"] is True


def test_groups_cover_every_trainable_param_once():
    cfg = load_config("configs/smoke.yaml", [])
    student = build_student(cfg)
    groups = build_param_groups(student, student.backbone.n_blocks, 0.9, 0.2)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"], g["is_backbone"])
            for g in groups]
    assert len(keys) == len(set(keys))  # fused: one group per distinct key
    # depth 4: layers 0..5 x wd on/off, patch_embed separately, last layers
    last = [g for g in groups if g["is_last_layer"]]
    assert sorted(n for g in last for n in g["names"]) == ["dino_head.last_layer.weight",
                                                          "ibot_head.last_layer.weight"]
    for g in groups:
        for n in g["names"]:
            assert param_multipliers(n, 4, 0.9, 0.2) == {
                "lr_multiplier": g["lr_multiplier"], "wd_multiplier": g["wd_multiplier"],
                "is_last_layer": g["is_last_layer"], "is_backbone": g["is_backbone"]}
    # the backbone's final norm (multipliers 1, 0) and the heads' biases do not share a group
    assert all(n.startswith("backbone.") == g["is_backbone"] for g in groups for n in g["names"])


@pytest.mark.parametrize("frozen", [-1, 0, 1, 4])
def test_freeze_layers(frozen):
    """optim.frozen_blocks: embedding + tokens + the first N blocks lose requires_grad (all of
    the backbone at -1), the rest and the heads keep it, and the groups leave the frozen out."""
    cfg = load_config("configs/smoke.yaml", [])
    student = build_student(cfg)
    L = student.backbone.n_blocks
    n = freeze_layers(student.backbone, frozen)
    last = L + 1 if frozen == -1 else frozen
    for name, p in student.named_parameters():
        module, _, rel = name.partition(".")
        want_frozen = module == "backbone" and frozen != 0 and layer_id(rel, L) <= last
        assert p.requires_grad is not want_frozen, name
    assert n == sum(p.numel() for p in student.parameters() if not p.requires_grad)
    assert (n > 0) == (frozen != 0)
    groups = build_param_groups(student, L, 0.9, 0.2)
    names = {x for g in groups for x in g["names"]}
    assert names == {k for k, p in student.named_parameters() if p.requires_grad}
    if frozen == -1:
        assert not any(g["is_backbone"] for g in groups)


def test_freeze_layers_rejects_more_blocks_than_the_backbone_has():
    student = build_student(load_config("configs/smoke.yaml", []))
    L = student.backbone.n_blocks
    with pytest.raises(ValueError, match=rf"optim.frozen_blocks={L + 1}.*{L} blocks"):
        freeze_layers(student.backbone, L + 1)
