"""`fastdino.profile.profile` end to end on the CPU: a few smoke-sized optimizer steps, with
gradient accumulation, measured and reported (the GPU columns say n/a)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastdino.config import load_config
from fastdino.profile import PHASES, format_report, main, profile

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")


def test_profile_reports_steps_and_throughput(tmp_path):
    gas = 2
    cfg = load_config(SMOKE, [f"train.output_dir={tmp_path}", "data.num_workers=0",
                              f"deepspeed.gradient_accumulation_steps={gas}"])
    r = profile(cfg, steps=2, warmup=1, fixed_batch=True)
    assert r["steps"] == 2 and r["skipped_steps"] == 0
    assert r["gradient_accumulation_steps"] == gas
    # an optimizer step consumes gas micro-batches of batch_size_per_gpu images
    B = cfg.data.batch_size_per_gpu
    assert r["images_per_s_per_gpu"] == pytest.approx(B * gas / r["step_s"])
    assert set(PHASES) <= set(r["phases_s"])
    assert r["phases_s"]["student_forward"] > 0 and r["phases_s"]["backward"] > 0
    assert r["mfu"] is None and r["peak_mem_gib"] is None  # no GPU: n/a, not zero
    assert "n/a" in format_report(r)


def test_a_bad_override_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", "smoke", "train.epochs=x"])
    assert e.value.code == 2 and "train.epochs" in capsys.readouterr().err
