"""Schedules of the 7B / Gram / high-res / distillation recipes against the official numbers.

The official v2 schedules (`dinov3/train/train.py::build_schedulers_v2`, used by every config with
a `schedules:` block) scale both the peak and the end lr with `sqrt_wrt_1024`:

    lr_peak *= 4 * math.sqrt(cfg.train.batch_size_per_gpu * world_size / 1024.0)
    lr_end *= 4 * math.sqrt(cfg.train.batch_size_per_gpu * world_size / 1024.0)

and build them with `linear_warmup_cosine_decay` (dinov3/train/cosine_lr_scheduler.py), whose
cosine part is `np.cos(np.linspace(0, np.pi, cosine_iterations))` (endpoint included).
"""

import math

import numpy as np
import pytest

from fastdino.config import load_config
from fastdino.schedules import build_schedules, cosine_ramp


def official_v2(start, peak, end, warmup, total, cosine=None):
    """dinov3/train/cosine_lr_scheduler.py::linear_warmup_cosine_decay, as written there."""
    linear = np.linspace(start, peak, warmup, endpoint=False)
    if cosine is None:
        cosine = total - warmup
    cos = (np.cos(np.linspace(0, np.pi, cosine)) + 1) / 2
    cos = (peak - end) * cos + end
    return np.concatenate([linear, cos, np.full((total - cosine - warmup,), end)])


@pytest.mark.parametrize("preset,global_batch,its,official_lr", [
    # dinov3_vit7b16_pretrain.yaml: schedules.lr peak = end = 5e-5, 16 x 256 GPUs -> 4e-4
    ("vit7b16_pretrain", 4096, (100_000, 500_000, 999_999), 5e-5 * 4 * math.sqrt(4096 / 1024)),
    # dinov3_vit7b16_gram_anchor.yaml: peak = end = 3e-5 -> 2.4e-4 over the whole Gram stage
    ("vit7b16_gram", 4096, (1_000_000, 1_100_000, 1_199_999), 3e-5 * 4 * math.sqrt(4096 / 1024)),
    # dinov3_vit7b16_high_res_adapt.yaml: end 1.25e-5, 8 x 256 GPUs, constant after the ramp
    ("vit7b16_highres", 2048, (10_000, 20_000, 29_999), 1.25e-5 * 4 * math.sqrt(2048 / 1024)),
    # dinov3_vitl16_lvd1689m_distilled.yaml: end 5e-5, 1920 images per step
    ("vitl16_distill", 1920, (12_500, 20_000, 24_999), 5e-5 * 4 * math.sqrt(1920 / 1024)),
])
def test_constant_lr_recipes_hold_the_scaled_end_lr(preset, global_batch, its, official_lr):
    """Presets written lr = min_lr ("constant after the warm-up") decayed from the scaled peak to
    the *unscaled* min_lr: the 7B pretrain ended at 5e-5 instead of 4e-4, the Gram stage ran at
    ~4e-5 instead of 2.4e-4."""
    cfg = load_config(preset, ["distillation.teacher=/nonexistent"]
                      if preset == "vitl16_distill" else [])
    s = build_schedules(cfg, global_batch)
    for it in its:
        assert s.at(it).lr == pytest.approx(official_lr, rel=1e-12), it


def test_7b_pretrain_schedule_equals_official_v2_after_warmup():
    """The 7B stage-1 lr at a reduced length (10 iterations per epoch, so the 100-epoch warm-up
    is 1,000 its): the official v2 array built from the recipe's numbers, equal after the warm-up
    (v1's linspace warm-up includes its endpoint, v2's does not: a 1/warmup difference inside the
    warm-up only)."""
    cfg = load_config("vit7b16_pretrain", ["train.epoch_length=10", "train.epochs=200"])
    s = build_schedules(cfg, 4096)
    peak = 5e-5 * 4 * math.sqrt(4096 / 1024)
    ref = official_v2(0.0, peak, peak, warmup=1000, total=2000)
    np.testing.assert_allclose([s.at(i).lr for i in range(1000, 2000)], ref[1000:], rtol=1e-12)
    np.testing.assert_allclose([s.at(i).lr for i in range(1000)], ref[:1000], rtol=1.01e-3)


def test_decaying_schedule_keeps_min_lr_unscaled():
    """v1 (`apply_scaling_rules_to_cfg` scales only optim.lr): the ImageNet recipe ends at the
    min_lr as written, 1e-6, at any batch."""
    cfg = load_config("vitl16", ["train.epoch_length=10", "train.epochs=5"])
    s = build_schedules(cfg, 2048)
    assert s.at(49).lr > 1e-6 and s.at(50).lr == 1e-6


def test_gram_weight_ramp_equals_official_v2():
    """dinov3_vit7b16_gram_anchor.yaml gram.loss_weight_schedule: start 0, peak 0, end 2.0,
    warmup 1000 epochs, cosine 1 epoch (1000 its): 2.0 is reached at the ramp's last iteration
    (np.linspace endpoint), 1,000,999 at the 7B recipe's lengths."""
    start, length, total = 50, 10, 80
    ref = official_v2(0.0, 0.0, 2.0, warmup=start, total=total, cosine=length)
    np.testing.assert_allclose([cosine_ramp(i, start, length, 2.0) for i in range(total)], ref,
                               rtol=1e-12, atol=1e-15)
    s = build_schedules(load_config("vit7b16_gram"), 4096)
    assert s.at(999_999).gram_weight == 0.0
    assert s.at(1_000_999).gram_weight == 2.0
    ref = official_v2(0.0, 0.0, 2.0, warmup=0, total=1, cosine=1)  # one-iteration ramp
    assert cosine_ramp(5, 5, 1, 2.0) == ref[0] == 0.0 and cosine_ramp(6, 5, 1, 2.0) == 2.0


def test_local_loss_weight_ramp_equals_official_v2():
    """dinov3_vit7b16_gram_anchor.yaml dino.local_loss_weight_schedule: start 1, peak 1, end 0.5,
    warmup 1000 epochs, cosine 1 epoch: w_local is 1 up to 1M, then a cosine to 0.5 reached at
    1,000,999. The preset used a constant 0.5 (an approximation its header admitted)."""
    from fastdino.schedules import local_loss_weight_at

    start, length, total = 50, 10, 80
    ref = official_v2(1.0, 1.0, 0.5, warmup=start, total=total, cosine=length)
    cfg = load_config("smoke", ["dino.local_loss_weight=0.5",
                                f"dino.local_loss_weight_start_iteration={start}",
                                f"dino.local_loss_weight_ramp_iterations={length}"])
    got = [build_schedules(cfg, 8).at(i).local_loss_weight for i in range(total)]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    s = build_schedules(load_config("vit7b16_gram"), 4096)
    assert s.at(999_999).local_loss_weight == 1.0 and s.at(1_000_000).local_loss_weight == 1.0
    assert 0.5 < s.at(1_000_500).local_loss_weight < 1.0
    assert s.at(1_000_999).local_loss_weight == 0.5 == s.at(1_199_999).local_loss_weight
    # without a ramp: the weight as written at every iteration, exactly (0.3, not 1 - 0.7)
    flat = load_config("smoke", ["dino.local_loss_weight=0.3"]).dino
    assert local_loss_weight_at(flat, 0) == 0.3 == local_loss_weight_at(flat, 10**6)


def test_the_scaled_lr_is_logged(caplog):
    """The lr a run uses depends on its global batch (the GPU count): it is logged at start, with
    the rule and the factor, not only the optim.lr a user wrote."""
    with caplog.at_level("INFO", logger="fastdino"):
        build_schedules(load_config("vit7b16_pretrain"), 4096)
        build_schedules(load_config("smoke"), 8)
    assert "lr: 0.0004 after 100 warm-up epochs (optim.lr 5e-05 x 8 (sqrt_wrt_1024 at global " \
        "batch 4096)), 0.0004 at the end (constant)" in caplog.text, caplog.text
    assert "lr: 0.0003536 after" in caplog.text and "1e-06 at the end\n" in caplog.text + "\n"
