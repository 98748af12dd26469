"""One `Trainer.step` in process on the tiny smoke model (SPEC.md §1.7, §1.6, §3.1): the total
objective rebuilt from the logged terms, the logged KoLeo value, Gram-teacher work and scheduling.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fastdino.config import load_config
from fastdino.data import build_train_loader

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
SMALL = ["data.num_workers=0", "data.batch_size_per_gpu=4", "model.depth=2", "data.loader=torch",
         "dino.head.n_prototypes=128", "ibot.head.n_prototypes=128", "kernels.impl=torch"]


def make_trainer(tmp_path, *overrides):
    from fastdino.train import Trainer

    cfg = load_config(SMOKE, [*SMALL, f"train.output_dir={tmp_path / 'run'}", "train.resume=none",
                              *overrides])
    trainer = Trainer(cfg)
    batch = next(build_train_loader(cfg, 0, 1, 0)).to(trainer.info.device)
    return trainer, batch


def test_total_objective_from_logged_terms(tmp_path):
    """L = (16/18)·w_local·L_local + (2/18)·L_global + 0.1·Σ_g KoLeo_g + L_iBOT (SPEC.md §1.7),
    with `koleo_loss` logged as the official metric: the MEAN over the 2 global crops
    (ssl_meta_arch.compute_losses: sum / n_global_crops, added as w·n_global·koleo_loss).
    smoke has 2 local crops: local terms 2·2 = 4, global terms 2, so 4/6 and 2/6 here."""
    trainer, batch = make_trainer(tmp_path, "dino.local_loss_weight=0.5")
    v = trainer.step(0, batch)
    n_l = trainer.cfg.crops.local_crops_number
    local_terms, global_terms = 2 * n_l, 2
    dino = (local_terms * 0.5 * v["dino_local_crops_loss"]
            + global_terms * v["dino_global_crops_loss"]) / (local_terms + global_terms)
    expected = dino + 0.1 * 2 * v["koleo_loss"] + 1.0 * v["ibot_loss"]
    assert float(v["total_loss"]) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert v["dino_local_loss_weight"] == 0.5


def _nan_losses(monkeypatch):
    from fastdino import meta_arch

    real = meta_arch.SSLMetaArch.compute_losses

    def poisoned(self, s, t, batch, v):
        loss, terms = real(self, s, t, batch, v)
        return loss * float("nan"), terms

    monkeypatch.setattr(meta_arch.SSLMetaArch, "compute_losses", poisoned)


def test_gram_teacher_load_happens_even_if_that_step_is_skipped(tmp_path, monkeypatch):
    """The Gram-teacher load / refresh is a function of the iteration (official train.py loads
    before iteration `it_load_ema_teacher` whatever the loss was): a non-finite step at
    it_load - 1 must not lose the load for the rest of the run."""
    trainer, batch = make_trainer(tmp_path, "gram.use=true", "gram.it_load_ema_teacher=1",
                                  "gram.it_first_update=2", "gram.update_frequency=2",
                                  "gram.max_updates=1")
    arch = trainer.arch
    assert not arch.gram_ready
    _nan_losses(monkeypatch)
    assert trainer.step(0, batch) is None  # skipped
    assert arch.gram_ready, "Gram teacher never loaded: the step before it_load was skipped"
    assert trainer.step(1, batch) is None  # skipped, and a refresh is due after iteration 1
    assert arch.gram_updates == 1


def test_gram_teacher_not_run_while_its_weight_is_zero(tmp_path):
    """Before gram.start_iteration w_gram = 0, the loss is not added: the Gram teacher forward
    (2x resolution in the 7B recipe) must not run either. From then on it runs once a step."""
    trainer, batch = make_trainer(tmp_path, "gram.use=true", "gram.it_load_ema_teacher=0",
                                  "gram.start_iteration=2", "gram.loss_weight=1.0")
    gt = trainer.arch.gram_teacher
    calls = {"n": 0}
    real = gt.forward_features

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    gt.forward_features = counted
    v0 = trainer.step(0, batch)
    assert v0["gram_loss_weight"] == 0.0 and calls["n"] == 0
    v3 = trainer.step(3, batch)
    assert v3["gram_loss_weight"] == 1.0 and calls["n"] == 1
    assert float(v3["gram_loss"]) > 0


def test_step_host_syncs(tmp_path, monkeypatch):
    """A step that is not logged reads device values on the host once (the clip norms, which
    also carry the loss's finiteness), not twice (SPEC.md §3.1 step 5/6)."""
    trainer, batch = make_trainer(tmp_path)
    trainer.step(0, batch)  # warm-up (lazy init may read values)
    counts = {"n": 0}
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, **k):
            # fastdino's own reads only: CPU torch's single-tensor Adam reads its step counts
            # (the fused CUDA AdamW used on GPU does not)
            if "fastdino" in Path(sys._getframe(1).f_code.co_filename).parts:
                counts["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    trainer.step(1, batch)
    assert counts["n"] == 1


def test_pca_maps_are_written_with_every_checkpoint(tmp_path):
    """train.pca_images: the teacher's shared PCA and token-norm maps beside each checkpoint; the
    teacher's mode is left as it was; a missing input is a config error before any work."""
    from fastdino.config import ConfigError
    from fastdino.data.sample_data import sample_images_dir

    photos = sorted(sample_images_dir().iterdir())[:2]
    trainer, _ = make_trainer(tmp_path, f"train.pca_images=[{photos[0]},{photos[1]}]",
                              "train.pca_resolution=64", "train.checkpoint_every=1",
                              "train.max_iterations=2")
    teacher = trainer.arch.teacher.backbone
    mode = teacher.training
    trainer.train()
    assert teacher.training == mode
    for it in (1, 2):
        out = tmp_path / "run" / "pca" / f"iter_{it:07d}"
        assert {p.name for p in out.iterdir()} >= {"grid.png", "norms.json",
                                                   f"{photos[0].stem}_pca.png",
                                                   f"{photos[1].stem}_norms.png"}
    with pytest.raises(ConfigError, match=r"train.pca_images.*neither an image file"):
        make_trainer(tmp_path / "bad", "train.pca_images=[/no/such/image.jpg]")
    from fastdino.train import _pca_inputs

    assert _pca_inputs(("sample",)) == sorted(sample_images_dir().iterdir())


def test_post_clip_norms_are_what_the_optimizer_used(tmp_path, monkeypatch):
    """<module>_grad_norm is the norm before the per-module clip (DeepSpeed users' complaint: a
    pre-clip value is all they see); <module>_grad_norm_clipped the norm of the gradients the
    optimizer stepped with, measured here just before the step."""
    trainer, batch = make_trainer(tmp_path, "optim.clip_grad=0.05")
    engine, measured = trainer.engine, {}
    real_step = engine.step

    def step():
        for name, ps in engine.module_params().items():
            measured[name] = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in ps
                                            if p.grad is not None)).item()
        real_step()

    monkeypatch.setattr(engine, "step", step)
    v = trainer.step(0, batch)
    clipped = [n for n in measured if v[f"{n}_grad_norm"] > 0.05]
    assert clipped  # the clip acted on some module: the two values differ there
    for name, norm in measured.items():
        assert v[f"{name}_grad_norm_clipped"] == pytest.approx(norm, rel=1e-5)
        assert v[f"{name}_grad_norm_clipped"] <= v[f"{name}_grad_norm"] + 1e-12
    for name in clipped:
        assert v[f"{name}_grad_norm_clipped"] == pytest.approx(0.05, rel=1e-4)


def test_teacher_snapshots_feed_the_gram_stage(tmp_path, caplog):
    """train.teacher_snapshot_every writes the official eval snapshots; a later Gram stage takes
    one as gram.ckpt. The stage transition itself: a checkpoint written without the Gram loss,
    resumed with it (SPEC.md §3.7), starts the Gram teacher from gram.ckpt, or from the resumed
    EMA teacher when gram.it_load_ema_teacher is the resume iteration (it crashed on the missing
    Gram state before, and the load 'after iteration it_load - 1' never came)."""
    from fastdino.train import Trainer

    run = tmp_path / "run"
    stage1 = [*SMALL, f"train.output_dir={run}", "train.checkpoint_every=2",
              "train.teacher_snapshot_every=1"]
    Trainer(load_config(SMOKE, [*stage1, "train.max_iterations=2"])).train()
    snap = run / "eval" / "training_1" / "teacher_checkpoint.pth"
    assert snap.is_file() and (run / "eval" / "training_2" / "teacher_checkpoint.pth").is_file()
    st1 = torch.load(snap, weights_only=True)["teacher"]
    from fastdino.eval.weights import load_eval_backbone

    back, info = load_eval_backbone(snap)  # no --arch: the run's config.yaml gives it
    assert "architecture from" in info.source
    assert all(torch.equal(v, st1[f"backbone.{k}"]) for k, v in back.state_dict().items())
    gram = ["gram.use=true", "gram.start_iteration=2", "crops.gram_teacher_crops_size=64",
            "train.max_iterations=3"]
    with caplog.at_level("INFO", logger="fastdino"):
        t = Trainer(load_config(SMOKE, [*stage1, *gram, f"gram.ckpt={snap}"]))
    assert t.start_iteration == 2 and t.arch.gram_ready and "gram.ckpt" in caplog.text
    for k, v in t.arch.gram_teacher.state_dict().items():
        assert torch.equal(v, st1[f"backbone.{k}"]), k
    history = t.train()
    assert history[-1]["gram_loss"] > 0
    # the same resume with the EMA teacher of the resume point
    shutil.rmtree(run / "checkpoints" / "iter_0000003")
    (run / "checkpoints" / "latest").write_text("iter_0000002\n")
    t = Trainer(load_config(SMOKE, [*stage1, *gram, "gram.it_load_ema_teacher=2"]))
    assert t.arch.gram_ready
    teacher = t.arch.teacher.backbone.state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in t.arch.gram_teacher.state_dict().items())
    # a load iteration after the resume point waits as usual
    t = Trainer(load_config(SMOKE, [*stage1, *gram, "gram.it_load_ema_teacher=3"]))
    assert not t.arch.gram_ready
    # one before it cannot be honoured: the resumed EMA teacher, and a warning that says so
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastdino"):
        t = Trainer(load_config(SMOKE, [*stage1, *gram, "gram.it_load_ema_teacher=1"]))
    assert t.arch.gram_ready and "lies before the resume iteration 2" in caplog.text


def test_a_changed_config_keeps_the_previous_one(tmp_path, caplog):
    from fastdino.train import Trainer

    over = [*SMALL, f"train.output_dir={tmp_path / 'run'}", "train.resume=none"]
    Trainer(load_config(SMOKE, over))
    Trainer(load_config(SMOKE, over))  # the same config: nothing kept, nothing logged
    assert [p.name for p in (tmp_path / "run").glob("config*.yaml")] == ["config.yaml"]
    with caplog.at_level("INFO", logger="fastdino"):
        Trainer(load_config(SMOKE, [*over, "optim.lr=0.5", "gram.use=true",
                                   "gram.it_load_ema_teacher=1"]))
    kept = [p for p in (tmp_path / "run").glob("config.*.yaml")]
    assert len(kept) == 1 and load_config(kept[0]).optim.lr != 0.5
    assert load_config(tmp_path / "run" / "config.yaml").optim.lr == 0.5
    assert "gram.use: False -> True" in caplog.text and "optim.lr:" in caplog.text


def test_the_schedule_is_stated_in_data_passes():
    from fastdino.train import schedule_in_data_passes

    cfg = load_config(SMOKE, ["train.epoch_length=100"])
    line = schedule_in_data_passes(cfg, 1000, 64, 32000)
    assert "64,000 images seen = 2.00 passes over the 32,000 images" in line
    assert "train.epoch_length=100 iterations = 0.2 passes" in line


def test_training_on_a_resolution_mix(tmp_path):
    """crops.resolution_mix through the trainer: steps of different crop sizes (the ViT, RoPE,
    the iBOT masks and the Gram teacher follow each step's size), with Gram crops."""
    trainer, _ = make_trainer(
        tmp_path, "crops.resolution_mix=[[32,16,48,1],[64,32,96,1]]",
        "crops.gram_teacher_crops_size=48", "gram.use=true", "gram.it_load_ema_teacher=0",
        "train.max_iterations=6", "train.log_every=1")
    batches = trainer.train()
    assert len(batches) == 6 and all(math.isfinite(m["total_loss"]) for m in batches)
    assert all(m["gram_loss"] > 0 for m in batches)
    order = build_train_loader(trainer.cfg, 0, 1, 0).batches
    assert {order.resolution(s) for s in range(6)} == {0, 1}  # both sizes were trained on


def test_local_crops_may_leave_a_patch_remainder(tmp_path):
    """A local crop that is no multiple of the patch (the official high-res triple's 168 at
    patch 16) is floored to whole patches by the patch embedding, as the official one does."""
    trainer, batch = make_trainer(tmp_path, "crops.local_crops_size=40")
    assert batch.local_crops.shape[-1] == 40
    v = trainer.step(0, batch)
    assert math.isfinite(float(v["total_loss"])) and float(v["dino_local_crops_loss"]) > 0


def test_knn_probe_data_is_checked_at_the_start(tmp_path):
    """train.knn_data is listed on every rank when the trainer is built: a missing folder stops
    the run before its first step (it stopped rank 0 at the first probe, mid-run); 'digits' is
    the embedded labelled set, as eval's --data takes it."""
    from fastdino.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.knn_data='/no/such/folder': labelled image "
                                          r"folder '/no/such/folder' does not exist"):
        make_trainer(tmp_path, "train.knn_every=2", "train.knn_data=/no/such/folder")
    with pytest.raises(ConfigError, match=r"train.knn_every.*0 unless train.knn_data"):
        make_trainer(tmp_path, "train.knn_every=2")
    trainer, _ = make_trainer(tmp_path, "train.knn_every=2", "train.knn_data=digits",
                              "train.max_iterations=2", "train.log_every=100")
    train, query = trainer.knn_samples
    assert len(train) > len(query) > 0 and "digits" in train[0][0]
    history = trainer.train()
    assert history[-1]["iteration"] == 2 and 0 <= history[-1]["knn_top1_k10"] <= 1


def test_a_failing_knn_probe_is_skipped_not_fatal(tmp_path, caplog, monkeypatch):
    """A probe that fails mid-run (its data gone, every image unreadable) costs that probe, not
    the run: a warning, the step's metrics without kNN values, training goes on. One unreadable
    image costs only itself (e4d27e7): it is left out, and the probe is logged."""
    from fastdino.data.sample_data import digits_labelled_dir
    from fastdino.eval import knn

    probe = tmp_path / "probe"
    shutil.copytree(digits_labelled_dir(), probe)
    (probe / "train" / "0" / "broken.png").write_bytes(b"not a png")
    trainer, _ = make_trainer(tmp_path, "train.knn_every=1", f"train.knn_data={probe}",
                              "train.max_iterations=2", "train.log_every=1")
    real = knn.knn_probe

    def gone_at_iteration_2(*a, **k):
        if trainer.micro_batch >= 2:
            raise FileNotFoundError(f"{probe}: no such folder")
        return real(*a, **k)

    monkeypatch.setattr(knn, "knn_probe", gone_at_iteration_2)
    with caplog.at_level("WARNING", logger="fastdino"):
        history = trainer.train()
    assert [h["iteration"] for h in history] == [1, 2]
    assert "knn_top1_k10" in history[0] and "broken.png" in caplog.text
    assert not any(k.startswith("knn") for k in history[1])
    assert "kNN probe at iteration 2 failed, skipped" in caplog.text
