"""Co-distillation on 2 DeepSpeed ranks (fastdino/codistill.py, codistill_ranks.py).

Shared layout: two DeepSpeed engines in each process (the main student under ZeRO-2, the other
under ZeRO-3), one teacher forward per batch; the second student's losses equal those of its own
config trained alone on the same 2 ranks.
Own ranks (`distillation.student_ranks=[2,1]` on 3 ranks): the main student data parallel on
ranks 0-1 at 3 images each (slices across two ranks' batches), the other on rank 2 at 6; both
students' losses equal the shared layout's on the same 3 ranks (the same global batch, teacher
targets and gradients, summed in another order), with gradient accumulation, across a
resume and when a run of the shared layout continues in this one; a student stopping on
non-finite steps stops the other rank's student too, each with a
checkpoint of that iteration."""

import math
import shutil

import pytest
from trainer_helpers import FAST, SMOKE, TRAIN, read_metrics, run_ds, run_py

KEYS = ("total_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss", "backbone_grad_norm")
SMALL = ["dino.head.n_prototypes=128", "ibot.head.n_prototypes=128", "optim.warmup_epochs=0"]
# the same losses on 1 rank x 4 images as on 2 ranks x 2: no per-rank randomness (drop-path, RoPE
# jitter) and no per-rank KoLeo groups
SAME_ON_ANY_SPLIT = ["model.drop_path_rate=0", "model.rope_rescale=null", "koleo.loss_weight=0",
                     "data.batch_size_per_gpu=2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("codistill") / "teacher"
    run_py(["--config", str(SMOKE), *FAST, *SMALL, f"train.output_dir={out}",
            "train.max_iterations=1", "model.depth=3"])
    return out


def _common(teacher, student, *extra):
    return ["--config", str(SMOKE), *FAST, *SMALL, "distillation.enabled=true",
            f"distillation.teacher={teacher}", f"distillation.students=[{student}]", *extra]


def _assert_same(a: list[dict], b: list[dict], keys, rel: float) -> None:
    assert [m["iteration"] for m in a] == [m["iteration"] for m in b]
    for x, y in zip(a, b, strict=True):
        for k in keys:
            assert math.isclose(x[k], y[k], rel_tol=rel, abs_tol=rel), (x["iteration"], k, x[k],
                                                                        y[k])


@pytest.mark.slow
def test_two_students_on_two_ranks_equal_their_runs_alone(tmp_path, teacher):
    student = tmp_path / "vitb.yaml"
    student.write_text("model:\n  depth: 1\ndeepspeed:\n  zero_stage: 3\noptim:\n  lr: 0.002\n")
    co = tmp_path / "co"
    p = run_ds(TRAIN, [*_common(teacher, student, "train.max_iterations=3"),
                       f"train.output_dir={co}", "deepspeed.zero_stage=2"])
    assert "co-distillation: 2 students (main, vitb)" in p.stderr
    alone = tmp_path / "alone"
    run_ds(TRAIN, ["--config", str(co / "students" / "vitb" / "config.yaml"),
                   f"train.output_dir={alone}", "train.resume=none"])
    a, b = read_metrics(co / "students" / "vitb"), read_metrics(alone)
    assert [m["iteration"] for m in a] == [1, 2, 3]
    _assert_same(a, b, KEYS, 1e-6)
    main = read_metrics(co)
    assert [m["iteration"] for m in main] == [1, 2, 3]
    assert abs(main[-1]["total_loss"] - a[-1]["total_loss"]) > 1e-4  # two different students
    for folder in (co, co / "students" / "vitb"):
        assert (folder / "teacher_backbone.safetensors").is_file()


@pytest.mark.slow
def test_students_on_their_own_ranks_equal_the_shared_layout_across_a_resume(tmp_path, teacher):
    import yaml

    student = tmp_path / "vitb.yaml"
    student.write_text("model:\n  depth: 1\ndeepspeed:\n  zero_stage: 2\noptim:\n  lr: 0.002\n")
    # gas 2: both micro-batches' exchanged outputs kept for the step
    common = _common(teacher, student, *SAME_ON_ANY_SPLIT, "train.checkpoint_every=2",
                     "deepspeed.gradient_accumulation_steps=2")
    shared, own, switch = tmp_path / "shared", tmp_path / "own", tmp_path / "switch"
    run_ds(TRAIN, [*common, f"train.output_dir={shared}", "train.max_iterations=2"], ranks=3)
    shutil.copytree(shared, switch)
    run_ds(TRAIN, [*common, f"train.output_dir={shared}", "train.max_iterations=3"], ranks=3)
    # a run of the shared layout continued in the ranks layout: each student's checkpoint of 3
    # ranks loads on its own 2 or 1 ranks, at the same data position
    p = run_ds(TRAIN, [*common, f"train.output_dir={switch}", "train.max_iterations=3",
                       "distillation.student_ranks=[2,1]"], ranks=3)
    assert "distillation.student_ranks: [] -> [2, 1]" in p.stderr
    ranks = [*common, f"train.output_dir={own}", "distillation.student_ranks=[2,1]"]
    p = run_ds(TRAIN, [*ranks, "train.max_iterations=2"], ranks=3)
    assert "student vitb on ranks 2-2 of 3, 6 images per rank" in p.stderr
    assert "student main on ranks 0-1 of 3, 3 images per rank" in p.stderr
    # train.resume=auto: from iteration 2
    p = run_ds(TRAIN, [*ranks, "train.max_iterations=3"], ranks=3)
    assert "[vitb] resumed from" in p.stderr and "[main] resumed from" in p.stderr
    # (KoLeo is logged at weight 0: per-rank groups of 3 or 6 images here, 2 in the shared one)
    keys = [k for k in KEYS if k != "koleo_loss"] + ["dino_local_crops_loss"]
    for sub in ("", "students/vitb"):
        for run in (own, switch):
            _assert_same(read_metrics(run / sub), read_metrics(shared / sub), keys, 1e-5)
            assert [m["iteration"] for m in read_metrics(run / sub)] == [1, 2, 3]
    # the student's folder trains it alone on its 1 rank (6 images); the main one holds the run's
    alone = yaml.safe_load((own / "students" / "vitb" / "config.yaml").read_text())
    assert alone["data"]["batch_size_per_gpu"] == 6
    assert alone["distillation"]["students"] == [] and alone["distillation"]["student_ranks"] == []
    run = yaml.safe_load((own / "config.yaml").read_text())
    assert run["data"]["batch_size_per_gpu"] == 2 and run["distillation"]["student_ranks"] == [2, 1]


@pytest.mark.slow
def test_a_student_stopping_on_nonfinite_steps_stops_the_other_ranks(tmp_path, teacher):
    student = tmp_path / "vitb.yaml"
    # the first step is finite (its loss comes before its ~1e29 lr update); the next two are not
    student.write_text("model:\n  depth: 1\noptim:\n  lr: 1.0e+30\n")
    out = tmp_path / "own"
    p = run_ds(TRAIN, [*_common(teacher, student, "distillation.student_ranks=[1,1]",
                                "train.max_iterations=6", "train.max_consecutive_nan=2",
                                "train.checkpoint_every=100"), f"train.output_dir={out}"],
               check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "[vitb] 2 consecutive non-finite steps" in p.stderr
    assert "[main] stopped at iteration 3 with the co-distillation run (student vitb" in p.stderr
    for folder in (out, out / "students" / "vitb"):
        assert (folder / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
