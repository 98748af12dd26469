"""Checkpoint writes that fail or are cut short (single process, plain torch engine; the same
code runs on every rank): nothing already saved is lost, the error is one line naming the folder,
and what a failed save left behind does not stay on a full disk."""

import pytest
import torch
from torch import nn

from fastdino import checkpoint as ck
from fastdino.config import load_config
from fastdino.parallel import DistInfo, TorchStudent


def _engine():
    torch.manual_seed(0)
    m = nn.Linear(4, 2)
    groups = [{"params": list(m.parameters()), "lr": 0.1, "weight_decay": 0.0,
               "lr_multiplier": 1.0, "wd_multiplier": 0.0, "is_last_layer": False,
               "is_backbone": False}]
    return TorchStudent(m, groups, load_config(None, []),
                        DistInfo(0, 1, 0, torch.device("cpu"), False), torch.float32)


def test_disk_full_during_save_is_one_line_and_the_previous_checkpoint_stays(tmp_path,
                                                                               monkeypatch):
    eng = _engine()
    ck.save_checkpoint(tmp_path, 5, eng, {"data_iteration": 5}, keep=3)
    real_save = torch.save

    def full(obj, f, *a, **k):  # torch.save's own message when the disk fills
        if str(f).endswith(ck.STATE_FILE):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "3234752 vs 3234640")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(ck.CheckpointWriteError) as err:
        ck.save_checkpoint(tmp_path, 10, eng, {"data_iteration": 10}, keep=3)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"checkpoint iter_0000010 could not be written in {tmp_path}" in msg
    assert "unexpected pos" in msg and "MiB free there" in msg
    assert f"the previous checkpoint {tmp_path / 'iter_0000005'} is intact" in msg
    monkeypatch.undo()
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "iter_0000005"
    assert (tmp_path / ".partial" / "iter_0000010").exists()
    # the next save (another iteration: a resume with another checkpoint_every, a stop signal)
    # clears what the failed one left
    ck.save_checkpoint(tmp_path, 7, eng, {"data_iteration": 7}, keep=3)
    assert not (tmp_path / ".partial" / "iter_0000010").exists()
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "iter_0000007"


def test_killed_while_replacing_an_earlier_runs_checkpoint_still_resumes(tmp_path, monkeypatch,
                                                                         caplog):
    """train.resume=none in a folder whose run ended at iter_10 (`latest` names it): this run's
    save of iter_10 replaces that folder. Killed between the replacement and the new `latest`,
    `latest` names a folder that is gone: resume=auto takes the newest complete one up to it
    (this run's iter_5) instead of failing on the missing folder."""
    eng = _engine()
    ck.save_checkpoint(tmp_path, 10, eng, {"data_iteration": 10}, keep=3)  # the earlier run
    ck.save_checkpoint(tmp_path, 5, eng, {"data_iteration": 5}, keep=3)  # this run
    (tmp_path / "latest").write_text("iter_0000010\n")  # as the earlier run left it
    real_rename, calls = ck.os.rename, []

    def killed(src, dst):
        calls.append(src)
        if str(src).endswith("/.partial/iter_0000010"):  # publishing the new folder
            raise KeyboardInterrupt("killed during save")
        return real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 10, eng, {"data_iteration": 10}, keep=3)
    monkeypatch.undo()
    assert not (tmp_path / "iter_0000010").exists() and calls
    assert ck.resolve_resume("auto", tmp_path) == tmp_path / "iter_0000005"
    assert "latest names iter_0000010, which is missing" in caplog.text.replace(
        str(tmp_path / "latest"), "latest")


def test_resume_with_another_gas_starts_at_a_step_boundary(tmp_path, caplog):
    """A checkpoint at data position 3 micro-batches (gas 1) resumed with gas 2 and
    crops.resolution_mix: the loader draws one size per optimizer step (micro_batch // gas), so
    the resumed position must be a multiple of gas (2, one micro-batch seen again); from 3 every
    later step would straddle two draws and mix two crop sizes in one optimizer step."""
    from pathlib import Path

    from fastdino.train import Trainer

    smoke = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
    common = ["data.num_workers=0", "data.loader=torch", "model.depth=1", "kernels.impl=torch",
              "dino.head.n_prototypes=64", "ibot.head.n_prototypes=64", "dino.head.hidden_dim=64",
              "ibot.head.hidden_dim=64", "data.batch_size_per_gpu=2", "train.log_every=100",
              "crops.resolution_mix=[[32,16,null,1],[64,32,null,1]]",
              f"train.output_dir={tmp_path}", "train.checkpoint_every=3"]
    Trainer(load_config(smoke, [*common, "train.max_iterations=3"])).train()
    resumed = Trainer(load_config(smoke, [*common, "train.max_iterations=12",
                                          "deepspeed.gradient_accumulation_steps=2"]))
    assert resumed.start_iteration == 3
    assert resumed.start_micro_batch == 2, resumed.start_micro_batch
    assert "data position 3 micro-batches is not a multiple" in caplog.text
    loader = resumed.build_loader()
    sizes = [[next(loader).global_crops.shape[-1] for _ in range(2)] for _ in range(8)]
    assert all(a == b for a, b in sizes), sizes  # one size per optimizer step
    assert len({a for a, _ in sizes}) == 2, sizes  # and the mix is real


def test_resume_with_another_batch_and_homogeneous_batches_says_the_position_is_approximate(
        tmp_path, caplog):
    """The remap keeps the global image count of one image stream; with data.homogeneous_root
    the two sources' positions depend on which earlier steps drew them, so a remapped step index
    continues each source only approximately: said, not silent."""
    from pathlib import Path

    from fastdino.data.sample_data import sample_images_dir
    from fastdino.train import Trainer

    smoke = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
    common = ["data.num_workers=0", "data.loader=torch", "model.depth=1", "kernels.impl=torch",
              "dino.head.n_prototypes=64", "ibot.head.n_prototypes=64", "dino.head.hidden_dim=64",
              "ibot.head.hidden_dim=64", "train.log_every=100", f"train.output_dir={tmp_path}",
              f"data.homogeneous_root={sample_images_dir()}", "data.homogeneous_ratio=0.5",
              "train.checkpoint_every=2"]
    Trainer(load_config(smoke, [*common, "train.max_iterations=2",
                                "data.batch_size_per_gpu=4"])).train()
    assert "approximate" not in caplog.text
    Trainer(load_config(smoke, [*common, "train.max_iterations=4", "data.batch_size_per_gpu=2"]))
    assert "with data.homogeneous_root the remapped data position is approximate" in caplog.text
    caplog.clear()
    # another gradient accumulation: the steps that drew each source differ too (draws are per
    # optimizer step), on the same ranks and batch
    Trainer(load_config(smoke, [*common, "train.max_iterations=4", "data.batch_size_per_gpu=4",
                                "deepspeed.gradient_accumulation_steps=2"]))
    assert "with data.homogeneous_root the remapped data position is approximate" in caplog.text


def test_second_ctrl_c_during_a_save_is_one_line_naming_the_checkpoint_left(tmp_path):
    """Ctrl-C twice while iteration 4's checkpoint is written: the run stops at once (exit 130),
    iteration 2's checkpoint is untouched and named in one line, no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    run = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, str(repo / "tests" / "e2e" / "qa_dist_sigint_worker.py"), "--at", "4",
         "--", "--config", str(repo / "configs" / "smoke.yaml"), "data.num_workers=0",
         "model.depth=1", "data.batch_size_per_gpu=2", "train.max_iterations=6",
         "train.checkpoint_every=2", f"train.output_dir={run}"],
        cwd=repo, capture_output=True, text=True, timeout=300)
    assert p.returncode == 130, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = run / "checkpoints" / "iter_0000002"
    assert (f"second SIGINT: stopping without a checkpoint; the same command continues from the "
            f"last checkpoint, {last} (train.resume=auto)") in p.stderr, p.stderr[-3000:]
    assert ck.latest_checkpoint(run / "checkpoints") == last
