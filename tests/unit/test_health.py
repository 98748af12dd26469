"""Run-health checks (fastdino/health.py): each condition fires after its patience, only after
the teacher-temperature warm-up where the start of training looks alike, clears, and the
`fastdino health` report of a real run finds the uniform Sinkhorn-Knopp targets of a tiny batch."""

from __future__ import annotations

import json
import math

import pytest

from fastdino.health import HealthMonitor, main, report

K = 1024
LN_K = math.log(K)


def _feed(monitor, rows):
    out = []
    for it, values in rows:
        out += monitor.update(it, values)
    return out


def test_uniform_teacher_after_the_warmup_with_patience_then_cleared():
    m = HealthMonitor(K, warmup_iterations=10)
    early = _feed(m, [(i, {"dino_teacher_entropy": LN_K}) for i in (2, 4, 6, 8, 10)])
    assert early == []  # the start of training is uniform by construction: not reported
    f = _feed(m, [(12, {"dino_teacher_entropy": LN_K}), (14, {"dino_teacher_entropy": LN_K})])
    assert f == []  # 2 lines < patience 3
    f = _feed(m, [(16, {"dino_teacher_entropy": 0.995 * LN_K})])
    assert [x.key for x in f] == ["uniform_teacher"] and not f[0].cleared
    assert "raise data.batch_size_per_gpu" in f[0].message and m.active == {"uniform_teacher": 16}
    assert _feed(m, [(18, {"dino_teacher_entropy": LN_K})]) == []  # reported once
    f = _feed(m, [(20, {"dino_teacher_entropy": 0.6 * LN_K})])
    assert [(x.key, x.cleared) for x in f] == [("uniform_teacher", True)] and m.active == {}


def test_teacher_collapse_and_koleo_duplicates():
    m = HealthMonitor(K, warmup_iterations=0, patience=1)
    sharp = {"dino_teacher_entropy": 0.005 * LN_K, "dino_global_crops_loss": 2.5}
    assert m.update(4, sharp) == []  # sharp targets the student does not match: healthy
    f = m.update(5, {**sharp, "dino_global_crops_loss": 0.01, "koleo_nn_dist_min": 3e-6})
    assert sorted(x.key for x in f) == ["koleo_duplicates", "teacher_collapse"]
    f = m.update(6, {"dino_teacher_entropy": 0.3 * LN_K, "dino_global_crops_loss": 3.0,
                     "koleo_nn_dist_min": 0.2})
    assert all(x.cleared for x in f) and len(f) == 2
    healthy = HealthMonitor(K, warmup_iterations=0, patience=1)
    assert healthy.update(1, {"dino_teacher_entropy": 0.3 * LN_K, "koleo_nn_dist_min": 0.1,
                              "data_wait_fraction": 0.02, "backbone_grad_norm": 2.0}) == []


def test_grad_spike_against_the_recent_median():
    m = HealthMonitor(K, warmup_iterations=0)
    steady = [(i, {"backbone_grad_norm": 2.0 + 0.1 * (i % 3), "dino_head_grad_norm": 1.0})
              for i in range(10)]
    assert _feed(m, steady) == []
    f = m.update(10, {"backbone_grad_norm": 30.0, "dino_head_grad_norm": 1.1})
    assert [x.key for x in f] == ["grad_spike"]  # at once: a spike has no patience
    assert "backbone_grad_norm 30" in f[0].message and "dino_head" not in f[0].message
    assert m.update(11, {"backbone_grad_norm": 2.0, "dino_head_grad_norm": 1.0})[0].cleared
    # a slow rise (x2.6 over the median window) is no spike: the median follows it
    m2 = HealthMonitor(K, warmup_iterations=0)
    assert _feed(m2, [(i, {"backbone_grad_norm": 1.1 ** i}) for i in range(30)]) == []


def test_data_stall():
    m = HealthMonitor(K, warmup_iterations=0)
    f = _feed(m, [(i, {"data_wait_fraction": 0.6}) for i in range(3)])
    assert [x.key for x in f] == ["data_stall"] and "data.num_workers" in f[0].message
    assert _feed(m, [(3, {"data_wait_fraction": float("nan")})]) == []  # not logged: no change


def test_data_stall_names_the_knobs_of_the_loader_in_use():
    from test_trainer_step import SMOKE

    from fastdino.config import load_config

    def message(*over):
        m = HealthMonitor.from_config(load_config(SMOKE, list(over)))
        return _feed(m, [(i, {"data_wait_fraction": 0.6}) for i in range(3)])[0].message

    dali = message("data.loader=dali", "data.dali_source_workers=3")
    assert "data.dali_source_workers (now 3" in dali and "data.num_workers" not in dali
    gpu = message("data.loader=torch", "data.torch_photometric=gpu", "data.num_workers=5")
    assert "data.num_workers (now 5)" in gpu and "torch_photometric" not in gpu
    cpu = message("data.loader=torch", "data.torch_photometric=cpu")
    assert "data.torch_photometric=gpu" in cpu and "data.loader=dali" in cpu


def test_report_of_a_tiny_batch_run(tmp_path, capsys):
    """4 images per step against 128 prototypes: Sinkhorn-Knopp's targets are uniform once the
    teacher temperature has warmed up (the README's learning check says so)."""
    from test_trainer_step import SMALL, SMOKE

    from fastdino.config import load_config
    from fastdino.train import Trainer

    out = tmp_path / "run"
    cfg = load_config(SMOKE, [*SMALL, f"train.output_dir={out}", "train.resume=none",
                              "train.max_iterations=8", "train.log_every=1",
                              "schedules.warmup_teacher_temp_epochs=0.2", "train.epoch_length=10"])
    Trainer(cfg).train()
    findings, active, last = report(out)
    assert last == 8 and "uniform_teacher" in active
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dino_teacher_entropy"] >= 0.99 * math.log(128) for r in rec[2:])
    assert main([str(out)]) == 1
    assert "uniform_teacher (since" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="training run folder"):
        report(tmp_path)
    # a co-distillation run: its further students are reported after the main one
    student = out / "students" / "vitb"
    student.mkdir(parents=True)
    (student / "config.yaml").write_text((out / "config.yaml").read_text())
    (student / "metrics.jsonl").write_text("\n".join(
        json.dumps({**r, "dino_teacher_entropy": 0.5 * math.log(128), "data_wait_fraction": 0.0})
        for r in rec) + "\n")
    assert main([str(out)]) == 1  # the main student is still uniform
    text = capsys.readouterr().out
    assert f"== {out}\n" in text and f"== {student}\n" in text
    assert text.split(f"== {student}")[1].strip().endswith("no condition active")


def test_a_folder_without_metrics_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing")])
    assert e.value.code == 2
    assert "metrics.jsonl does not exist: give a training run folder" in capsys.readouterr().err


def test_report_reads_past_bytes_a_crash_left_in_metrics(tmp_path):
    """A crash can leave undecodable bytes at the end of metrics.jsonl: the report skips that
    line (as a line cut short), it said "'utf-8' codec can't decode byte 0xff"."""
    from fastdino.config import Config, save_config

    save_config(Config(), tmp_path / "config.yaml")
    line = json.dumps({"iteration": 1, "total_loss": 1.0})
    (tmp_path / "metrics.jsonl").write_bytes(line.encode() + b"\n\xff\xfe\x00garbage")
    findings, active, last = report(tmp_path)
    assert last == 1 and not active
