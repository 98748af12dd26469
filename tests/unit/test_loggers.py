"""The optional metric sinks (fastdino/loggers.py): TensorBoard event files hold the logged curves
at their iterations; a W&B run gets the config, every line at its iteration, and keeps its id
across a resume; a missing package stops at the start with the extra to install."""

from __future__ import annotations

import json
import sys
import types

import pytest
from test_trainer_step import SMALL, SMOKE

from fastdino.config import ConfigError, load_config


def _trainer(tmp_path, *extra):
    from fastdino.train import Trainer

    return Trainer(load_config(SMOKE, [*SMALL, f"train.output_dir={tmp_path / 'run'}",
                                       "train.log_every=1", "train.max_iterations=3", *extra]))


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_the_logged_curves(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is the `log` extra (CI: dev)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _trainer(tmp_path, "train.tensorboard=true").train()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("total_loss")
    want = _metrics(tmp_path / "run")
    assert [e.step for e in events] == [m["iteration"] for m in want] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx([m["total_loss"] for m in want], rel=1e-6)
    assert "backbone_grad_norm_clipped" in acc.Tags()["scalars"]


class _FakeWandb(types.ModuleType):
    """Records what fastdino hands to wandb (the integration, not W&B itself)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        self.util = types.SimpleNamespace(generate_id=lambda: "abc123")

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_run_gets_config_lines_and_keeps_its_id(tmp_path, monkeypatch):
    import importlib.util

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "wandb" else real_find_spec(name, *a))
    _trainer(tmp_path, "train.wandb_project=fastdino-test", "train.wandb_run_name=smoke").train()
    init = fake.inits[0]
    assert (init["project"], init["name"], init["id"], init["resume"]) == \
        ("fastdino-test", "smoke", "abc123", "allow")
    assert init["config"]["model"]["depth"] == 2  # the resolved config
    want = _metrics(tmp_path / "run")
    assert [s for s, _ in fake.logged] == [1, 2, 3] and fake.finished == 1
    assert fake.logged[0][1]["total_loss"] == pytest.approx(want[0]["total_loss"])
    fake.util.generate_id = lambda: "other"  # a resumed run continues the same W&B run
    _trainer(tmp_path, "train.wandb_project=fastdino-test", "train.max_iterations=4").train()
    assert fake.inits[1]["id"] == "abc123" and fake.logged[-1][0] == 4


def test_a_missing_package_is_a_config_error(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "tensorboard")
                        else real_find_spec(name, *a))
    for key in ("train.tensorboard=true", "train.wandb_project=p"):
        with pytest.raises(ConfigError, match=r"needs the \w+ package: pip install 'fastdino\[log"):
            _trainer(tmp_path, key)


@pytest.mark.parametrize(("starts", "want"), [
    ((0, 1), [(1, 1.0), (2, 4.0), (3, 6.0)]),  # a resume from iteration 1 redoes 2 and 3
    # a run killed before its first checkpoint (or train.resume=none in a used folder) starts
    # again from 0: metrics.jsonl drops all the earlier start's lines, TensorBoard purges them
    ((0, 0), [(1, 2.0), (2, 4.0), (3, 6.0)]),
])
def test_a_restart_purges_the_tensorboard_steps_it_redoes(tmp_path, starts, want):
    """TensorBoard then holds one value per step, the later start's (an earlier start's events
    after the restart point are purged), not two."""
    pytest.importorskip("tensorboard", reason="tensorboard is the `log` extra (CI: dev)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastdino.loggers import TensorBoardSink

    for start, value in zip(starts, (1.0, 2.0), strict=True):
        sink = TensorBoardSink(tmp_path)
        sink.start(start)
        for it in range(start + 1, 4):
            sink.log(it, {"iteration": it, "total_loss": value * it})
        sink.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("total_loss")] == want


def test_wandb_says_the_redone_steps_it_drops_and_never_keeps_an_empty_id(tmp_path, monkeypatch,
                                                                          caplog):
    from fastdino.loggers import WandbSink

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(SMOKE, ["train.wandb_project=p"])
    (tmp_path / WandbSink.ID_FILE).write_text("")  # a crash while it was first written
    sink = WandbSink(cfg, tmp_path)
    assert fake.inits[0]["id"] == "abc123"
    assert (tmp_path / WandbSink.ID_FILE).read_text().strip() == "abc123"
    sink.run.step = 8  # the W&B run logged up to iteration 7; the checkpoint was at 4
    with caplog.at_level("WARNING", logger="fastdino.loggers"):
        sink.start(4)
    assert "iterations 5 to 7" in caplog.text and "abc123" in caplog.text
    caplog.clear()
    sink.run.step = 5  # nothing redone below W&B's step: nothing to say
    with caplog.at_level("WARNING", logger="fastdino.loggers"):
        sink.start(4)
    assert caplog.text == ""
