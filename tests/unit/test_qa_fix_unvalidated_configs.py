"""Evaluation, export and the distillation teacher read a preset or a saved run config for its
model (and head) sections only: training's whole-config rules (a preset's unset
distillation.teacher, any rule added after an older run saved its config.yaml) do not refuse it,
while the model section's own rules still hold."""

from __future__ import annotations

import pytest
import torch

from fastdino.config import ConfigError, load_config, save_config
from fastdino.distillation import build_distillation_teacher
from fastdino.eval.weights import resolve_model_config
from fastdino.export import _teacher_backbone
from fastdino.meta_arch import build_student

SMALL = ["model.arch=vit_test", "dino.head.n_prototypes=32", "dino.head.hidden_dim=16",
         "dino.head.bottleneck_dim=8", "ibot.head.n_prototypes=32", "ibot.head.hidden_dim=16",
         "ibot.head.bottleneck_dim=8"]


@pytest.fixture()
def saved(tmp_path):
    """A teacher file and a config.yaml that breaks a whole-config rule (distillation enabled,
    no teacher: what the vitl16_distill preset says until the command line gives one)."""
    cfg = load_config(None, SMALL)
    torch.save({"teacher": build_student(cfg).state_dict()}, tmp_path / "teacher.pth")
    cfg.distillation.enabled = True
    save_config(cfg, tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="distillation.teacher"):
        load_config(tmp_path / "config.yaml")  # as training reads it: refused
    return tmp_path


def test_eval_reads_the_model_section_of_a_distill_preset_or_an_older_config(saved):
    assert resolve_model_config(config="vitl16_distill").arch == "vit_large"
    assert resolve_model_config(config=saved / "config.yaml").arch == "vit_test"
    bad = (saved / "config.yaml").read_text().replace("patch_size: 16", "patch_size: 0")
    (saved / "bad.yaml").write_text(bad)
    with pytest.raises(ConfigError, match="model.patch_size"):  # its own rules still hold
        resolve_model_config(config=saved / "bad.yaml")


def test_export_builds_the_backbone_from_such_a_config(saved):
    backbone, cfg = _teacher_backbone(saved / "teacher.pth", config=str(saved / "config.yaml"))
    want = torch.load(saved / "teacher.pth", weights_only=True)["teacher"]
    assert all(torch.equal(want[f"backbone.{k}"], v) for k, v in backbone.state_dict().items())
    assert cfg.crops.mean == load_config(None, SMALL).crops.mean


def test_distillation_teacher_from_such_a_config(saved):
    cfg = load_config(None, SMALL)
    cfg.distillation.teacher = str(saved / "teacher.pth")
    cfg.distillation.teacher_config = str(saved / "config.yaml")
    teacher = build_distillation_teacher(cfg, torch.device("cpu"))
    want = torch.load(saved / "teacher.pth", weights_only=True)["teacher"]
    assert all(torch.equal(want[k], v.float()) for k, v in teacher.state_dict().items())


def test_a_bad_teacher_model_section_is_named_as_the_teachers(saved):
    bad = (saved / "config.yaml").read_text().replace("patch_size: 16", "patch_size: 0")
    (saved / "bad.yaml").write_text(bad)
    cfg = load_config(None, SMALL)
    cfg.distillation.teacher = str(saved / "teacher.pth")
    cfg.distillation.teacher_config = str(saved / "bad.yaml")
    with pytest.raises(ConfigError, match=r"^distillation.teacher=.*bad.yaml.*model.patch_size"):
        build_distillation_teacher(cfg, torch.device("cpu"))
