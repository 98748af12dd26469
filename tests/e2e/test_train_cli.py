"""Single-process trainer runs through the real entry points (issue 3 items 5-7): a corrupt image
does not stop training; a bad config key errors with its name; the NaN/Inf guard stops with a
clear message and a usable checkpoint; `fastdino export` writes the teacher backbone with the
official key names; the kNN probe is logged."""

import math
import re
import shutil

import torch
import yaml
from trainer_helpers import FAST, SMOKE, read_metrics, run_py


def test_bad_config_key_names_it(tmp_path):
    p = run_py(["--config", str(SMOKE), f"train.output_dir={tmp_path}", "optim.lrr=0.1"],
               check=False)
    assert p.returncode == 2
    assert "optim.lrr" in p.stderr and "unknown config key" in p.stderr
    assert "Traceback" not in p.stderr  # the message, not a stack


def test_print_config_writes_a_config_that_reads_back_the_same(tmp_path):
    """stdout is the yaml alone (DeepSpeed's import-time log line goes to stderr), and the
    printed config, given back as --config, resolves to itself."""
    first = run_py(["--config", str(SMOKE), "--print-config"]).stdout
    assert yaml.safe_load(first)["model"]["arch"] == "vit_test"
    (tmp_path / "c.yaml").write_text(first)
    assert run_py(["--config", str(tmp_path / "c.yaml"), "--print-config"]).stdout == first


def test_missing_data_root_is_one_line(tmp_path):
    p = run_py(["--config", str(SMOKE), *FAST, f"train.output_dir={tmp_path}",
                f"data.root={tmp_path / 'no_images_here'}"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "config error: data.root" in p.stderr and "does not exist" in p.stderr


def test_missing_pretrained_weights_name_the_key(tmp_path):
    p = run_py(["--config", str(SMOKE), f"train.output_dir={tmp_path}",
                f"model.pretrained_weights={tmp_path / 'nope.pth'}"], check=False)
    assert p.returncode == 2
    assert "model.pretrained_weights=" in p.stderr and "does not exist" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_resume_that_does_not_fit_keeps_the_runs_config(tmp_path):
    """A resume with a changed architecture: one line naming the checkpoint, exit 2, and the
    run's config.yaml as it was (export and eval read the run by it)."""
    run_py(["--config", str(SMOKE), *FAST, f"train.output_dir={tmp_path}",
            "train.max_iterations=1"])
    before = (tmp_path / "config.yaml").read_text()
    p = run_py(["--config", str(SMOKE), *FAST, f"train.output_dir={tmp_path}",
                "train.max_iterations=2", "model.embed_dim=128"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "does not fit this run's model" in p.stderr and "iter_0000001" in p.stderr
    assert (tmp_path / "config.yaml").read_text() == before
    # other trainable parameters: the optimizer state does not fit (torch's message, named)
    p = run_py(["--config", str(SMOKE), *FAST, f"train.output_dir={tmp_path}",
                "train.max_iterations=2", "optim.frozen_blocks=2"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "does not fit this run's trainable parameters" in p.stderr


def test_one_image_per_rank_trains_with_koleo_off(tmp_path):
    """What the config error for batch 1 advises (koleo.loss_weight=0) trains; the iBOT loss
    still has its one masked image of the two global crops."""
    run_py(["--config", str(SMOKE), *FAST, f"train.output_dir={tmp_path}",
            "train.max_iterations=1", "data.batch_size_per_gpu=1", "koleo.loss_weight=0"])
    (m,) = read_metrics(tmp_path)
    assert m["koleo_loss"] == 0.0 and math.isfinite(m["total_loss"]) and m["ibot_loss"] > 0


def test_corrupt_image_is_skipped_and_knn_probe_logged_and_export(tmp_path):
    from fastdino.data import digits_labelled_dir, sample_images_dir

    data = tmp_path / "images" / "sub"
    shutil.copytree(sample_images_dir(), data)
    (data / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (data / "empty.png").write_bytes(b"")
    out = tmp_path / "run"
    p = run_py(["--config", str(SMOKE), *FAST, f"train.output_dir={out}",
                f"data.root={tmp_path / 'images'}", "train.max_iterations=4",
                "train.knn_every=2", f"train.knn_data={digits_labelled_dir()}",
                "data.batch_size_per_gpu=16"])  # 16 of 20 files per step: the bad ones are met
    assert "corrupt.jpg" in p.stderr or "empty.png" in p.stderr
    m = read_metrics(out)
    assert [r["iteration"] for r in m] == [1, 2, 3, 4]
    assert all(math.isfinite(r["total_loss"]) for r in m)
    assert 0.0 <= m[1]["knn_top1_k20"] <= 1.0 and "knn_top1_k20" not in m[0]
    for name in ("lr", "wd", "mom", "last_layer_lr", "total_loss", "dino_local_crops_loss",
                 "dino_global_crops_loss", "koleo_loss", "ibot_loss", "backbone_grad_norm",
                 "dino_head_grad_norm", "ibot_head_grad_norm", "dino_teacher_entropy",
                 "koleo_nn_dist_min", "data_wait_s", "data_wait_fraction"):
        assert name in m[-1], name
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 and r["data_wait_s"] >= 0 for r in m)
    assert re.search(r"img/s \| data \d+% \| ETA", p.stderr)  # the data share, printed
    assert (out / "config.yaml").is_file()

    from fastdino.cli import main as cli_main
    from fastdino.config import load_config
    from fastdino.models import build_backbone
    from fastdino.models.state_dict_io import load_backbone_state_dict

    assert cli_main(["export", "--run", str(out), "--out", str(tmp_path / "tb")]) == 0
    sd = torch.load(tmp_path / "tb.pth", weights_only=True)
    from safetensors.torch import load_file

    sd2 = load_file(str(tmp_path / "tb.safetensors"))
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    sd3 = load_file(str(out / "teacher_backbone.safetensors"))  # written at the end of training
    assert sd.keys() == sd3.keys() and all(torch.equal(sd[k], sd3[k]) for k in sd)
    assert {"cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight",
            "blocks.0.ls1.gamma", "norm.weight"} <= set(sd)
    assert not any(k.startswith(("backbone.", "dino_head", "ibot_head")) for k in sd)
    backbone = build_backbone(load_config(SMOKE).model)
    load_backbone_state_dict(backbone, sd)  # strict: every key and shape matches
    st = torch.load(out / "checkpoints" / "iter_0000004" / "trainer_state.pt", weights_only=True)
    assert torch.equal(sd["blocks.0.attn.qkv.weight"],
                       st["teacher"]["backbone.blocks.0.attn.qkv.weight"])


def test_nan_guard_stops_with_checkpoint(tmp_path, monkeypatch, caplog):
    from fastdino import meta_arch, train

    real = meta_arch.SSLMetaArch.compute_losses
    calls = {"n": 0}

    def poisoned(self, s, t, batch, v):
        loss, terms = real(self, s, t, batch, v)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 2 else loss), terms

    monkeypatch.setattr(meta_arch.SSLMetaArch, "compute_losses", poisoned)
    out = tmp_path / "run"
    rc = train.main(["--config", str(SMOKE), *FAST, f"train.output_dir={out}",
                     "train.max_iterations=10", "train.max_consecutive_nan=3"])
    assert rc == 2
    assert "3 consecutive non-finite steps" in caplog.text
    assert [r["iteration"] for r in read_metrics(out)] == [1, 2]  # skipped steps not logged
    ckpt = out / "checkpoints" / "iter_0000005"
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    st = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert st["data_iteration"] == 5
    assert all(torch.isfinite(v).all() for v in st["teacher"].values())


def test_gram_teacher_load_refresh_and_loss(tmp_path):
    """Gram anchoring through the trainer (SPEC.md §1.6): the Gram teacher is copied from the EMA
    teacher after iteration 0, refreshed once after iteration 1 (first update 2, every 2, max 1),
    fed 96 px Gram crops (6x6 grid resized to the student's 4x4), and the weighted loss enters."""
    out = tmp_path / "run"
    run_py(["--config", str(SMOKE), *FAST, f"train.output_dir={out}", "train.max_iterations=4",
            "gram.use=true", "gram.it_load_ema_teacher=1", "gram.it_first_update=2",
            "gram.update_frequency=2", "gram.max_updates=1", "crops.gram_teacher_crops_size=96",
            "gram.loss_weight=1.5"])
    m = read_metrics(out)
    assert m[0]["gram_loss"] == 0.0  # iteration 0: no Gram teacher yet
    assert all(r["gram_loss"] > 0 and r["gram_loss_weight"] == 1.5 for r in m[1:])
    st = torch.load(out / "checkpoints" / "iter_0000004" / "trainer_state.pt", weights_only=True)
    assert st["gram_updates"] == 1 and st["gram_ready"] is True
    gram, teacher = st["gram_teacher"], st["teacher"]
    assert set(gram) == {k.removeprefix("backbone.") for k in teacher if k.startswith("backbone.")}
    # refreshed after iteration 1, so it lags the EMA teacher that kept moving until iteration 3
    assert not torch.equal(gram["blocks.0.attn.qkv.weight"],
                           teacher["backbone.blocks.0.attn.qkv.weight"])


def test_torchrun_launches_deepspeed_ranks(tmp_path):
    """`torchrun --nproc_per_node N fastdino/train.py` (USERS.md §2: no Slurm, no DeepSpeed
    launcher) runs the DeepSpeed engine over the N ranks torchrun started."""
    import subprocess
    import sys

    from trainer_helpers import REPO, TRAIN, _env, _free_port

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(TRAIN), "--config", str(SMOKE), *FAST,
           f"train.output_dir={out}", "train.max_iterations=3"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "DeepSpeed ZeRO-1, torch.float32, 2 rank(s)" in p.stderr
    assert [m["iteration"] for m in read_metrics(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
