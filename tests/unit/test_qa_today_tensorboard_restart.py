"""A run killed before its first checkpoint starts again from iteration 0 (or train.resume=none
in a used folder): metrics.jsonl drops all of the earlier start's lines (drop_redone_lines), and
TensorBoard must purge them too, or each step holds two values."""

from __future__ import annotations

import pytest


def test_a_restart_from_iteration_0_purges_the_earlier_starts_tensorboard_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is the `log` extra (CI: dev)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastdino.loggers import TensorBoardSink

    for value in (1.0, 2.0):  # the first start (killed before a checkpoint), then the rerun
        sink = TensorBoardSink(tmp_path)
        sink.start(0)
        for it in range(1, 4):
            sink.log(it, {"iteration": it, "total_loss": value * it})
        sink.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("total_loss")]
    assert got == [(1, 2.0), (2, 4.0), (3, 6.0)]
