"""Distillation mode (SPEC.md §1.8, fastdino/distillation.py) on tiny models: a 1-iteration
"teacher run" (3 blocks, wider) is distilled into a 2-block student. The targets are the frozen
teacher's (not the student's EMA), the student's global crops are unmasked while the iBOT loss is
taken at the sampled positions, the teacher never moves, the student's EMA still does, and every
mismatch between teacher and student is an error that names the key."""

from __future__ import annotations

import pytest
import torch
from test_trainer_step import SMALL, SMOKE, make_trainer

from fastdino.config import ConfigError, load_config

STEP = ["optim.warmup_epochs=0", "optim.lr=0.01", "optim.freeze_last_layer_epochs=0"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A fastdino run of another architecture than the student's: 3 blocks of width 96."""
    from fastdino.train import Trainer

    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = load_config(SMOKE, [*SMALL, "model.depth=3", "model.embed_dim=96", "model.num_heads=3",
                              f"train.output_dir={out}", "train.resume=none",
                              "train.max_iterations=1", "train.checkpoint_every=1", *STEP])
    Trainer(cfg).train()
    return out


def _distill(tmp_path, teacher_run, *extra):
    return make_trainer(tmp_path, *STEP, "distillation.enabled=true",
                        f"distillation.teacher={teacher_run}", *extra)


def test_targets_come_from_the_frozen_teacher(tmp_path, teacher_run):
    # softmax centering (center 0 at the start): the targets are softmax(t/τ_t) of whichever
    # model gave them, so the two teachers' differ (Sinkhorn-Knopp at 4 images is ~uniform)
    trainer, batch = _distill(tmp_path, teacher_run, "dino.centering=softmax")
    arch = trainer.arch
    dt = arch.distillation_teacher
    assert dt.backbone.n_blocks == 3 and dt.backbone.embed_dim == 96
    assert arch.student.backbone.n_blocks == 2
    saved = torch.load(teacher_run / "checkpoints" / "iter_0000001" / "trainer_state.pt",
                       weights_only=True)["teacher"]
    assert all(torch.equal(saved[k], v) for k, v in dt.state_dict().items())
    assert not any(p.requires_grad for p in dt.parameters()) and not dt.training
    # the targets are the teacher run's
    t = arch.teacher_output(batch, 0.07)
    with torch.no_grad():
        ref = dt.teacher_forward(batch.global_crops, batch.mask_indices)
        own = arch.teacher.teacher_forward(batch.global_crops, batch.mask_indices)
    want = arch.dino_loss.teacher_targets(ref["cls_logits"], 0.07).materialize()
    got = t["dino_targets"].materialize()
    torch.testing.assert_close(got, want)
    not_own = arch.dino_loss.teacher_targets(own["cls_logits"], 0.07).materialize()
    assert (got - not_own).abs().max() > 1e-3  # the student's EMA would give other targets
    before = {k: v.clone() for k, v in dt.state_dict().items()}
    ema0 = {k: v.detach().clone() for k, v in arch.teacher.named_parameters()}
    for it in range(2):
        v = trainer.step(it, batch)
        assert torch.isfinite(v["total_loss"]) and v["ibot_loss"] > 0
    assert all(torch.equal(before[k], x) for k, x in dt.state_dict().items())  # frozen
    moved = [k for k, x in arch.teacher.named_parameters() if not torch.equal(ema0[k], x)]
    assert moved  # the student's EMA is still kept
    # checkpoints hold the student's EMA, not the distillation teacher
    st = arch.state_for_checkpoint()
    assert st["teacher"]["backbone.blocks.0.attn.qkv.weight"].shape == \
        arch.student.backbone.blocks[0].attn.qkv.weight.shape


def test_student_is_unmasked_and_ibot_uses_the_sampled_positions(tmp_path, teacher_run,
                                                                monkeypatch):
    trainer, batch = _distill(tmp_path, teacher_run)
    assert batch.mask_indices.numel() > 0 and batch.masks.any()
    seen = {}
    student = trainer.arch.student
    real = type(student).forward

    def spy(self, global_crops, local_crops, masks, mask_indices):
        seen["masks"], seen["mask_indices"] = masks, mask_indices
        return real(self, global_crops, local_crops, masks, mask_indices)

    monkeypatch.setattr(type(student), "forward", spy)
    trainer.step(0, batch)
    assert seen["masks"] is None
    assert torch.equal(seen["mask_indices"], batch.mask_indices)
    # the unused mask token is frozen (no gradient would reach it)
    assert not student.backbone.mask_token.requires_grad


def test_self_distillation_still_masks_the_student(tmp_path):
    trainer, batch = make_trainer(tmp_path, *STEP)
    assert trainer.arch.distillation_teacher is None
    assert trainer.arch.student_masks(batch) is batch.masks
    assert trainer.arch.target_model is trainer.arch.teacher


@pytest.mark.parametrize("override,key", [
    ("dino.head.n_prototypes=64", "dino.head.n_prototypes=64 but the distillation teacher"),
    ("ibot.head.n_prototypes=64", "ibot.head.n_prototypes=64 but the distillation teacher"),
])
def test_teacher_student_mismatch_is_an_error(tmp_path, teacher_run, override, key):
    with pytest.raises(ConfigError, match=key + r".* has 128: set"):
        _distill(tmp_path, teacher_run, override)


def test_a_backbone_file_is_not_a_teacher(tmp_path, teacher_run):
    with pytest.raises(ConfigError, match=r"needs its DINO and iBOT heads.*frozen_blocks=-1"):
        _distill(tmp_path, teacher_run / "teacher_backbone.pth")


def test_config_rules():
    with pytest.raises(ConfigError, match=r"distillation.teacher.*when distillation.enabled"):
        load_config(None, ["distillation.enabled=true"])
    with pytest.raises(ConfigError, match=r"gram.use.*distillation has no Gram loss"):
        load_config(None, ["distillation.enabled=true", "distillation.teacher=/x",
                           "gram.use=true", "gram.it_load_ema_teacher=0"])



def test_teacher_held_in_bf16(tmp_path, teacher_run):
    """distillation.teacher_dtype=bf16 (auto picks it when training in bf16): half the memory,
    targets within bf16 rounding of the fp32 teacher's; auto on this fp32 run keeps fp32."""
    fp32, batch = _distill(tmp_path / "a", teacher_run, "dino.centering=softmax")
    bf16, _ = _distill(tmp_path / "b", teacher_run, "dino.centering=softmax",
                       "distillation.teacher_dtype=bf16")
    assert {p.dtype for p in fp32.arch.distillation_teacher.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.arch.distillation_teacher.parameters()} == {torch.bfloat16}
    want = fp32.arch.teacher_output(batch, 0.07)["dino_targets"].materialize()
    got = bf16.arch.teacher_output(batch, 0.07)["dino_targets"].materialize()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.05, atol=1e-4)
    v = bf16.step(0, batch)
    assert torch.isfinite(v["total_loss"])


def test_a_lora_run_is_a_teacher(tmp_path):
    """A teacher run trained with LoRA adapters (optim.lora_rank) distils as its merged
    backbone: the frozen teacher is a plain model whose outputs equal the run's teacher."""
    from fastdino.train import Trainer

    out = tmp_path / "lora_teacher"
    cfg = load_config(SMOKE, [*SMALL, f"train.output_dir={out}", "train.resume=none",
                              "train.max_iterations=2", "optim.lora_rank=4", *STEP,
                              "model.layerscale_init=0.5",  # blocks that matter (init 1e-5)
                              # EMA momentum 0: the teacher's adapters are the student's, moved
                              "schedules.momentum_teacher=0", "schedules.final_momentum_teacher=0"])
    run = Trainer(cfg)
    run.train()
    trainer, batch = _distill(tmp_path / "student", out)
    dt = trainer.arch.distillation_teacher
    assert not any("lora" in k for k in dt.state_dict())
    teacher = run.arch.teacher
    with torch.no_grad():
        want = teacher.teacher_forward(batch.global_crops, batch.mask_indices)["cls_logits"]
        got = dt.teacher_forward(batch.global_crops, batch.mask_indices)["cls_logits"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for n, p in teacher.named_parameters():  # without the adapters: another function
            if n.endswith("lora_B"):
                p.zero_()
        base = teacher.teacher_forward(batch.global_crops, batch.mask_indices)["cls_logits"]
    assert (base - want).abs().max() > 1e-3


def test_a_with_heads_file_and_teacher_config(tmp_path, teacher_run):
    """A teacher without a config.yaml beside it (a `fastdino export --with-heads` file; an
    official DINOv3 checkpoint) takes its architecture from distillation.teacher_config, and
    gives the same frozen teacher as its run folder."""
    from fastdino.cli import main

    assert main(["export", "--run", str(teacher_run), "--out", str(tmp_path / "t.pth"),
                 "--with-heads"]) == 0
    with pytest.raises(ConfigError, match=r"no config.yaml beside it.*teacher_config"):
        _distill(tmp_path / "a", tmp_path / "t.pth")
    trainer, _ = _distill(tmp_path / "b", tmp_path / "t.pth",
                          f"distillation.teacher_config={teacher_run / 'config.yaml'}")
    ref, _ = _distill(tmp_path / "c", teacher_run)
    got, want = trainer.arch.distillation_teacher.state_dict(), \
        ref.arch.distillation_teacher.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ConfigError, match=r"distillation.teacher_config.*preset name"):
        _distill(tmp_path / "d", tmp_path / "t.pth", "distillation.teacher_config=nope")
