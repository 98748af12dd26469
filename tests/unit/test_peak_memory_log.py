"""GPU peak memory in the log lines and metrics.jsonl (USERS.md §4: users asked for it in the
training logs, not only in `fastdino profile`): `max_mem_gib`, the peak since the previous line,
the largest over ranks."""

import torch

import fastdino.dist as fdist
from fastdino.metrics import MetricsLogger, peak_memory_gib


def test_peak_memory_is_read_and_reset_on_cuda_only(monkeypatch):
    assert peak_memory_gib(torch.device("cpu")) is None
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(d))
    dev = torch.device("cuda", 0)
    assert peak_memory_gib(dev) == 3.0 and calls == [dev]  # reset: the next line's own peak


def test_the_progress_line_shows_it(tmp_path):
    lines = []
    log = MetricsLogger(tmp_path, 100, 0, 8, True, printer=lines.append)
    rec = log.log(10, {"total_loss": 1.0, "lr": 1e-3, "max_mem_gib": 61.23})
    assert rec["max_mem_gib"] == 61.23 and "| mem 61.2 GiB" in lines[0], lines
    log.log(20, {"total_loss": 1.0, "lr": 1e-3})  # CPU: no memory field
    assert "mem" not in lines[1]


def test_ranks_report_their_largest_peak_not_the_mean(tmp_path, monkeypatch):
    from test_trainer_step import SMALL, SMOKE

    from fastdino.config import load_config
    from fastdino.train import Trainer

    trainer = Trainer(load_config(SMOKE, [*SMALL, f"train.output_dir={tmp_path}"]))
    # a stand-in for 2 ranks: the other rank's values are 0 (mean halves), its peak is lower
    monkeypatch.setattr(fdist, "all_reduce_mean", lambda x: x.div_(2))
    monkeypatch.setattr(fdist, "all_reduce_max", lambda x: x)
    out = trainer._average({"total_loss": torch.tensor(4.0), "max_mem_gib": 10.0})
    assert out["total_loss"] == 2.0 and out["max_mem_gib"] == 10.0
