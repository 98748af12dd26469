"""Co-distillation on 2 DeepSpeed ranks (fastdino/codistill.py): two DeepSpeed engines in each
process (the main student under ZeRO-2, the other under ZeRO-3), one teacher forward per batch.
The second student's losses equal those of its own config trained alone on the same 2 ranks."""

import math

import pytest
from trainer_helpers import FAST, SMOKE, TRAIN, read_metrics, run_ds, run_py

KEYS = ("total_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss", "backbone_grad_norm")
SMALL = ["dino.head.n_prototypes=128", "ibot.head.n_prototypes=128", "optim.warmup_epochs=0"]


@pytest.mark.slow
def test_two_students_on_two_ranks_equal_their_runs_alone(tmp_path):
    teacher = tmp_path / "teacher"
    run_py(["--config", str(SMOKE), *FAST, *SMALL, f"train.output_dir={teacher}",
            "train.max_iterations=1", "model.depth=3"])
    student = tmp_path / "vitb.yaml"
    student.write_text("model:\n  depth: 1\ndeepspeed:\n  zero_stage: 3\noptim:\n  lr: 0.002\n")
    co = tmp_path / "co"
    common = ["--config", str(SMOKE), *FAST, *SMALL, "train.max_iterations=3",
              "distillation.enabled=true", f"distillation.teacher={teacher}"]
    p = run_ds(TRAIN, [*common, f"train.output_dir={co}", f"distillation.students=[{student}]",
                       "deepspeed.zero_stage=2"])
    assert "co-distillation: 2 students (main, vitb)" in p.stderr
    alone = tmp_path / "alone"
    run_ds(TRAIN, ["--config", str(co / "students" / "vitb" / "config.yaml"),
                   f"train.output_dir={alone}", "train.resume=none"])
    a, b = read_metrics(co / "students" / "vitb"), read_metrics(alone)
    assert [m["iteration"] for m in a] == [m["iteration"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        for k in KEYS:
            assert math.isclose(x[k], y[k], rel_tol=1e-6, abs_tol=1e-6), (x["iteration"], k)
    main = read_metrics(co)
    assert [m["iteration"] for m in main] == [1, 2, 3]
    assert abs(main[-1]["total_loss"] - a[-1]["total_loss"]) > 1e-4  # two different students
    for folder in (co, co / "students" / "vitb"):
        assert (folder / "teacher_backbone.safetensors").is_file()
