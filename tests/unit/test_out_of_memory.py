"""A GPU out-of-memory ends the run with one line: torch's own first line (what it tried to
allocate), the settings that trade memory for time with their values now, and where the same
command continues from; not a 60-line traceback ending in the caching allocator (USERS.md: the
most asked question after a crash is what to change)."""

import torch
from test_trainer_step import SMALL, SMOKE

import fastdino.train as train_mod

OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB "
       "of which 1.06 GiB is free.\nInclude non-PyTorch memory, ...")


def _run(tmp_path, monkeypatch, where):
    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(OOM)

    monkeypatch.setattr(train_mod.Trainer, where, boom)
    return train_mod.main(["--config", str(SMOKE), *SMALL, f"train.output_dir={tmp_path}",
                           "train.max_iterations=1"])


def test_out_of_memory_in_a_step_names_the_remedies_and_the_resume_point(tmp_path, monkeypatch,
                                                                          caplog):
    with caplog.at_level("ERROR", logger="fastdino"):
        assert _run(tmp_path, monkeypatch, "train") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    line = errors[0]
    assert line.startswith("out of GPU memory: CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert "Include non-PyTorch" not in line  # the first line of torch's message only
    assert "lower data.batch_size_per_gpu (now 4) and raise " \
        "deepspeed.gradient_accumulation_steps (now 1)" in line
    assert "model.activation_checkpointing=true" in line and "deepspeed.zero_stage=3" in line
    assert "no checkpoint was written yet: the same command starts over" in line


def test_out_of_memory_at_start(tmp_path, monkeypatch, caplog):
    with caplog.at_level("ERROR", logger="fastdino"):
        assert _run(tmp_path, monkeypatch, "__init__") == 1
    assert "out of GPU memory: CUDA out of memory." in caplog.text
    assert "the run did not start" in caplog.text
