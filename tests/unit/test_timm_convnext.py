"""fastdino's ConvNeXt <-> timm's ConvNeXt (models/timm_convnext.py): every parameter mapped both
ways, the same pooled (CLS) features as timm's model, timm's own loader of the official layout
agreeing with our mapping, and a timm model folder written by `fastdino export --format timm`
that timm builds and fastdino evaluates again."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer_step import SMOKE
from timm_helpers import import_timm

from fastdino.models.convnext import build_convnext, to_official_state_dict
from fastdino.models.state_dict_io import load_backbone_state_dict
from fastdino.models.timm_convnext import (
    backbone_from_timm_convnext_config,
    from_timm_convnext_state_dict,
    timm_convnext_config,
    to_timm_convnext_state_dict,
)


@pytest.fixture(scope="module")
def timm():
    return import_timm()


def _timm_model(timm, ours):
    cfg = timm_convnext_config(ours)
    return timm.create_model(cfg["architecture"], pretrained=False, num_classes=0,
                             **cfg["model_args"]).eval()


def test_ours_and_timms_convnext_give_the_same_cls(timm):
    torch.manual_seed(0)
    ours = build_convnext("convnext_test").eval()
    for p in ours.parameters():  # away from the init (gamma 1e-6 would hide the blocks)
        p.data.add_(0.1 * torch.randn_like(p))
    model = _timm_model(timm, ours)
    sd = to_timm_convnext_state_dict(ours.state_dict())
    assert set(sd) == set(model.state_dict())
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours.forward_features(x)["x_norm_clstoken"])
    # timm's own loader of the official layout (what the hub's DINOv3 ConvNeXt files went
    # through) lands on the same names as ours
    from timm.models.convnext import checkpoint_filter_fn

    official = to_official_state_dict(ours.state_dict())
    assert set(checkpoint_filter_fn(official, model)) == set(sd)
    back = from_timm_convnext_state_dict(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    mine = build_convnext("convnext_test")
    load_backbone_state_dict(mine, model.state_dict())  # timm names, detected
    assert torch.equal(mine.stages[2][0].pwconv1.weight, ours.stages[2][0].pwconv1.weight)


def test_a_swapped_mapping_is_seen(timm):
    ours = build_convnext("convnext_test").eval()
    for p in ours.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    sd = to_timm_convnext_state_dict(ours.state_dict())
    sd["stages.1.blocks.0.mlp.fc1.weight"], sd["stages.2.blocks.0.mlp.fc1.weight"] = (
        sd["stages.1.blocks.0.mlp.fc1.weight"].flip(0), sd["stages.2.blocks.0.mlp.fc1.weight"])
    model = _timm_model(timm, ours)
    model.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(model(x), ours.forward_features(x)["x_norm_clstoken"])


def test_export_writes_a_folder_timm_builds_and_fastdino_reads(timm, tmp_path, monkeypatch):
    from fastdino import export
    from fastdino.config import load_config
    from fastdino.eval.weights import load_eval_backbone

    torch.manual_seed(1)
    ours = build_convnext("convnext_test").eval()
    cfg = load_config(SMOKE)  # (its crops' mean and std go into the folder's config)
    monkeypatch.setattr(export, "_teacher_backbone", lambda run, config=None: (ours, cfg))
    export.export_timm("unused", tmp_path / "timm")
    conf = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert conf["architecture"] == "convnext_tiny"  # timm's class, our stages in model_args
    assert conf["model_args"]["dims"] == [16, 24, 32, 48]
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    again, info = load_eval_backbone(tmp_path / "timm", device="cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = ours.forward_features(x)["x_norm_clstoken"]
        torch.testing.assert_close(model(x), want)
        torch.testing.assert_close(again.forward_features(x)["x_norm_clstoken"], want)
    assert backbone_from_timm_convnext_config(conf).dims == (16, 24, 32, 48)
