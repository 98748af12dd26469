"""Gradient accumulation in `Trainer.step` (USERS.md §2, §13, §15: LightlyTrain #968, LightlySSL
PR#2062), in process on a tiny model with the plain torch engine:
- gas = 2 micro-batches of B images == gas = 1 on the same 2B images (gradients, parameters,
  teacher, centers, logged loss) for two optimizer steps;
- the EMA teacher and the softmax centers move once per optimizer step, the center is the same for
  both micro-batches and its update is the mean over both micro-batches' teacher outputs;
- a non-finite second micro-batch discards the whole step (nothing moves, nothing leaks into the
  next step); the consecutive non-finite count survives a resume; the log says why gram_loss is 0.

Exact batch separability of the objective: one big batch equals the mean of its halves only where
no term couples the images of a batch beyond a mean, so these tests use
- softmax centering (per-row softmax around a center that is fixed within a step) instead of
  Sinkhorn-Knopp, whose row/column normalisation spans the whole (micro-)batch;
- koleo.loss_weight = 0 (nearest neighbours are searched within the micro-batch);
- drop_path_rate = 0 and no RoPE rescale (random draws per forward, and sample-subset drop path
  depends on the batch size);
- micro-batches with the same number of images and of masked patches (the real loader's static
  shapes), so the DINO means (over B images), the iBOT sum / 2B and the center's mean of
  micro-batch means are exactly the big batch's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fastdino.config import load_config
from fastdino.data import build_train_loader
from fastdino.data.collate import Batch

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
B = 2  # images per micro-batch
TINY = ["data.num_workers=0", "data.loader=torch", "model.depth=2", "kernels.impl=torch",
        "dino.head.n_prototypes=64", "ibot.head.n_prototypes=64", "dino.head.hidden_dim=64",
        "ibot.head.hidden_dim=64", "optim.warmup_epochs=0", "train.resume=none"]
SEPARABLE = ["dino.centering=softmax", "koleo.loss_weight=0", "model.drop_path_rate=0",
             "model.rope_rescale=null"]


def make_trainer(tmp_path, name, *overrides):
    from fastdino.train import Trainer

    cfg = load_config(SMOKE, [*TINY, f"train.output_dir={tmp_path / name}", *overrides])
    return Trainer(cfg)


def micro_batches(n: int, step: int = 0) -> list[Batch]:
    """Micro-batches step*n .. step*n+n-1 of B images from the real loader (same masked count)."""
    cfg = load_config(SMOKE, [*TINY, f"data.batch_size_per_gpu={B}"])
    loader = build_train_loader(cfg, 0, 1, start_iteration=step * n)
    return [next(loader) for _ in range(n)]


def concat(batches: list[Batch]) -> Batch:
    """One Batch of all images of `batches`, crop-major, masks kept per image."""
    def crop_major(key: str, n_crops: int) -> torch.Tensor:
        parts = [getattr(b, key).view(n_crops, b.n_images, *getattr(b, key).shape[1:])
                 for b in batches]
        x = torch.cat(parts, dim=1)
        return x.reshape(-1, *x.shape[2:])

    n_local = batches[0].local_crops.shape[0] // batches[0].n_images
    masks = crop_major("masks", 2)  # [2·ΣB, N]
    per_image = masks.sum(-1, keepdim=True).clamp(min=1).float()
    return Batch(global_crops=crop_major("global_crops", 2),
                 local_crops=crop_major("local_crops", n_local), masks=masks,
                 mask_indices=masks.reshape(-1).nonzero().reshape(-1),
                 masks_weight=(1.0 / per_image).expand_as(masks)[masks],
                 n_masked_patches=torch.tensor([int(masks.sum())]), gram_crops=None,
                 n_images=sum(b.n_images for b in batches))


def record_grads(trainer) -> list[dict[str, torch.Tensor]]:
    """Snapshot of the student's gradients as the optimizer will use them (after the clip)."""
    engine, seen = trainer.engine, []
    real = engine.clip_grad_norms

    def clip(*a, **k):
        norms = real(*a, **k)
        seen.append({n: p.grad.detach().clone() for n, p in engine.module.named_parameters()
                     if p.grad is not None})
        return norms

    engine.clip_grad_norms = clip
    return seen


def params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_close_dicts(a, b, rtol, atol, what):
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k:
                                   f"{what} {k}: {m}")


def test_two_micro_batches_equal_one_double_batch(tmp_path):
    """Two optimizer steps: gas=2 x B images vs gas=1 x 2B images, same images and masks.
    Step 1 runs with the center that step 0 moved, so a center updated per micro-batch (or
    from one micro-batch only) or a backward without the 1/gas scale makes this fail."""
    big = make_trainer(tmp_path, "big", *SEPARABLE, f"data.batch_size_per_gpu={2 * B}")
    acc = make_trainer(tmp_path, "acc", *SEPARABLE, f"data.batch_size_per_gpu={B}",
                       "deepspeed.gradient_accumulation_steps=2")
    assert big.global_batch == acc.global_batch == 2 * B  # same lr scaling
    assert_close_dicts(params(big.engine.module), params(acc.engine.module), 0, 0, "init")
    g_big, g_acc = record_grads(big), record_grads(acc)
    for it in (0, 1):
        mbs = micro_batches(2, step=it)
        v_big = big.step(it, concat(mbs))
        v_acc = acc.step(it, mbs)
        for k in ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss",
                  "backbone_grad_norm", "dino_head_grad_norm", "ibot_head_grad_norm"):
            assert float(v_acc[k]) == pytest.approx(float(v_big[k]), rel=1e-5), (it, k)
        assert_close_dicts(g_acc[it], g_big[it], 1e-4, 1e-8, f"step {it} gradient")
        for name in ("dino_loss", "ibot_patch_loss"):
            torch.testing.assert_close(getattr(acc.arch, name).center,
                                       getattr(big.arch, name).center, rtol=1e-5, atol=1e-7)
    assert acc.arch.dino_loss.center.abs().max() > 0  # the center did move
    # after two Adam steps parameters agree to a small part of lr (Adam's update is scale-free
    # and amplifies rounding where m cancels between steps: the gradients above are the check)
    lr = float(v_big["lr"])
    assert_close_dicts(params(acc.engine.module), params(big.engine.module), 0, 1e-2 * lr,
                       "student")
    assert_close_dicts(params(acc.arch.teacher), params(big.arch.teacher), 0, 1e-2 * lr,
                       "teacher")


def test_ema_and_center_once_per_optimizer_step(tmp_path, monkeypatch):
    from fastdino import meta_arch

    trainer = make_trainer(tmp_path, "run", *SEPARABLE, f"data.batch_size_per_gpu={B}",
                           "deepspeed.gradient_accumulation_steps=2", "dino.center_momentum=0.9")
    arch = trainer.arch
    ema_calls = []
    real_ema = meta_arch.ema_update
    monkeypatch.setattr(meta_arch, "ema_update",
                        lambda *a, **k: (ema_calls.append(1), real_ema(*a, **k))[1])
    centers_seen = []  # the DINO center at each teacher normalisation
    real_targets = arch.dino_loss.teacher_targets

    def spy(*a, **k):
        centers_seen.append(arch.dino_loss.center.clone())
        return real_targets(*a, **k)

    arch.dino_loss.teacher_targets = spy
    for it in range(2):
        mbs = micro_batches(2, step=it)
        with torch.no_grad():  # the teacher's outputs, before the step moves it
            outs = [arch.teacher.teacher_forward(b.global_crops, b.mask_indices) for b in mbs]
        c_dino, c_ibot = arch.dino_loss.center.clone(), arch.ibot_patch_loss.center.clone()
        teacher_before = params(arch.teacher)
        assert trainer.step(it, mbs) is not None
        assert len(ema_calls) == it + 1  # one EMA per optimizer step, not per micro-batch
        m = trainer.sched.at(it).momentum
        student = params(trainer.engine.module)
        expected = {k: m * teacher_before[k] + (1 - m) * student[k] for k in student}
        assert_close_dicts(params(arch.teacher), expected, 1e-6, 1e-7, "EMA teacher")
        # both micro-batches normalised with the center of the previous step
        assert len(centers_seen) == 2 * (it + 1)
        assert torch.equal(centers_seen[-2], c_dino) and torch.equal(centers_seen[-1], c_dino)
        # center <- 0.9 c + 0.1 · mean over all rows of both micro-batches (equal row counts)
        cls_mean = torch.cat([o["cls_logits"] for o in outs]).mean(0, keepdim=True)
        torch.testing.assert_close(arch.dino_loss.center, 0.9 * c_dino + 0.1 * cls_mean)
        patch_mean = torch.stack([o["patch_logits"].mean(0) for o in outs]).mean(0, keepdim=True)
        torch.testing.assert_close(arch.ibot_patch_loss.center, 0.9 * c_ibot + 0.1 * patch_mean)
        assert arch.dino_loss.pending_center_state() is None  # nothing left for the next step


def _poison_nth_micro_batch(monkeypatch, nth: set[int]):
    from fastdino import meta_arch

    real = meta_arch.SSLMetaArch.compute_losses
    calls = {"n": 0}

    def poisoned(self, s, t, batch, v):
        loss, terms = real(self, s, t, batch, v)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in nth else loss), terms

    monkeypatch.setattr(meta_arch.SSLMetaArch, "compute_losses", poisoned)


def test_nonfinite_second_micro_batch_skips_the_whole_step(tmp_path, monkeypatch):
    over = [*SEPARABLE, f"data.batch_size_per_gpu={B}", "deepspeed.gradient_accumulation_steps=2"]
    trainer = make_trainer(tmp_path, "run", *over)
    fresh = make_trainer(tmp_path, "fresh", *over)  # the same state, never skipped
    arch = trainer.arch
    student0, teacher0 = params(trainer.engine.module), params(arch.teacher)
    center0 = arch.dino_loss.center.clone()
    _poison_nth_micro_batch(monkeypatch, {2})  # the second micro-batch of step 0
    assert trainer.step(0, micro_batches(2, step=0)) is None
    assert_close_dicts(params(trainer.engine.module), student0, 0, 0, "student")
    assert_close_dicts(params(arch.teacher), teacher0, 0, 0, "teacher")
    assert torch.equal(arch.dino_loss.center, center0)
    assert arch.dino_loss.pending_center_state() is None
    # the next step sees only its own gradients: the first micro-batch's are gone
    g_tr, g_fresh = record_grads(trainer), record_grads(fresh)
    mbs = micro_batches(2, step=1)
    assert trainer.step(1, mbs) is not None
    assert fresh.step(1, mbs) is not None
    assert_close_dicts(g_tr[0], g_fresh[0], 0, 0, "gradient after a skipped step")


def test_consecutive_nonfinite_count_survives_resume(tmp_path, monkeypatch):
    """max_consecutive_nan = 3: 2 skipped steps, a checkpoint, a resume, 1 more -> stop."""
    from fastdino.train import NonFiniteLossError

    over = [f"data.batch_size_per_gpu={B}", "train.max_consecutive_nan=3",
            "train.checkpoint_every=2"]
    _poison_nth_micro_batch(monkeypatch, set(range(1, 100)))
    first = make_trainer(tmp_path, "run", *over, "train.max_iterations=2")
    assert first.train() == []  # 2 skipped steps, checkpoint at iteration 2
    resumed = make_trainer(tmp_path, "run", *over, "train.max_iterations=4", "train.resume=auto")
    assert resumed.start_iteration == 2 and resumed.consecutive_nonfinite == 2
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        resumed.train()


def test_log_says_why_gram_loss_is_zero(tmp_path, caplog):
    trainer = make_trainer(tmp_path, "run", f"data.batch_size_per_gpu={B}", "gram.use=true",
                           "gram.it_load_ema_teacher=1", "gram.start_iteration=2")
    mbs = micro_batches(1)
    with caplog.at_level(logging.INFO, logger="fastdino"):
        v = trainer.step(0, mbs)
        assert float(v["gram_loss"]) == 0
        assert "Gram teacher is not loaded yet" in caplog.text
        caplog.clear()
        trainer.step(1, mbs)  # loaded after iteration 0, weight still 0 before iteration 2
        assert "its weight is 0 at iteration 1" in caplog.text
        caplog.clear()
        v = trainer.step(2, mbs)
        assert float(v["gram_loss"]) > 0 and "gram_loss enters the objective" in caplog.text


def test_wrong_number_of_micro_batches_is_an_error_before_any_work(tmp_path):
    trainer = make_trainer(tmp_path, "run", f"data.batch_size_per_gpu={B}",
                           "deepspeed.gradient_accumulation_steps=2")
    student0 = params(trainer.engine.module)
    with pytest.raises(ValueError, match="1 micro-batches given, deepspeed.gradient_accumulation"):
        trainer.step(0, micro_batches(1)[0])
    assert all(p.grad is None for p in trainer.engine.module.parameters())
    assert_close_dicts(params(trainer.engine.module), student0, 0, 0, "student")
