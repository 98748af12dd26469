"""Continued-pretraining controls on the tiny smoke model, one `Trainer.step` at a time:
the head warm-up (`optim.freeze_backbone_epochs`: backbone lr 0, heads train, gradients still
computed) and partial fine-tuning (`optim.frozen_blocks`: embedding + first blocks never train,
no gradient, no optimizer state, the teacher keeps their copy bit for bit)."""

from __future__ import annotations

import pytest
import torch
from test_trainer_step import make_trainer

STEP = ["optim.warmup_epochs=0", "optim.lr=0.01", "optim.freeze_last_layer_epochs=0",
        "train.epoch_length=2"]


def _values(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())}


def test_head_warmup_holds_the_backbone_then_releases_it(tmp_path):
    trainer, batch = make_trainer(tmp_path, *STEP, "optim.freeze_backbone_epochs=1")
    student = trainer.arch.student
    bb0, heads0 = _values(student.backbone), _values(student.dino_head)
    for it in (0, 1):  # epoch_length 2: iterations 0 and 1 are the warm-up
        v = trainer.step(it, batch)
        assert v["backbone_lr"] == 0.0 and v["lr"] > 0
        # the gradient is computed (AdamW moments warm up) but the lr-0 step does not move it,
        # weight decay included
        assert v["backbone_grad_norm"] > 0
    assert _changed(bb0, student.backbone) == set()
    assert _changed(heads0, student.dino_head)  # the heads trained
    teacher_bb = dict(trainer.arch.teacher.backbone.named_parameters())
    for k, x in bb0.items():  # EMA of an unchanged student: the loaded backbone, up to rounding
        torch.testing.assert_close(teacher_bb[k], x, rtol=1e-6, atol=1e-7)
    v = trainer.step(2, batch)
    assert v["backbone_lr"] == v["lr"] > 0
    assert len(_changed(bb0, student.backbone)) > 0.9 * len(bb0)


@pytest.mark.parametrize("frozen", [1, -1])
def test_frozen_blocks_never_train(tmp_path, frozen):
    trainer, batch = make_trainer(tmp_path, *STEP, f"optim.frozen_blocks={frozen}")
    student, teacher = trainer.arch.student, trainer.arch.teacher
    frozen_names = {k for k, p in student.named_parameters() if not p.requires_grad}
    assert frozen_names  # the smoke model (depth 2 here) has them
    if frozen == 1:
        assert "backbone.blocks.0.attn.qkv.weight" in frozen_names
        assert "backbone.patch_embed.proj.weight" in frozen_names
        assert "backbone.blocks.1.attn.qkv.weight" not in frozen_names
    else:
        assert frozen_names == {"backbone." + k for k, _ in student.backbone.named_parameters()}
    before = _values(student)
    for it in range(2):
        v = trainer.step(it, batch)
    changed = _changed(before, student)
    assert changed.isdisjoint(frozen_names)
    assert {k for k in changed if k.startswith("dino_head.")}  # the rest trains
    if frozen == 1:
        assert "backbone.blocks.1.attn.qkv.weight" in changed
    else:
        assert v["backbone_grad_norm"] == 0.0  # no backbone gradient at all
    # no optimizer state (AdamW moments) for them, and the teacher keeps them bit for bit
    opt = trainer.engine.optimizer
    with_state = {id(p) for p in opt.state}
    named = dict(student.named_parameters())
    assert not any(id(named[k]) in with_state for k in frozen_names)
    t = dict(teacher.named_parameters())
    assert all(torch.equal(t[k], named[k]) for k in frozen_names)
    assert any(not torch.equal(t[k], before[k]) for k in changed)  # the EMA did run


def test_frozen_blocks_skip_the_backward_below_them(tmp_path):
    """No gradient reaches the frozen part: a hook on the patch embedding's output never fires
    (autograd stops at the first trainable block), unlike without freezing."""
    fired = []
    for frozen in (0, 1):
        trainer, batch = make_trainer(tmp_path / str(frozen), *STEP,
                                      f"optim.frozen_blocks={frozen}")
        pe = trainer.arch.student.backbone.patch_embed

        def hook(_m, _inp, out, frozen=frozen):
            if out.requires_grad:
                out.register_hook(lambda g: fired.append(frozen))

        pe.register_forward_hook(hook)
        trainer.step(0, batch)
    assert fired and set(fired) == {0}


def test_frozen_blocks_beyond_the_depth_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"optim.frozen_blocks=3: the backbone has 2 blocks"):
        make_trainer(tmp_path, "optim.frozen_blocks=3")
