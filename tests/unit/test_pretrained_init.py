"""`model.pretrained_weights`: continued pretraining starts the student (and so the EMA teacher)
from given weights, strictly, with the heads when the source has them."""

import pytest
import torch

from fastdino.config import load_config
from fastdino.meta_arch import SSLMetaArch

SMALL = ["model.arch=vit_test", "crops.global_crops_size=32", "crops.local_crops_size=16",
         "dino.head.n_prototypes=32", "dino.head.hidden_dim=16", "dino.head.bottleneck_dim=8",
         "ibot.head.n_prototypes=32", "ibot.head.hidden_dim=16", "ibot.head.bottleneck_dim=8"]


def _arch(*overrides: str, seed: int = 0) -> SSLMetaArch:
    return SSLMetaArch(load_config(None, [*SMALL, f"train.seed={seed}", *overrides]),
                       torch.device("cpu"))


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_backbone_file_initialises_student_and_teacher(tmp_path):
    source = _arch(seed=1)
    torch.save(source.student.backbone.state_dict(), tmp_path / "backbone.pth")
    arch = _arch(f"model.pretrained_weights={tmp_path / 'backbone.pth'}", seed=2)
    _assert_same(arch.student.backbone, source.student.backbone)
    _assert_same(arch.teacher.backbone, source.student.backbone)
    # a plain backbone file has no heads: they keep the seed-2 init, not the source's
    fresh = _arch(seed=2)
    _assert_same(arch.student.dino_head, fresh.student.dino_head)
    assert not torch.equal(arch.student.dino_head.last_layer.weight,
                           source.student.dino_head.last_layer.weight)


def test_teacher_file_with_heads_loads_the_heads_too(tmp_path):
    source = _arch(seed=1)
    teacher = {f"{part}.{k}": v for part in ("backbone", "dino_head", "ibot_head")
               for k, v in getattr(source.student, part).state_dict().items()}
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    arch = _arch(f"model.pretrained_weights={tmp_path / 'teacher_checkpoint.pth'}", seed=2)
    for part in ("backbone", "dino_head", "ibot_head"):
        _assert_same(getattr(arch.student, part), getattr(source.student, part))
        _assert_same(getattr(arch.teacher, part), getattr(source.student, part))


def test_a_mismatch_is_an_error_naming_the_keys(tmp_path):
    source = _arch("model.depth=1")
    torch.save(source.student.backbone.state_dict(), tmp_path / "shallow.pth")
    with pytest.raises(ValueError, match=r"pretrained_weights.*missing keys.*blocks\.1\."):
        _arch(f"model.pretrained_weights={tmp_path / 'shallow.pth'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _arch(f"model.pretrained_weights={tmp_path / 'nope.pth'}")
