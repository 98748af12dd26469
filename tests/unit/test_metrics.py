"""The progress line and metrics.jsonl (fastdino/metrics.py), on a fake clock."""

import json

import pytest

from fastdino import metrics


@pytest.fixture
def clock(monkeypatch):
    now = {"t": 100.0}
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now["t"])
    return now


def test_progress_line_images_per_second_data_share_and_eta(tmp_path, clock):
    lines = []
    log = metrics.MetricsLogger(tmp_path, total_iterations=30, start_iteration=0,
                                images_per_step=64, enabled=True, printer=lines.append)
    clock["t"] += 4.0  # 10 iterations in 4 s, 1 s of it waiting for data
    rec = log.log(10, {"total_loss": 9.5, "koleo_loss": -0.5, "lr": 1e-4, "data_wait_s": 1.0})
    assert rec["images_per_second"] == pytest.approx(160.0)
    assert rec["data_wait_fraction"] == pytest.approx(0.25)
    assert lines[-1] == ("it 10/30 | total_loss 9.5 koleo -0.5 | lr 0.0001 | 160.0 img/s | "
                         "data 25% | ETA 0:00:08")
    clock["t"] += 2.0  # the next window only: 10 iterations in 2 s, no wait
    rec = log.log(20, {"total_loss": 9.0, "lr": 1e-4, "data_wait_s": 0.0})
    assert rec["images_per_second"] == pytest.approx(320.0) and rec["data_wait_fraction"] == 0
    assert "| data 0% |" in lines[-1] and lines[-1].endswith("ETA 0:00:03")
    written = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in written] == [10, 20]
    assert written[0]["data_wait_s"] == 1.0 and written[0]["data_wait_fraction"] == 0.25
    # without a data_wait_s value (callers that do not measure it) the line has no data share
    clock["t"] += 1.0
    log.log(30, {"total_loss": 8.0, "lr": 1e-4})
    assert "data" not in lines[-1] and "data_wait_fraction" not in json.loads(
        (tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_progress_line_says_when_the_backbone_is_held(tmp_path, clock):
    lines = []
    log = metrics.MetricsLogger(tmp_path, total_iterations=30, start_iteration=0,
                                images_per_step=8, enabled=True, printer=lines.append)
    for it, backbone_lr in ((1, 0.0), (2, 1e-4)):
        clock["t"] += 1.0
        log.log(it, {"total_loss": 9.5, "lr": 1e-4, "backbone_lr": backbone_lr})
    assert "| lr 0.0001 (backbone 0) |" in lines[0]
    assert "| lr 0.0001 |" in lines[1]
