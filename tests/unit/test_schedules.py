"""Schedules against the official CosineScheduler array construction (SPEC.md §3.2)."""

import math

import numpy as np
import pytest

from fastdino.config import ConfigError, load_config
from fastdino.schedules import CosineScheduler, apply_to_param_groups, build_schedules, cosine_ramp


def official_schedule(base, final, total, warmup=0, start_warmup=0.0, freeze=0):
    """The official dinov3 CosineScheduler array, written from SPEC.md §3.2."""
    freeze_s = np.zeros(freeze)
    warm_s = np.linspace(start_warmup, base, warmup)
    iters = np.arange(total - warmup - freeze)
    cos_s = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((freeze_s, warm_s, cos_s))


@pytest.mark.parametrize("base,final,total,warmup,start,freeze", [
    (1e-3, 1e-6, 137, 13, 0.0, 0), (0.04, 0.4, 50, 0, 0.0, 0), (0.992, 1.0, 31, 0, 0.0, 0),
    (2.0, 0.5, 40, 7, 0.3, 5), (1.0, 1.0, 10, 1, 0.0, 0)])
def test_cosine_scheduler_matches_official_array(base, final, total, warmup, start, freeze):
    ref = official_schedule(base, final, total, warmup, start, freeze)
    s = CosineScheduler(base, final, total, warmup, start, freeze)
    got = np.array([s[i] for i in range(total)])
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    assert s[total] == final and s[total + 100] == final


def test_teacher_temp_linear_then_constant():
    cfg = load_config(None, ["train.epoch_length=10", "schedules.warmup_teacher_temp_epochs=3",
                             "schedules.warmup_teacher_temp=0.04", "schedules.teacher_temp=0.07"])
    s = build_schedules(cfg, 1024)
    ref = np.linspace(0.04, 0.07, 30)
    np.testing.assert_allclose([s.at(i).teacher_temp for i in range(30)], ref, rtol=1e-12)
    assert s.at(30).teacher_temp == 0.07 and s.at(999).teacher_temp == 0.07


def test_lr_sqrt_scaling_last_layer_freeze_and_groups():
    cfg = load_config(None, ["train.epoch_length=10", "train.epochs=5", "optim.lr=1e-3",
                             "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=2"])
    s = build_schedules(cfg, 256)
    peak = 1e-3 * 4 * math.sqrt(256 / 1024)
    assert s.at(9).lr == pytest.approx(peak)  # end of the linspace warm-up
    assert s.at(0).lr == 0.0
    assert s.at(49).lr > cfg.optim.min_lr and s.at(50).lr == cfg.optim.min_lr  # min_lr unscaled
    assert [s.at(i).last_layer_lr for i in (0, 19)] == [0.0, 0.0]
    assert s.at(20).last_layer_lr == s.at(20).lr > 0
    groups = [{"lr_multiplier": 0.5, "wd_multiplier": 0.0, "is_last_layer": False,
               "is_backbone": True},
              {"lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": True,
               "is_backbone": False}]
    v = s.at(12)
    apply_to_param_groups(groups, v)
    assert groups[0]["lr"] == pytest.approx(0.5 * v.lr) and groups[0]["weight_decay"] == 0.0
    assert groups[1]["lr"] == 0.0 and groups[1]["weight_decay"] == pytest.approx(v.wd)
    cfg_none = load_config(None, ["optim.scaling_rule=none", "optim.warmup_epochs=0"])
    assert build_schedules(cfg_none, 64).at(0).lr == pytest.approx(cfg_none.optim.lr)


def test_backbone_freeze_head_warmup():
    """optim.freeze_backbone_epochs: backbone groups at lr 0 (weight decay too, as AdamW scales
    it by lr) for that many epochs, the heads on the normal schedule; then both alike."""
    cfg = load_config(None, ["train.epoch_length=10", "train.epochs=5", "optim.warmup_epochs=1",
                             "optim.freeze_backbone_epochs=1.5",
                             "optim.freeze_last_layer_epochs=0"])
    s = build_schedules(cfg, 256)
    assert [s.at(i).backbone_lr for i in (0, 5, 14)] == [0.0, 0.0, 0.0]
    assert s.at(14).lr > 0 and s.at(15).backbone_lr == s.at(15).lr > 0
    groups = [{"lr_multiplier": 0.5, "wd_multiplier": 1.0, "is_last_layer": False,
               "is_backbone": True},
              {"lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": False,
               "is_backbone": False},
              {"lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": True,
               "is_backbone": False}]
    apply_to_param_groups(groups, s.at(12))
    assert groups[0]["lr"] == 0.0 and groups[0]["weight_decay"] == pytest.approx(s.at(12).wd)
    assert groups[1]["lr"] == groups[2]["lr"] == pytest.approx(s.at(12).lr)
    apply_to_param_groups(groups, s.at(15))
    assert groups[0]["lr"] == pytest.approx(0.5 * s.at(15).lr)
    default = build_schedules(load_config(None, ["train.epoch_length=10"]), 256)
    assert default.at(1).backbone_lr == default.at(1).lr > 0  # off by default


def test_gram_weight_ramp_and_momentum():
    assert cosine_ramp(9, 10, 4, 2.0) == 0.0
    # official np.linspace(0, π, 4) endpoint: 2.0 at the ramp's last iteration (13)
    assert [cosine_ramp(i, 10, 4, 2.0) for i in (10, 12, 13, 14, 99)] == \
        pytest.approx([0, 1.5, 2, 2, 2])
    cfg = load_config(None, ["train.epoch_length=10", "train.epochs=2"])
    s = build_schedules(cfg, 1024)
    assert s.at(0).momentum == pytest.approx(0.992) and s.at(20).momentum == 1.0
    assert s.at(0).gram_weight == 0.0  # gram.use is off


def test_ema_scaling_rule():
    """schedules.momentum_reference_batch: m -> m^(B / B_ref) (Busbridge et al. 2023): the EMA
    keeps the same weight per image seen; off by default (the official momenta)."""
    over = ["train.epoch_length=10", "train.epochs=2", "schedules.momentum_teacher=0.992",
            "schedules.final_momentum_teacher=0.999"]
    off = build_schedules(load_config(None, over), 256)
    assert off.at(0).momentum == pytest.approx(0.992)
    cfg = load_config(None, [*over, "schedules.momentum_reference_batch=2048"])
    s = build_schedules(cfg, 256)
    assert s.at(0).momentum == pytest.approx(0.992 ** (1 / 8))
    assert s.at(20).momentum == pytest.approx(0.999 ** (1 / 8))
    # 8 steps at batch 256 weigh the old teacher as 1 step at 2048 did
    assert s.at(0).momentum ** 8 == pytest.approx(0.992)
    assert build_schedules(cfg, 2048).at(0).momentum == pytest.approx(0.992)  # the recipe's
    with pytest.raises(ConfigError, match="momentum_reference_batch"):
        load_config(None, ["schedules.momentum_reference_batch=0"])
