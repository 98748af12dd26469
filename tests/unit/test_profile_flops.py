"""fastdino/profile.py: the FLOP model against a hand count and against torch's FlopCounterMode on
the real modules, the MFU peak table, and the n/a path without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastdino.config import HeadConfig, ModelConfig, load_config
from fastdino.profile import (
    NvmlSampler,
    arch_dims,
    backbone_backward_factors,
    format_report,
    head_flops,
    masked_rows,
    peak_bf16_tflops,
    report,
    step_flops,
    vit_flops,
    vit_parts,
)


def test_vit_flops_hand_count():
    # vit_test: D=32, depth 2, MLP x4 (F=128), patch 16, 4 storage tokens; 32x32 image:
    # P = 4 patches, T = 1 + 4 + 4 = 9 tokens.
    #   patch embed  2*4*(3*256)*32              = 196,608
    #   qkv          2*9*32*96                   =  55,296
    #   q.k^T + a.v  2 * 2*81*32                 =  10,368
    #   proj         2*9*32*32                   =  18,432
    #   MLP          2*9*32*128*2                = 147,456   -> block 231,552
    #   image = 196,608 + 2 * 231,552 = 659,712; batch 2 -> 1,319,424
    cfg = ModelConfig(arch="vit_test")
    assert vit_flops(cfg, 32, 2) == 1_319_424
    # drop path 0.5 on 2 images: blocks on floor(2*0.5) = 1 image, patch embed on both
    assert vit_flops(cfg, 32, 2, drop_path_rate=0.5) == 2 * 196_608 + 2 * 231_552


def test_vit_flops_swiglu_width():
    # vit_small_plus: SwiGLU r=6 align 8: F = align_up(int(384*6*2/3), 8) = 1536, 3 matrices
    plus, small = ModelConfig(arch="vit_small_plus"), ModelConfig(arch="vit_small")
    T = 1 + 4 + 196
    diff = vit_flops(plus, 224, 1) - vit_flops(small, 224, 1)
    assert diff == 12 * 2 * T * 384 * 1536 * (3 - 2)  # one extra FFN matrix per block


def test_vit_flops_matches_flop_counter():
    from fastdino.models.backbones import build_backbone

    # attn_impl=torch: explicit matmuls (FlopCounterMode does not count CPU SDPA's fused op)
    cfg = ModelConfig(arch="vit_test", drop_path_rate=0.0, attn_impl="torch")
    model = build_backbone(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.forward_features(x)
    assert fc.get_total_flops() == vit_flops(cfg, 32, 2)


def test_head_flops_matches_flop_counter():
    from fastdino.models.dino_head import build_head

    hc = HeadConfig(n_prototypes=300, hidden_dim=48, bottleneck_dim=16, nlayers=3)
    head = build_head(hc, 32)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        head(torch.randn(5, 32))
    assert fc.get_total_flops() == head_flops(hc, 32, 5)
    # hand count: 2*5*(32*48 + 48*48 + 48*16 + 16*300)
    assert head_flops(hc, 32, 5) == 2 * 5 * (1536 + 2304 + 768 + 4800)


def test_step_flops_parts():
    cfg = load_config(None, ["model.arch=vit_test", "data.batch_size_per_gpu=2",
                             "crops.global_crops_size=32", "crops.local_crops_size=16",
                             "crops.local_crops_number=2", "model.drop_path_rate=0.0"])
    f = step_flops(cfg)
    assert f["masked_rows"] == masked_rows(2, 4, 0.5, (0.1, 0.5))
    # n = int(2*2*0.5) = 2 masked crops of 4 patches, ratios 0.3 and 0.5 -> int(1.2) + int(2) = 3
    assert f["masked_rows"] == 3
    teacher = vit_flops(cfg.model, 32, 4) + head_flops(cfg.dino.head, 32, 4) + \
        head_flops(cfg.ibot.head, 32, 3)
    assert f["teacher_fwd"] == teacher
    student = vit_flops(cfg.model, 32, 4) + vit_flops(cfg.model, 16, 4) + \
        head_flops(cfg.dino.head, 32, 8) + head_flops(cfg.ibot.head, 32, 3)
    assert f["student_fwd_bwd"] == 3 * student
    assert f["gram_teacher_fwd"] == 0 and f["total"] == 3 * student + teacher


@pytest.mark.parametrize("extra, embed, blocks", [
    ([], 2, [2, 2, 2, 2]),                                          # everything trains: 3 fwd
    (["optim.frozen_blocks=2"], 0, [0, 0, 2, 2]),                   # no backward below block 2
    (["optim.frozen_blocks=-1"], 0, [0, 0, 0, 0]),                  # heads only
    (["optim.lora_rank=4", "optim.frozen_blocks=1"], 0, [0, 1, 1, 1]),  # input gradients only
])
def test_student_backward_counts_only_what_continued_pretraining_computes(extra, embed, blocks):
    base = ["model.arch=vit_test", "model.depth=4", "data.batch_size_per_gpu=2",
            "crops.global_crops_size=32", "crops.local_crops_size=16",
            "crops.local_crops_number=2", "model.drop_path_rate=0.0"]
    cfg = load_config(None, [*base, *extra])
    assert backbone_backward_factors(cfg) == (embed, blocks)
    (eg, bg), (el, bl) = vit_parts(cfg.model, 32, 4), vit_parts(cfg.model, 16, 4)
    D = arch_dims(cfg.model)["D"]
    heads = head_flops(cfg.dino.head, D, 8) + head_flops(cfg.ibot.head, D, 3)
    fwd = eg + el + 4 * (bg + bl) + heads
    bwd = embed * (eg + el) + sum(blocks) * (bg + bl) + 2 * heads
    assert step_flops(cfg)["student_fwd_bwd"] == fwd + bwd
    if not extra:
        assert fwd + bwd == 3 * fwd


def test_a_distillation_teacher_is_counted_with_its_own_architecture():
    """The frozen teacher's forward is its model's (a wider, deeper one here), not the
    student's; the student's part is unchanged; a ConvNeXt has no FLOP model: n/a."""
    base = ["model.arch=vit_test", "data.batch_size_per_gpu=2", "crops.global_crops_size=32",
            "crops.local_crops_size=16", "crops.local_crops_number=2", "model.drop_path_rate=0.0"]
    cfg = load_config(None, base)
    tcfg = load_config(None, [*base, "model.embed_dim=128", "model.depth=6", "model.num_heads=4",
                              "dino.head.hidden_dim=512"])
    own, distilled = step_flops(cfg), step_flops(cfg, tcfg)
    assert distilled["student_fwd_bwd"] == own["student_fwd_bwd"]
    M = own["masked_rows"]
    assert distilled["teacher_fwd"] == (vit_flops(tcfg.model, 32, 4)
                                        + head_flops(tcfg.dino.head, 128, 4)
                                        + head_flops(tcfg.ibot.head, 128, M))
    assert distilled["teacher_fwd"] > own["teacher_fwd"]
    cnx = load_config(None, ["model.arch=convnext_tiny", "distillation.enabled=true",
                             "distillation.teacher=/runs/t"])
    assert step_flops(cnx, cfg) is None
    r = report(cnx, 2, 1.0, {}, 0, None, torch.device("cpu"), True, teacher_cfg=cfg)
    assert r["achieved_tflops"] is None and r["mfu"] is None
    assert "n/a (no FLOP model for a ConvNeXt)" in format_report({**r, "nvml": None})


def test_peak_table_and_na_report():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("some cpu") is None
    cfg = load_config(None, ["model.arch=vit_test"])
    s = NvmlSampler(enabled=False)
    assert not s.available and s.summary() is None
    r = report(cfg, 4, 2.0, {"backward": 1.0, "student_forward": 0.4}, 0, s,
               torch.device("cpu"), True)
    assert r["images_per_s_per_gpu"] == cfg.data.batch_size_per_gpu / 0.5
    assert r["phases_s"]["backward"] == 0.25 and abs(r["phases_s"]["other"] - 0.15) < 1e-12
    assert r["mfu"] is None and r["nvml"] is None
    text = format_report(r)
    assert "GPU util %         n/a" in text and "power W            n/a" in text
    # a breakdown from 2 separate synchronised steps of 0.8 s: phases per such step, shares of it
    r = report(cfg, 4, 2.0, {"backward": 1.0, "student_forward": 0.4}, 0, s,
               torch.device("cpu"), True, phase_step_s=0.8, phase_steps=2)
    assert r["step_s"] == 0.5 and r["images_per_s_per_gpu"] == cfg.data.batch_size_per_gpu / 0.5
    assert r["phases_s"]["backward"] == 0.5 and abs(r["phases_s"]["other"] - 0.1) < 1e-12
    assert "backward           500.00   62.5 %" in format_report(r)


SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")


def test_step_flops_scale_with_gradient_accumulation():
    """One optimizer step of gas micro-batches does gas times the work of one micro-batch."""
    cfg1 = load_config(SMOKE, [])
    cfg2 = load_config(SMOKE, ["deepspeed.gradient_accumulation_steps=3"])
    f1, f3 = step_flops(cfg1), step_flops(cfg2)
    for part in ("student_fwd_bwd", "teacher_fwd", "total"):
        assert f3[part] == 3 * f1[part], part


def test_step_flops_of_a_resolution_mix_is_the_expectation():
    base = ["model.arch=vit_test", "data.batch_size_per_gpu=2", "crops.local_crops_number=2",
            "model.drop_path_rate=0.0", "data.loader=torch"]
    mix = load_config(None, [*base, "crops.resolution_mix=[[32,16,null,1],[64,32,null,3]]"])
    one, two = (step_flops(load_config(None, [*base, f"crops.global_crops_size={g}",
                                              f"crops.local_crops_size={lo}"]))
                for g, lo in ((32, 16), (64, 32)))
    got = step_flops(mix)
    for k in ("teacher_fwd", "student_fwd_bwd", "total"):
        assert got[k] == round(0.25 * one[k] + 0.75 * two[k]), k
    assert one["total"] < got["total"] < two["total"]
