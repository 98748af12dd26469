"""LoRA adapters for continued pretraining (fastdino/layers/lora.py, optim.lora_rank): the
wrapped layer starts as its base, the merge gives the adapted function as a plain weight, only the
adapters and the heads train, and a LoRA run's teacher exports and loads as a plain backbone."""

from __future__ import annotations

import pytest
import torch
from test_trainer_step import make_trainer

from fastdino.config import ConfigError, load_config
from fastdino.layers.attention import LinearKMaskedBias
from fastdino.layers.lora import LoRALinear, add_lora, merge_lora_state_dict
from fastdino.models.state_dict_io import load_backbone_state_dict

STEP = ["optim.warmup_epochs=0", "optim.lr=0.01", "optim.freeze_last_layer_epochs=0"]


def test_lora_linear_starts_as_its_base_and_merges_exactly():
    torch.manual_seed(0)
    base = LinearKMaskedBias(8, 12)
    base.reset_bias_mask()
    torch.nn.init.normal_(base.bias)
    x = torch.randn(5, 8)
    ref = base(x)
    lora = LoRALinear(base, rank=3, alpha=6.0)
    torch.testing.assert_close(lora(x), ref, rtol=0, atol=0)  # B = 0
    with torch.no_grad():
        lora.lora_B.normal_()
    y = lora(x)
    assert (y - ref).abs().max() > 1e-2  # the adapter acts
    merged = merge_lora_state_dict({f"l.{k}": v for k, v in lora.state_dict().items()})
    assert set(merged) == {"l.weight", "l.bias", "l.bias_mask"}
    plain = LinearKMaskedBias(8, 12)
    plain.load_state_dict({k[2:]: v for k, v in merged.items()})
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)  # key bias still masked
    assert not base.weight.requires_grad and lora.lora_A.requires_grad


def test_only_adapters_and_heads_train_and_the_teacher_exports_plain(tmp_path):
    # LayerScale 0.5 (not 1e-5) and EMA momentum 0: the teacher's adapters matter to its output
    trainer, batch = make_trainer(tmp_path, *STEP, "optim.lora_rank=4", "optim.lora_alpha=8",
                                  "model.layerscale_init=0.5", "schedules.momentum_teacher=0",
                                  "schedules.final_momentum_teacher=0")
    student = trainer.arch.student
    trainable = {k for k, p in student.named_parameters() if p.requires_grad}
    assert all(".lora_" in k for k in trainable if k.startswith("backbone."))
    assert {k for k in trainable if ".lora_" in k}  # the adapters are there
    before = {k: p.detach().clone() for k, p in student.named_parameters()}
    for it in range(2):
        trainer.step(it, batch)
    changed = {k for k, p in student.named_parameters() if not torch.equal(before[k], p)}
    assert changed <= trainable and any(".lora_B" in k for k in changed)
    # the EMA teacher, merged into plain keys, is the same function as the teacher with adapters
    from fastdino.models import build_backbone

    teacher_bb = trainer.arch.teacher.backbone.eval()
    plain = build_backbone(trainer.cfg.model).eval()
    load_backbone_state_dict(plain, {"teacher": trainer.arch.teacher.state_dict()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = teacher_bb.forward_features(x)["x_norm_patchtokens"]
        got = plain.forward_features(x)["x_norm_patchtokens"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # without the adapters: another function (the check is not vacuous)
        for n, p in teacher_bb.named_parameters():
            if n.endswith("lora_B"):
                p.zero_()
        base = teacher_bb.forward_features(x)["x_norm_patchtokens"]
    assert (base - want).abs().max() > 1e-3


def test_lora_respects_frozen_blocks_and_rejects_bad_settings(tmp_path):
    trainer, _ = make_trainer(tmp_path, *STEP, "optim.lora_rank=2", "optim.frozen_blocks=1")
    bb = trainer.arch.student.backbone
    assert not isinstance(bb.blocks[0].attn.qkv, LoRALinear)
    assert isinstance(bb.blocks[1].attn.qkv, LoRALinear)
    with pytest.raises(ConfigError, match="optim.frozen_blocks.*lora_rank"):
        load_config(None, ["optim.lora_rank=4", "optim.frozen_blocks=-1"])
    with pytest.raises(ValueError, match=r"lora_targets: \['qkvv'\] unknown"):
        add_lora(bb, 2, 2.0, ("qkvv",))
    depth = len(bb.blocks)  # every block frozen leaves LoRA nothing to adapt: named as such
    with pytest.raises(ConfigError, match=f"optim.frozen_blocks={depth} freezes all {depth} "
                                          f"blocks.*at most {depth - 1}"):
        make_trainer(tmp_path / "all", *STEP, "optim.lora_rank=2", f"optim.frozen_blocks={depth}")


@pytest.mark.parametrize("mode", ["activation_checkpointing", "compile"])
def test_lora_trains_the_same_under_checkpointing_and_compile(tmp_path, mode):
    """The wrapped linears inside checkpointed (recomputed) and torch.compile'd blocks: two steps
    give the eager run's adapters (checkpointing bit for bit; inductor within its reordering)."""
    lora = [*STEP, "optim.lora_rank=4", "optim.lora_alpha=8", "model.layerscale_init=0.5",
            "model.drop_path_rate=0"]
    extra = {"activation_checkpointing": ["model.activation_checkpointing=true"],
             "compile": ["model.compile=true", "model.compile_fallback=false"]}[mode]
    runs = {}
    for name, overrides in (("eager", []), (mode, extra)):
        trainer, batch = make_trainer(tmp_path / name, *lora, *overrides)
        if mode == "activation_checkpointing" and name == mode:
            assert trainer.arch.student.backbone.activation_checkpointing
        for it in range(2):
            trainer.step(it, batch)
        runs[name] = {k: p.detach().clone() for k, p in trainer.arch.student.named_parameters()}
    moved = max(p.abs().max().item() for k, p in runs["eager"].items() if k.endswith("lora_B"))
    assert moved > 1e-3  # B starts at zero: the adapters trained
    atol = 0.0 if mode == "activation_checkpointing" else 2e-4
    for k, want in runs["eager"].items():
        torch.testing.assert_close(runs[mode][k], want, rtol=0, atol=atol, msg=k)
