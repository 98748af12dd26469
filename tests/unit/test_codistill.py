"""Co-distillation (fastdino/codistill.py): two students of another size than the 3-block teacher
run, trained in one run over one loader and one teacher forward per batch. Each student's run
equals the run its own config gives alone, step for step (drop-path on: the students' RNG
streams must be their own), also across a resume; and the config rules name the bad key."""

from __future__ import annotations

import json

import pytest
import torch
from test_distillation import STEP, teacher_run  # noqa: F401 - the teacher run fixture
from test_trainer_step import SMALL, SMOKE

from fastdino.codistill import CoDistillation, common_resume, student_configs
from fastdino.config import ConfigError, config_changes, load_config

LOSSES = ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss",
          "koleo_loss", "backbone_grad_norm")


def _write_student(path, depth=1, lr=0.02, extra=""):
    path.write_text(f"model:\n  depth: {depth}\n  drop_path_rate: 0.2\noptim:\n  lr: {lr}\n"
                    + extra)
    return path


def _cfg(tmp_path, teacher, students=(), *extra):
    listed = "[" + ", ".join(str(s) for s in students) + "]"
    return load_config(SMOKE, [*SMALL, *STEP, f"train.output_dir={tmp_path / 'run'}",
                               "distillation.enabled=true", f"distillation.teacher={teacher}",
                               f"distillation.students={listed}", "train.log_every=1",
                               "train.checkpoint_every=2", *extra])


def _losses(history):
    return [(h["iteration"], [h[k] for k in LOSSES]) for h in history]


def test_each_student_trains_as_alone_on_one_teacher_forward(tmp_path, teacher_run):  # noqa: F811
    from fastdino.train import Trainer
    from fastdino.train import main as train_main

    vitb = _write_student(tmp_path / "vitb.yaml")
    cfg = _cfg(tmp_path, teacher_run, [vitb], "train.max_iterations=3")
    students = student_configs(cfg)
    assert [n for n, _ in students] == ["main", "vitb"]
    assert students[1][1].train.output_dir == str(tmp_path / "run" / "students" / "vitb")
    assert students[1][1].model.depth == 1 and cfg.model.depth == 2

    co = CoDistillation(_cfg(tmp_path, teacher_run, [vitb], "train.max_iterations=2"))
    histories = co.train()
    assert co.teacher.forwards == 2  # one teacher forward per batch, for both students

    alone = []
    for name, scfg in students:  # each student's config, run alone to iteration 3
        scfg.train.output_dir = str(tmp_path / "alone" / name)
        scfg.train.resume = "none"
        alone.append(Trainer(scfg).train())
    for co_h, solo_h in zip(histories, alone, strict=True):
        assert _losses(co_h) == _losses(solo_h)[:2]
    assert _losses(alone[0]) != _losses(alone[1])  # two different students (the test can fail)

    # the co-run continued through the CLI (train.resume=auto: both students from iteration 2)
    over = [*SMALL, *STEP, f"train.output_dir={tmp_path / 'run'}", "distillation.enabled=true",
            f"distillation.teacher={teacher_run}", f"distillation.students=[{vitb}]",
            "train.log_every=1", "train.checkpoint_every=2", "train.max_iterations=3"]
    assert train_main(["--config", str(SMOKE), *over]) == 0
    for folder, solo_h in ((tmp_path / "run", alone[0]),
                           (tmp_path / "run" / "students" / "vitb", alone[1])):
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert _losses(lines[-1:]) == _losses(solo_h)[2:]
        assert (folder / "teacher_backbone.safetensors").is_file()
        assert (folder / "checkpoints" / "iter_0000003").is_dir()
        # the previous config is kept (max_iterations 2 -> 3), and that is the only change: the
        # common resume point is not written into train.resume
        (kept,) = folder.glob("config.*.yaml")
        changes = config_changes(load_config(kept).to_dict(),
                                 load_config(folder / "config.yaml").to_dict())
        assert changes == ["train.max_iterations: 2 -> 3"]
        saved = json.loads(json.dumps(load_config(folder / "config.yaml").to_dict()))
        assert saved["distillation"]["students"] == ([str(vitb)] if folder.name == "run" else [])


def test_gradient_accumulation_keeps_every_micro_batch_for_every_student(tmp_path,
                                                                          teacher_run):  # noqa: F811
    """gas = 2: each student takes both micro-batches; the teacher runs twice per step."""
    vitb = _write_student(tmp_path / "vitb.yaml")
    co = CoDistillation(_cfg(tmp_path, teacher_run, [vitb], "train.max_iterations=1",
                             "deepspeed.gradient_accumulation_steps=2"))
    calls = []
    real = co.teacher.teacher.teacher_forward
    co.teacher.teacher.teacher_forward = lambda g, m: calls.append(g) or real(g, m)
    co.train()
    assert co.teacher.forwards == 2 and len(calls) == 2 and calls[0] is not calls[1]


def test_student_config_rules(tmp_path, teacher_run):  # noqa: F811
    shared = _write_student(tmp_path / "bad.yaml", extra="data:\n  batch_size_per_gpu: 8\n")
    with pytest.raises(ConfigError, match=r"data.batch_size_per_gpu is shared by all students"):
        student_configs(_cfg(tmp_path, teacher_run, [shared]))
    proto = _write_student(tmp_path / "proto.yaml",
                           extra="dino:\n  head:\n    n_prototypes: 64\n")
    with pytest.raises(ConfigError, match=r"dino.head.n_prototypes=64 but the teacher.*128"):
        student_configs(_cfg(tmp_path, teacher_run, [proto]))
    (tmp_path / "x").mkdir()
    a, b = _write_student(tmp_path / "s.yaml"), _write_student(tmp_path / "x" / "s.yaml")
    with pytest.raises(ConfigError, match=r"two students are named 's'"):
        student_configs(_cfg(tmp_path, teacher_run, [a, b]))
    with pytest.raises(ConfigError, match=r"is invalid: allowed is a yaml file or a preset"):
        student_configs(_cfg(tmp_path, teacher_run, [tmp_path / "missing.yaml"]))
    ok = _write_student(tmp_path / "ok.yaml", extra="train:\n  tensorboard: true\n")
    (_, scfg), = student_configs(_cfg(tmp_path, teacher_run, [ok],
                                         "train.wandb_project=p"))[1:]
    assert scfg.train.tensorboard and scfg.train.wandb_project is None  # W&B: main only
    with pytest.raises(ConfigError, match=r"distillation.students.*distillation.enabled"):
        load_config(SMOKE, [f"distillation.students=[{ok}]"])


def test_a_student_failing_on_an_inherited_key_is_named(tmp_path, teacher_run):  # noqa: F811
    """The main student (the teacher's architecture here) starts from the teacher run's
    weights; the 1-block student inherits model.pretrained_weights, which does not fit it: the
    error says which student and where its keys come from."""
    small = _write_student(tmp_path / "small.yaml")
    cfg = _cfg(tmp_path, teacher_run, [small], "model.depth=3", "model.embed_dim=96",
               "model.num_heads=3", f"model.pretrained_weights={teacher_run}")
    with pytest.raises(ValueError, match=r"student small \(.*small.yaml; keys it does not set "
                                         r"are the main config's\): model.pretrained_weights"):
        CoDistillation(cfg)


def test_resume_takes_the_latest_iteration_every_student_has(tmp_path, teacher_run):  # noqa: F811
    vitb = _write_student(tmp_path / "vitb.yaml")
    students = student_configs(_cfg(tmp_path, teacher_run, [vitb], "train.resume=auto"))
    for (_, c), its in zip(students, ([2, 4], [2]), strict=True):
        for it in its:
            d = tmp_path / c.train.output_dir / "checkpoints" / f"iter_{it:07d}"
            d.mkdir(parents=True)
            torch.save({}, d / "trainer_state.pt")
    paths = common_resume(students)
    assert paths == [tmp_path / c.train.output_dir / "checkpoints" / "iter_0000002"
                     for _, c in students]
    assert all(c.train.resume == "auto" for _, c in students)  # the configs stay as given
    students = student_configs(_cfg(tmp_path, teacher_run, [vitb], "train.resume=auto"))
    (tmp_path / "run" / "students" / "vitb" / "checkpoints" / "iter_0000002" /
     "trainer_state.pt").unlink()
    with pytest.raises(ConfigError, match=r"no checkpoint of a common iteration.*main: \[2, 4\]"):
        common_resume(students)
    students = student_configs(_cfg(tmp_path, teacher_run, [vitb], "train.resume=/some/ckpt"))
    with pytest.raises(ConfigError, match=r"resumes with auto"):
        common_resume(students)


def test_resume_passes_over_incomplete_checkpoints_saying_so(tmp_path, teacher_run,  # noqa: F811
                                                               caplog):
    """A checkpoint cut short by a crash (an empty trainer_state.pt) is not taken for the common
    iteration, with a warning naming it; only incomplete ones stop the start (as a single run)."""
    vitb = _write_student(tmp_path / "vitb.yaml")
    students = student_configs(_cfg(tmp_path, teacher_run, [vitb], "train.resume=auto"))
    for _, c in students:
        for it in (2, 4):
            d = tmp_path / c.train.output_dir / "checkpoints" / f"iter_{it:07d}"
            d.mkdir(parents=True)
            torch.save({}, d / "trainer_state.pt")
    cut = tmp_path / students[1][1].train.output_dir / "checkpoints" / "iter_0000004"
    (cut / "trainer_state.pt").write_bytes(b"")
    with caplog.at_level("WARNING"):
        paths = common_resume(students)
    assert [p.name for p in paths] == ["iter_0000002", "iter_0000002"]
    assert "incomplete checkpoints passed over" in caplog.text and str(cut) in caplog.text
    for _, c in students:
        for it in (2, 4):
            d = tmp_path / c.train.output_dir / "checkpoints" / f"iter_{it:07d}"
            (d / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no complete checkpoint to resume from \(4 incomplete"):
        common_resume(students)


def test_a_signal_between_two_students_stops_both_at_the_same_iteration(tmp_path,
                                                                          teacher_run):  # noqa: F811
    """The signal lands after the main student's step of iteration 1 and before the other's:
    both stop after that iteration, both with a checkpoint of it, no export."""
    vitb = _write_student(tmp_path / "vitb.yaml")
    co = CoDistillation(_cfg(tmp_path, teacher_run, [vitb], "train.max_iterations=5",
                             "train.checkpoint_every=100"))
    other = co.trainers[1]
    real = other.step

    def step(it, batches):
        if it == 1:
            other.stop.requested = "SIGUSR1"
        return real(it, batches)

    other.step = step
    histories = co.train()
    assert co.stopped_by == "SIGUSR1"
    assert [h[-1]["iteration"] for h in histories] == [2, 2]
    for tr in co.trainers:
        assert (tr.out / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
        assert not (tr.out / "teacher_backbone.safetensors").exists()


def test_a_student_stopping_on_nonfinite_steps_saves_the_others(tmp_path, teacher_run):  # noqa: F811
    """The second student's steps are non-finite from iteration 1 on: at the second in a row
    (train.max_consecutive_nan=2) the run stops with its error, and both students (the main one
    before it in the step order too) hold a checkpoint of that iteration."""
    from fastdino.stop import NonFiniteLossError

    vitb = _write_student(tmp_path / "vitb.yaml")
    co = CoDistillation(_cfg(tmp_path, teacher_run, [vitb], "train.max_iterations=6",
                             "train.checkpoint_every=100", "train.max_consecutive_nan=2"))
    other = co.trainers[1]
    real = other.step
    other.step = lambda it, batches: real(it, batches) if it == 0 else None
    with pytest.raises(NonFiniteLossError, match=r"\[vitb\] 2 consecutive non-finite"):
        co.train()
    for tr in co.trainers:
        assert (tr.out / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
